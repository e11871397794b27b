#!/usr/bin/env bash
# The GPU lab in one script, for a session that is lent an H100/H200 through the device tool.
#
# One device call runs at most 10 minutes and brings back at most 8 files from $OUT, so every stage here is
# sized to end inside one call from a cold cache: each stage is given what is left of LAB_CALL_LIMIT (580 s)
# since the script started, results are appended row by row (a stage stopped by its limit keeps what it
# measured), and when more than 8 files would come back the logs are packed into one archive. Suggested calls:
#   run: bash tools/gpu_lab.sh build gpu            the CUDA extension, then `pytest -m gpu` (full log: gpu.log)
#   run: bash tools/gpu_lab.sh build suite          the whole suite with compiled Triton and _C (suite.log)
#   run: SUITE_SHARD=1/2 bash tools/gpu_lab.sh build suite stash         the suite in two calls when one cannot
#   run: SUITE_SHARD=2/2 bash tools/gpu_lab.sh unstash build suite       hold it: halves by whole test files
#        (suite-1of2.log, suite-2of2.log; carry .lab_state with lab_state.tgz copied into it for the second call,
#        which then skips the rebuild and keeps the Triton cache when it fit in the stash). The suite launches each
#        autotuned Triton kernel with its first config (tests/conftest.py; every config is still checked by
#        tests/test_triton_configs.py); PE_KERNELS_TRITON_CONFIG=autotune before `bash` runs it autotuned.
#   run: bash tools/gpu_lab.sh build warmup         compile + autotune caches for replay1 (first steps: ~40 s a
#                                                   block on a cold Triton cache), kept under .cache/
#   run: bash tools/gpu_lab.sh build replay1        Table 8, fp16 Single + PE-(2,4,1), the main providers
#   run: bash tools/gpu_lab.sh build replay2 ...    later replay stages (`plan` lists them all)
#   run: bash tools/gpu_lab.sh build memcheck       compute-sanitizer (then racecheck)
#   run: bash tools/gpu_lab.sh build layers-main    per-layer benches, both passes, eager cuDNN / pe-triton / pe-cuda
#                                                   with the kernels' device time (layers-fwd, layers-fwdbwd: every
#                                                   provider; layers-compile-*: torch.compile)
#   run: bash tools/gpu_lab.sh build ncu            Nsight Compute on bench_layers cases (NCU_CASES) into ncu.log
#   run: bash tools/gpu_lab.sh build autotune       pe_kernels.autotune on the Table 8 models (AUTOTUNE_ARGS; default
#                                                   fp16 Single and PE-(2,4,1), eval and training) into
#                                                   $RESULTS/autotune_cuda_$DAY.csv (tools/autotune_models.py)
#   run: bash tools/gpu_lab.sh plan                 every stage's command, nothing run
#   run: bash tools/gpu_lab.sh unstash build ...  (carry .lab_state) after `stash` brought back lab_state.tgz
# `build` is skipped when pe_kernels._C already imports and csrc/ is unchanged (a warm machine keeps it).
# Replay rows go to one CSV per UTC day ($REPLAY_CSV); copy it from $OUT into bench/results/ before the next
# replay call so that the later stages append to it (bench/report.py and bench/plot.py fill the ratios to
# Single across stages). Then commit bench/results/*, run `python bench/report.py <csv> --update-readme` and
# `python tools/update_dispatch_table.py --layers <json/csv> --tests <gpu.xml> --arch sm_90`. Never type a
# figure by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:-bench/results/gpu_lab}
RESULTS=${LAB_RESULTS:-bench/results}
DAY=${LAB_DAY:-$(date -u +%Y%m%d)}
REPLAY_CSV=${REPLAY_CSV:-$RESULTS/throughput_cuda_$DAY.csv}
LAYERS_CSV=${LAYERS_CSV:-$RESULTS/layers_cuda_$DAY.csv}
STATE=${LAB_STATE:-.cache}              # build hash and compile caches (git-ignored)
[[ $STATE == /* ]] || STATE=$PWD/$STATE
CALL_LIMIT=${LAB_CALL_LIMIT:-580}      # seconds for the whole call (the device tool stops a call at 600 s)
MAX_OUT_FILES=8
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PE_KERNELS_CUDA_ARCHS=${PE_KERNELS_CUDA_ARCHS:-9.0}
# Compile caches inside the checkout (git-ignored): a warm machine keeps them between calls.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$STATE/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$STATE/inductor}
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}   # autotune winners cached on disk too

MAIN_PROVIDERS="eager-channels-last pe-cuda pe-triton compile"   # cheap first: what a stage ends on is compile
declare -A REPLAY=(
  [replay1]="--model single pe-2-4-1 --dtype fp16 --provider $MAIN_PROVIDERS"
  [replay2]="--model pe-2-4-2 de --dtype fp16 --provider $MAIN_PROVIDERS"
  [replay3]="--model mimo batchensemble --dtype fp16 --provider $MAIN_PROVIDERS"
  [replay4]="--model single pe-2-4-1 --dtype fp32 --provider $MAIN_PROVIDERS"
  [replay5]="--model pe-2-4-2 de --dtype fp32 --provider $MAIN_PROVIDERS"
  [replay6]="--model mimo batchensemble --dtype fp32 --provider $MAIN_PROVIDERS"
  [replay7]="--model all --dtype both --provider eager pe-auto"
  [replay8]="--model single pe-2-4-1 pe-2-4-2 --dtype fp16 --provider eager-graph pe-triton-graph pe-cuda-graph"
  [replay9]="--model de mimo batchensemble --dtype fp16 --provider eager-graph pe-triton-graph pe-cuda-graph"
  [replay10]="--model all --dtype fp32 --provider eager-graph pe-triton-graph pe-cuda-graph"
  [replay11]="--model all --dtype both --provider pe-auto-graph"
)
REPLAY_ORDER="replay1 replay2 replay3 replay4 replay5 replay6 replay7 replay8 replay9 replay10 replay11"
declare -A LAYERS=(
  [layers-main]="fp16 and not compile and not pe-auto and not (eager and not channels)"   # both passes; the
  # providers that matter: eager cuDNN channels_last, pe-triton, pe-cuda (kernel time too: bench_layers.py)
  [layers-fwd]="fp16 and fwd and not fwdbwd and not compile"
  [layers-fwdbwd]="fp16 and fwdbwd and not compile"
  [layers-compile-fwd-single]="fp16 and compile and single and fwd and not fwdbwd"   # 23 cases each: about
  [layers-compile-fwd-pe]="fp16 and compile and pe-2-4-1 and fwd and not fwdbwd"    # 10-20 s of inductor
  [layers-compile-fwdbwd-single]="fp16 and compile and single and fwdbwd"           # compile per case
  [layers-compile-fwdbwd-pe]="fp16 and compile and pe-2-4-1 and fwdbwd"
)
LAYERS_ORDER="layers-main layers-fwd layers-fwdbwd layers-compile-fwd-single layers-compile-fwd-pe
  layers-compile-fwdbwd-single layers-compile-fwdbwd-pe"
# ncu: Nsight Compute on bench_layers cases (tools/ncu_layer.py), NCU_CASES="layer-id-start:pass:provider ..."
NCU_CASES=${NCU_CASES:-"pe-2-4-1-layer1.0.conv2:fwd:pe-triton pe-2-4-1-layer1.0.conv2:fwd:eager-channels-last
  pe-2-4-1-layer1.0.conv2:fwdbwd:pe-triton"}
NCU_SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis
  --section Occupancy --section LaunchStats --section WarpStateStats"
AUTOTUNE_CSV=${AUTOTUNE_CSV:-$RESULTS/autotune_cuda_$DAY.csv}
STAGES="plan unstash stash build warmup gpu suite memcheck racecheck ncu autotune $REPLAY_ORDER $(echo $LAYERS_ORDER)"

say() { echo "=== $* ($(date -u +%H:%M:%S), ${SECONDS}s into the call)"; }
die() { echo "GPU LAB STOPPED: $*" >&2; limit_out; exit "${2:-1}"; }
left() { echo $(( CALL_LIMIT - (SECONDS - START) )); }
# timeout for a command: what is left of the call, at most $1 seconds
budget() { local l; l=$(left); (( l > $1 )) && l=$1; (( l < 30 )) && l=30; echo "$l"; }
has_module() { python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
throughput_cmd() { echo "python3 bench/throughput.py ${REPLAY[$1]} --mode both --csv $REPLAY_CSV --time-budget $2"; }

limit_out() {  # at most MAX_OUT_FILES files in $OUT: pack the logs, then everything, into one archive
  local n; n=$(find "$OUT" -type f | wc -l)
  (( n <= MAX_OUT_FILES )) && return 0
  (cd "$OUT" && tar czf lab_logs.tar.gz --remove-files $(find . -type f \( -name '*.log' -o -name '*.xml' \) \
    -printf '%P\n'))
  n=$(find "$OUT" -type f | wc -l)
  if (( n > MAX_OUT_FILES )); then
    (cd "$OUT" && tar czf ../lab_out.tar.gz . && find . -mindepth 1 -delete && mv ../lab_out.tar.gz .)
  fi
  echo "packed $OUT into $(find "$OUT" -type f | wc -l) file(s) (limit $MAX_OUT_FILES): $(ls "$OUT" | tr '\n' ' ')"
}

run_pytest() {  # name, pytest args...: full output in $OUT/name.log, junit in $OUT/name.xml, tail on the console
  local name=$1; shift
  local extra=()
  has_module pytest_timeout && extra+=(--timeout="${LAB_TEST_TIMEOUT:-300}")
  local t; t=$(budget 570)
  echo "pytest $* (${t}s at most; full output in $OUT/$name.log)"
  timeout -k 15 -s INT "$t" python3 -m pytest -q -p no:cacheprovider -rfE "${extra[@]}" \
    --junitxml="$OUT/$name.xml" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -25 "$OUT/$name.log"
  (( rc == 124 || rc == 137 )) && echo "pytest stopped by the ${t}s limit: see $OUT/$name.log for how far it got"
  return $rc
}

csrc_hash() { find csrc pe_kernels/cuda setup.py -type f 2>/dev/null | sort | xargs cat 2>/dev/null | sha1sum; }

for stage in "$@"; do   # check every name before spending any device time
  [[ " $STAGES " == *" $stage "* ]] || { echo "unknown stage '$stage'; stages: $STAGES" >&2; exit 2; }
done

status=0
for stage in "$@"; do
  say "stage $stage"
  case "$stage" in
    plan)       # what each stage runs (nothing is run)
      for r in $REPLAY_ORDER; do echo "$r: $(throughput_cmd "$r" $(( CALL_LIMIT - 120 )))"; done
      for l in $LAYERS_ORDER; do echo "$l: pytest bench/bench_layers.py -k \"${LAYERS[$l]}\""; done ;;
    unstash)    # a cold machine: restore what `stash` brought back (carry .lab_state), so `build` is skipped
      if [[ -f .lab_state/lab_state.tgz ]]; then
        tar xzf .lab_state/lab_state.tgz && echo "unstashed: $(tar tzf .lab_state/lab_state.tgz | wc -l) entries"
      else
        echo "nothing to unstash (.lab_state/lab_state.tgz absent)"
      fi ;;
    stash)      # the built _C and the compile caches as one file in $OUT (copy it to .lab_state/ and carry that)
      rel_state=${STATE#$PWD/}; rel_triton=${TRITON_CACHE_DIR#$PWD/}   # relative, so unstash restores in place
      tar czf "$OUT/lab_state.tgz" pe_kernels/_C*.so "$rel_state/csrc.sha1" "$rel_triton" 2>/dev/null \
        || tar czf "$OUT/lab_state.tgz" pe_kernels/_C*.so "$rel_state/csrc.sha1"
      size=$(stat -c %s "$OUT/lab_state.tgz")
      if (( size > 15000000 )); then   # over what one file may bring back: the build alone
        tar czf "$OUT/lab_state.tgz" pe_kernels/_C*.so "$rel_state/csrc.sha1"; size=$(stat -c %s "$OUT/lab_state.tgz")
      fi
      echo "stashed $size bytes in $OUT/lab_state.tgz" ;;
    build)      # the CUDA extension against this machine's torch; stops the script if it fails
      mkdir -p "$STATE"
      if [[ -f "$STATE/csrc.sha1" && "$(cat "$STATE/csrc.sha1")" == "$(csrc_hash)" ]] && python3 -c \
          "import pe_kernels, sys; sys.exit(not pe_kernels.backends()['cuda'].available)" 2>/dev/null; then
        echo "pe_kernels._C already built from this csrc/: build skipped"
      else
        t=$(budget 540)
        echo "pip install -e . (${t}s at most; full output in $OUT/build.log)"
        timeout "$t" python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
        rc=$?
        if (( rc != 0 )); then
          tail -30 "$OUT/build.log"
          die "BUILD FAILED: pip install -e . exited $rc (limit ${t}s); full log in $OUT/build.log" 3
        fi
        tail -3 "$OUT/build.log"
      fi
      python3 -c "
import sys, torch, pe_kernels
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
status = pe_kernels.backends()
print(status)
missing = [f'{n}: {s.reason}' for n, s in status.items() if not s.available]
sys.exit('BUILD FAILED: backend(s) unavailable after the build: ' + '; '.join(missing) if missing else 0)
" || die "BUILD FAILED: pe_kernels imports, but a backend is missing (see the line above)" 3
      csrc_hash > "$STATE/csrc.sha1" ;;
    warmup)     # one step per replay1 cell: fills the Triton / autotune / inductor caches (figures discarded)
      t=$(budget 570)
      timeout -k 15 "$t" python3 bench/throughput.py ${REPLAY[replay1]} --mode both --warmup 0 --steps 1 \
        --infer-images 128 --csv "$(mktemp -d)/warmup.csv" --time-budget $(( t > 90 ? t - 60 : 30 )) \
        > "$OUT/warmup.log" 2>&1 \
        || status=1
      tail -25 "$OUT/warmup.log" ;;
    gpu)        # the tests marked gpu: every backend against cuDNN on the real device
      run_pytest gpu -m gpu || status=1 ;;
    suite)      # the whole suite with compiled Triton and _C (never -x: one failure must not hide the rest);
                # SUITE_ARGS (e.g. "tests/test_triton_conv.py") narrows it; SUITE_SHARD=i/n runs the i-th of n
                # parts (whole files, balanced by test count: tests/conftest.py, PE_KERNELS_TEST_SHARD); SUITE_NAME
                # names its log and junit files (default suite); SUITE_ARGS="-n 12" runs it with pytest-xdist
      if [[ -n ${SUITE_SHARD:-} ]]; then
        [[ $SUITE_SHARD =~ ^[0-9]+/[0-9]+$ ]] || die "SUITE_SHARD must be i/n, e.g. 1/2 (got '$SUITE_SHARD')" 2
        PE_KERNELS_TEST_SHARD=$SUITE_SHARD run_pytest "suite-${SUITE_SHARD/\//of}" ${SUITE_ARGS:-} || status=1
      else
        run_pytest "${SUITE_NAME:-suite}" ${SUITE_ARGS:-} || status=1
      fi ;;
    memcheck|racecheck)   # compute-sanitizer on one fused-block step and one small chained ResNet step of each
      # fast backend; Triton kernels with their first config (autotuning every config under the sanitizer would
      # not fit the call; tests/test_triton_configs.py launches each config in the suite); only for this stage:
      # a later stage of the same call (a replay) keeps its own policy
      for backend in ${SANITIZER_BACKENDS:-cuda triton}; do   # SANITIZER_BACKENDS=triton: one of them
        t=$(budget 280)
        echo "compute-sanitizer --tool $stage ... --backend $backend (${t}s at most)" | tee -a "$OUT/sanitizer.log"
        PE_KERNELS_TRITON_CONFIG=${PE_KERNELS_TRITON_CONFIG:-first} timeout -k 15 "$t" \
          compute-sanitizer --tool "$stage" --error-exitcode 9 python3 tools/sanitize_step.py \
          --backend "$backend" >> "$OUT/sanitizer.log" 2>&1 || { status=1; echo "  failed (rc $?)"; }
        tail -4 "$OUT/sanitizer.log"
      done ;;
    ncu)        # Nsight Compute on the slowest fused layer class's largest case (one steady-state call each)
      for case in $NCU_CASES; do
        IFS=: read -r layer pass provider <<< "$case"
        t=$(budget 200)
        echo "ncu $layer $pass $provider (${t}s at most)" | tee -a "$OUT/ncu.log"
        timeout -k 15 "$t" ncu --profile-from-start off $NCU_SECTIONS python3 tools/ncu_layer.py --layer "$layer" \
          --pass "$pass" --provider "$provider" >> "$OUT/ncu.log" 2>&1 || { status=1; echo "  failed (rc $?)"; }
        grep -E "^  [a-zA-Z_].*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|profiled" \
          "$OUT/ncu.log" | tail -40
      done ;;
    autotune)   # pe_kernels.autotune on the Table 8 models; rows appended per (model, mode, dtype) as each ends
      t=$(budget 570)
      timeout -k 15 "$t" python3 tools/autotune_models.py ${AUTOTUNE_ARGS:-} --csv "$AUTOTUNE_CSV" \
        > "$OUT/autotune.log" 2>&1 || status=1
      tail -30 "$OUT/autotune.log"
      cp "$AUTOTUNE_CSV" "$OUT"/ 2>/dev/null ;;
    replay*)    # Table 8 cells appended to $REPLAY_CSV as each finishes; no cell starts after the budget
      t=$(budget 580)
      timeout -k 15 "$t" $(throughput_cmd "$stage" $(( t - 120 > 60 ? t - 120 : 60 ))) > "$OUT/$stage.log" 2>&1 \
        || status=1
      tail -40 "$OUT/$stage.log"
      python3 bench/plot.py "$REPLAY_CSV" --baseline same --out "$OUT/$(basename "${REPLAY_CSV%.csv}").png" \
        || echo "(no plot yet: see the message above)"
      cp "$REPLAY_CSV" "$OUT"/ 2>/dev/null
      json=$(ls -t "${REPLAY_CSV%.csv}"_*.json 2>/dev/null | head -1)
      [[ -n "$json" ]] && cp "$json" "$OUT"/ ;;
    layers-*)   # per-layer fwd / fwd+bwd benches with roofline; each case appended to $LAYERS_CSV
      t=$(budget 580)
      json="$RESULTS/layers_cuda_$(date -u +%Y%m%dT%H%M%SZ)_$stage.json"
      PE_BENCH_LAYERS_CSV=$LAYERS_CSV timeout -k 15 -s INT "$t" python3 -m pytest bench/bench_layers.py -q \
        -p no:cacheprovider -k "${LAYERS_FILTER:-${LAYERS[$stage]}}" --benchmark-max-time=0.25 \
        --benchmark-json "$json" > "$OUT/$stage.log" 2>&1 || status=1
      tail -15 "$OUT/$stage.log"
      cp "$json" "$LAYERS_CSV" "$OUT"/ 2>/dev/null ;;
  esac
done
limit_out
say "done (status $status)"
exit $status
