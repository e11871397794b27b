#!/usr/bin/env bash
# The GPU lab in one script, for a session that is lent an H100/H200 through the device tool (issue 6).
# Each stage fits one 10-minute device call; results land in bench/results/ and are copied to $OUT (at most
# 8 files come back). Run stages in order, e.g.:
#   run: bash tools/gpu_lab.sh build test sanitize          (first call)
#   run: bash tools/gpu_lab.sh build replay                 (later call; `build` again on a fresh machine)
#   run: bash tools/gpu_lab.sh build layers
# Then commit bench/results/*, run `python bench/report.py <csv> --update-readme` and
# `python tools/update_dispatch_table.py ...` here, and commit. Never type a figure by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_lab}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PE_KERNELS_CUDA_ARCHS=${PE_KERNELS_CUDA_ARCHS:-9.0}
status=0
for stage in "$@"; do
  echo "=== stage $stage ($(date -u +%H:%M:%S))"
  case "$stage" in
    build)      # the CUDA extension against the machine's torch; the pure-Python part needs nothing else
      python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
      python3 -c "import pe_kernels, torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name()); print(pe_kernels.backends())" ;;
    test)       # the whole suite with compiled Triton and _C; GPU-marked tests run here
      timeout 540 python3 -m pytest -q -x --timeout=300 -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 \
        | tee "$OUT/tests.log" | tail -40 || status=1 ;;
    sanitize)   # memcheck + racecheck on one fused-block step of each fast backend
      for tool in memcheck racecheck; do
        for backend in cuda triton; do
          timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/sanitize_step.py \
            --backend $backend 2>&1 | tail -6 | tee -a "$OUT/sanitizer.log" || status=1
        done
      done ;;
    replay)     # Table 8: six models, fp32 + fp16, train + infer, every provider
      timeout 560 python3 bench/throughput.py --model all --dtype both --mode both --provider all \
        --out bench/results || status=1
      latest=$(ls -t bench/results/throughput_cuda_*.csv | head -1)
      python3 bench/plot.py "$latest" --out "${latest%.csv}.png" || status=1
      cp "$latest" "${latest%.csv}.json" "${latest%.csv}.png" "$OUT"/ 2>/dev/null ;;
    layers)     # per-layer fwd/bwd micro-benchmarks (PE-(2,4,1) and Single shapes) with roofline
      stamp=$(date -u +%Y%m%dT%H%M%SZ)
      timeout 560 python3 -m pytest bench/bench_layers.py -q -p no:cacheprovider -k "${LAYERS_FILTER:-fp16}" \
        --benchmark-json "bench/results/layers_cuda_$stamp.json" 2>&1 | tail -30 || status=1
      cp "bench/results/layers_cuda_$stamp.json" "$OUT"/ 2>/dev/null ;;
    *) echo "unknown stage $stage (build test sanitize replay layers)"; status=2 ;;
  esac
done
exit $status
