"""Static audit of the Triton kernels for Hopper (sm_90) and Ampere (sm_80), offline: no GPU needed.

    python bench/kernel_audit.py                                   # Table 8 models x fp16, bf16, fp32 x sm_90, sm_80
    python bench/kernel_audit.py --csv bench/results/kernel_audit.csv --bytes-csv bench/results/hbm_bytes.csv
    python bench/kernel_audit.py --layers layer1.0.conv1 layer2.0.conv2 --dtypes fp16 --archs 90   # two shapes (CI)
    python bench/kernel_audit.py --check                           # exit 1 if an sm_90 row misses a target
    python bench/kernel_audit.py --check-compile                   # ... a compile target (wgmma, spills, loads)
    python bench/kernel_audit.py --layers-csv layers.csv --dtypes fp16   # per conv layer and pass: the time model
    python bench/kernel_audit.py --steps-csv steps.csv              # per model step (train step, eval forward)

What runs: each model's training step (forward + backward) and eval forward (or, with --layers, each named conv
layer of --layer-model as conv -> BatchNorm -> ReLU, trained and evaluated) through the `triton` backend's real
launchers on CPU tensors of the real shapes (batch 128, 32x32: tools/count_triton_compiles.py's dry run), with a
stand-in driver that reports the target GPU: every launch is compiled by Triton's real pipeline (TTGIR -> PTX ->
cubin, ptxas included) for every config its autotuner may pick, and nothing runs. What a kernel compiles to depends
on launch metadata only (shapes, strides, dtypes, flags), never on values (`count_triton_compiles.py --verify`).

Per compiled kernel x layer shape (CSV, one row each):
  regs, spills        ptxas -v on the kernel's PTX (the ptxas and options Triton uses): registers per thread, spill
                      store bytes summed over the module's functions (noinline helpers included)
  smem_bytes          Triton's shared memory (metadata.shared)
  mma                 wgmma (wgmma.mma_async) | mma.sync | none
  loop                where the loads are counted: `mma` = the innermost PTX loop (a label and the branch back to
                      it) that holds the MMA instructions, `fma` = the innermost loop of fp32 FMAs (an IEEE fp32
                      dot: no tensor cores; the BN apply backward's row loop, by its centred sum's FMA), `kernel` =
                      the whole kernel (no such loop: elementwise kernels)
  scalar_loads        ld.global of one element (2 or 4 bytes) in that loop: not vectorised, not pipelined
  vector_loads        16-byte ld.global (v4.b32, v2.b64, v8.b16) in that loop
  narrow_vector_loads 4- and 8-byte vector ld.global (v2.b16, v2.b32, v4.b16) in that loop
  async_copies        cp.async (global -> shared, pipelined by Triton) in that loop; async_16 of them 16 bytes
  tma_loads           cp.async.bulk.tensor (TMA) in that loop
  flops               the layer's conv FLOPs (2 N P Q K C_g R S) for the conv kernels (fwd, dgrad, wgrad), 0 else
  min_bytes           the launch's compulsory HBM traffic: every tensor argument the kernel reads or writes (its
                      pointer parameter is used in the PTX), once, at its size; dummies and partials included
  floor_us            max(flops / peak, min_bytes / bandwidth) on an H100 SXM5 (bench_layers' datasheet figures:
                      fp16/bf16 dense tensor peak; fp32 with TF32 on at the TF32 peak, else the FP32 peak)
The structural time model (GEMM kernels; documented assumptions, calibrated on one Nsight Compute run of one layer,
not a prediction: a GPU's measured % of roofline replaces it, bench_layers.py):
  exec_flops          the MMA work the launch issues, padding included: masked tile rows / columns / reduction steps
                      (narrow groups, short reductions) and, for the dgrad, the live taps of each stride phase
  programs, waves     the grid's programs, and how many of them the busiest of the 132 SMs runs (ceil(programs / 132))
  occupancy           resident blocks per SM allowed by registers, shared memory and warps (for reading only)
  loop_instrs         PTX instructions in the body of that loop (once); outer_instrs those of the outermost loop
                      holding an MMA when the loop is nested in it (the RECOMPUTE_Y recompute), else 0
  loop_sass           the same loops' SASS instructions (from the cubin, Triton's nvdisasm), outer_sass likewise
  program_instrs      the loop SASS instructions one program executes (iterations x body; the dgrad's busiest phase)
  issue_us            the busiest SM's loop SASS x warps / ISSUE_SASS_PER_SM_S: the time to issue the main loops'
                      instructions (calibrated on the H100's ncu run, where the GEMMs were issue-bound). The busiest
                      SM's share: waves x program_instrs for equal programs; the dgrad's stride phases, which run
                      different tap counts, by their total work in whole programs
  entry_sass          an element-wise kernel's (not a GEMM's) SASS instructions in its own function, each once
  latency_us          an element-wise kernel's issue at ELEMENTWISE_CPI cycles a warp instruction (calibrated on the
                      H100's ncu run of the BN apply backward): the busiest SM's programs x (entry_sass + (steps - 1) x
                      loop_sass) x warps x CPI over its resident warps (elementwise_latency_s)
  tail_steps, tail_us the serial tail of the launch's in-kernel reductions (the statistics merge, the backward's sums,
                      the wgrad's split partials): the steps its last program takes after the last wave while the other
                      SMs idle (two-level sums: the last chunk's steps, an arrival, the level-2 steps), at step times
                      measured by Nsight Compute on an H100 (SUM_STEP_US, MERGE_STEP_US: how they were derived is
                      written beside them)
  struct_us           max(max(exec_flops / peak, min_bytes / bandwidth) * waves * 132 / programs, issue_us, latency_us)
                      + tail_us:
                      every SM at the peak and bandwidth share of one SM (perfect pipelining, no L2 misses beyond
                      min_bytes, no launch cost) or issuing its loops' instructions, the slowest SM deciding, then the
                      reductions' serial tail
  struct_pct          100 * floor_us / struct_us; --check asks >= 75 % of the best config per launch (sm_90, fp16,
                      bf16, TF32)
Rows are deduplicated over (kernel, config, flags, shape, dtype, arch); `launches` counts the launches of the audited
steps that may run that row (an autotuned launch: each of its configs; all models together), `models` names them.

The per-layer table (--layers-csv): every distinct conv layer of --models as conv -> BN -> ReLU (bench_layers.py's
layers and passes: "fwd" the eval forward, "fwdbwd" the training forward + backward), its launches audited apart;
model_us = the sum over the layer's launches of each launch's lowest struct_us (its best config), floor_us =
bench_layers' roofline floor of the layer (its FLOPs; minimal bytes x + w + y, or 3x + 3w + 9y), model_pct =
100 * floor_us / model_us; --check asks >= 75 % on sm_90 (fp16, bf16, TF32). On a GPU, bench_layers.py measures the
same layers: its pct_of_h100_roofline replaces this model.

The step table (--steps-csv, whole models): the same sum over every Triton launch of a model's training step ("train")
or eval forward ("eval"), against the sum of its conv layers' floors (fwdbwd or fwd, times the layers sharing each
shape); the head, the loss and other ATen ops are neither modelled nor floored, a block's residual read is modelled
but not floored (its layer floor counts x + w + y).

The second table (--bytes-csv), HBM bytes per training step of each model (forward + backward, one step), fused vs
eager, under one rule for both sides: every device kernel reads each of its tensor arguments and writes each of its
outputs once (a lower bound: L2 reuse, re-reads of a 3x3 conv's input and cuDNN BatchNorm's second pass over its
input are not counted; allocations and views move nothing). An ATen op is one kernel, except
convolution_backward: one kernel per gradient it computes (dgrad, wgrad, bias), each reading grad_output.
  pe-triton  the dry run's Triton launches (min_bytes each, once per launch) + the ATen ops the step still runs
             (pooling, head, loss, casts), counted by a TorchDispatchMode
  eager      the same model built with the stock path (`use_backend("torch")`: F.conv2d, F.batch_norm, ReLU,
             residual add and their backwards), run on the meta device under the same TorchDispatchMode, converted
             to the dtype (no autocast on meta: the fused side's step runs autocast as the bench does and pays its
             casts of the fp32 weights and input, ~1 % of its bytes; eager's equal casts are not counted: in eager's
             favour)
The ratio pe-triton / eager is the figure of the issue's target (<= 0.6 for PE-(2,4,1)).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "bench", REPO / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

AUDIT_FIELDS = ("kernel", "config", "flags", "shape", "dtype", "arch", "regs", "spills", "smem_bytes", "mma", "loop",
                "scalar_loads", "vector_loads", "narrow_vector_loads", "async_copies", "async_16", "tma_loads",
                "flops", "min_bytes", "floor_us", "programs", "exec_flops", "occupancy", "waves", "loop_instrs",
                "outer_instrs", "loop_sass", "outer_sass", "program_instrs", "issue_us", "entry_sass",
                "latency_us", "tail_steps", "tail_us", "struct_us", "struct_pct", "launches", "models", "git_commit",
                "triton_version")
BYTES_FIELDS = ("model", "dtype", "batch", "side", "triton_launches", "triton_bytes", "aten_ops", "aten_bytes",
                "total_bytes", "ratio_to_eager", "git_commit", "torch_version", "triton_version")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp32-ieee": torch.float32}
DEFAULT_DTYPES = ("fp16", "bf16", "fp32")
ARCHS = (90, 80)
DEFAULT_MODELS = ("single", "pe-2-4-1", "pe-2-4-2")
CI_LAYERS = ("layer1.0.conv1", "layer2.0.conv2")   # a 1x1 and a 3x3 / stride 2 conv of PE-(2,4,1)
GEMM_KERNELS = ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel")
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}   # opt-in shared memory per block (H100, A100)


# ----------------------------------------------------------------------------------------------- compile-only driver

class _CompileOnlyDriver:
    """Triton's active driver for an offline compile: reports `arch` as the current target (and as the device
    index, so each arch has its own JIT cache), launches nothing."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_target(arch: int):
    driver = importlib.import_module("triton.runtime.driver").driver
    previous = getattr(driver, "_active", None)  # None until a driver was first needed (no GPU: never)
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


# ------------------------------------------------------------------------------------------------- reading the PTX

_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_LD_GLOBAL = re.compile(r"\bld\.global(\.[\w:]+)*")
_VEC = re.compile(r"\.v(\d)")
_WIDTH = re.compile(r"\.[bfsu](8|16|32|64)\b")
_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\b")


_FMA = re.compile(r"\bfma\.rn\.f32\b")


def mma_loop(lines: list[str], pattern: re.Pattern = _MMA, innermost: bool = True, label: re.Pattern = _LABEL,
             branch: re.Pattern = _BRANCH) -> Optional[tuple[int, int]]:
    """(first, last) line of the innermost (or, innermost=False, the outermost) loop (a label and a later branch
    back to it) that holds an MMA instruction (or what `pattern` matches); None when no loop holds one. PTX by
    default; SASS with its label and branch patterns."""
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        m = label.match(line.strip())
        if m:
            labels[m.group(1)] = i
        b = branch.search(line)
        if b and b.group(1) in labels:
            loops.append((labels[b.group(1)], i))
    with_mma = [(a, b) for a, b in loops if any(pattern.search(lines[k]) for k in range(a, b + 1))]
    if not with_mma:
        return None
    return (min if innermost else max)(with_mma, key=lambda ab: ab[1] - ab[0])


def load_counts(lines: list[str]) -> dict:
    """Global loads of a stretch of PTX by kind (see the module docstring)."""
    counts = dict(scalar_loads=0, vector_loads=0, narrow_vector_loads=0, async_copies=0, async_16=0, tma_loads=0)
    for line in lines:
        if "cp.async.bulk.tensor" in line:
            counts["tma_loads"] += 1
        elif re.search(r"\bcp\.async\.c[ag]\.shared\.global", line):
            counts["async_copies"] += 1
            counts["async_16"] += bool(re.search(r",\s*(0x10|16)\s*[,;]", line))
        else:
            m = _LD_GLOBAL.search(line)
            if not m:
                continue
            mods = m.group(0)
            vec = _VEC.search(mods)
            width = _WIDTH.search(mods)
            n = int(vec.group(1)) if vec else 1
            nbytes = n * (int(width.group(1)) // 8 if width else 4)
            if n == 1:
                counts["scalar_loads"] += 1
            elif nbytes >= 16:
                counts["vector_loads"] += 1
            else:
                counts["narrow_vector_loads"] += 1
    return counts


def used_params(ptx: str) -> set[int]:
    """Indices of the kernel parameters the PTX reads (ld.param of the .entry's own parameters; a noinline helper
    .func has parameters of its own): what the compiled code path uses."""
    entry = re.search(r"\.entry\s+(\w+)\s*\(", ptx)
    if entry is None:
        raise ValueError("no .entry function in the PTX")
    return {int(m) for m in re.findall(rf"\b{re.escape(entry.group(1))}_param_(\d+)\]", ptx)}


_PTXAS_CACHE: dict = {}


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers of the entry function, spill store bytes summed over the module's functions) from `ptxas -v`, run
    as Triton runs it (its ptxas, --regAllocOptLevel=2, the arch Triton names)."""
    key = (hash(ptx), arch)
    if key in _PTXAS_CACHE:
        return _PTXAS_CACHE[key]
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {log[-2000:]}")
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill stores", log))
    _PTXAS_CACHE[key] = (regs[0] if regs else 0, spills)
    return _PTXAS_CACHE[key]


# ------------------------------------------------------------------------------------------------ one compiled kernel

@dataclass
class Compiled:
    """What the audit reads of one compiled kernel (arch-specific, shape-independent beyond its specialisation)."""
    regs: int
    spills: int
    smem_bytes: int
    mma: str
    loop: str
    loads: dict
    used: set  # indices of the non-constexpr parameters the PTX uses
    loop_instrs: int = 0   # PTX instructions in the body of the innermost MMA (or FMA) loop, once
    outer_instrs: int = 0  # those of the outermost loop holding it, once (inner body included), when it is nested
    loop_sass: int = 0     # the same loops' SASS instructions (what the SM issues); 0 when no SASS could be read
    outer_sass: int = 0
    entry_sass: int = 0    # SASS instructions of the kernel's own function (its loops once; no noinline callee)


def analyse(kernel, arch: int) -> Compiled:
    ptx = kernel.asm["ptx"]
    lines = ptx.splitlines()
    span, loop = mma_loop(lines), "mma"
    if span is None:  # an IEEE fp32 dot compiles to FMAs: its main loop is the innermost loop of FMAs
        span, loop = mma_loop(lines, _FMA), "fma"
    body = lines[span[0]:span[1] + 1] if span else lines
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if re.search(r"\bmma\.sync", ptx) else "none")
    regs, spills = ptxas_usage(ptx, arch)
    outer = mma_loop(lines, _MMA if loop == "mma" else _FMA, innermost=False) if span else None
    gemm = kernel.metadata.name in GEMM_KERNELS
    text = sass_text(kernel) if span or not gemm else None
    loop_sass, outer_sass = sass_loops(text, loop == "mma") if span else (0, 0)
    return Compiled(regs, spills, int(kernel.metadata.shared), mma, loop if span else "kernel", load_counts(body),
                    used_params(ptx), instruction_count(body) if span else 0,
                    instruction_count(lines[outer[0]:outer[1] + 1]) if outer and outer != span else 0,
                    loop_sass, outer_sass if outer and outer != span else 0, 0 if gemm else entry_sass(text))


_SASS_LABEL = re.compile(r"^([A-Za-z_.$][\w.$]*):$")
_SASS_BRANCH = re.compile(r"\bBRA\s+`?\(?([A-Za-z_.$][\w.$]*)")
_SASS_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
_SASS_FMA = re.compile(r"\bFFMA\b")


def sass_text(kernel) -> Optional[str]:
    """The cubin's SASS (Triton's nvdisasm / cuobjdump, bundled with it); None where they cannot run."""
    try:
        from triton.tools.disasm import get_sass
        return get_sass(kernel.asm["cubin"])
    except Exception as exc:  # a missing binary: the model falls back to the PTX counts (SASS_PER_PTX)
        print(f"[kernel_audit] no SASS for {kernel.metadata.name}: {exc}", file=sys.stderr)
        return None


def entry_sass(text: Optional[str]) -> int:
    """SASS instructions of the kernel's own function, each once: those up to its last EXIT (noinline callees are
    laid out after it, and end in RET); 0 without SASS."""
    if text is None:
        return 0
    lines = text.splitlines()
    ends = [i for i, line in enumerate(lines) if "\t" in line and re.search(r"\bEXIT\b", line)]
    return sum(1 for line in lines[:ends[-1] + 1] if "\t" in line) if ends else 0


def sass_loops(text: Optional[str], mma: bool) -> tuple[int, int]:
    """SASS instructions in the innermost and the outermost loop (a label and a later branch back to it) holding an
    HGMMA / HMMA (mma) or FFMA in the cubin's SASS `text`; (0, 0) without SASS or without such a loop. The outer
    count is that of the outermost loop (the same as the inner one unless the loop is nested)."""
    if text is None:
        return 0, 0
    lines = text.splitlines()
    spans = [mma_loop(lines, _SASS_MMA if mma else _SASS_FMA, innermost, _SASS_LABEL, _SASS_BRANCH)
             for innermost in (True, False)]
    if spans[0] is None:
        return 0, 0
    count = lambda ab: sum(1 for k in range(ab[0] + 1, ab[1] + 1) if "\t" in lines[k])  # noqa: E731
    return count(spans[0]), count(spans[1])


def instruction_count(lines: list[str]) -> int:
    """PTX instructions in a stretch of PTX: statements ending in ';' that are not directives or comments."""
    return sum(1 for line in lines if line.strip().endswith(";") and not line.strip().startswith((".", "//")))


def runtime_params(kernel) -> list[str]:
    """The names of the kernel's runtime parameters, in PTX order (constexprs and arguments Triton specialised to a
    constant are not parameters)."""
    constants = {k[0] if isinstance(k, tuple) else k for k in kernel.src.constants}
    return [name for i, (name, ty) in enumerate(kernel.src.signature.items())
            if ty != "constexpr" and i not in constants]


# ----------------------------------------------------------------------------------------------------- launch rows

H100 = None  # bench_layers' datasheet constants (imported lazily)


def _h100():
    global H100
    if H100 is None:
        import bench_layers
        H100 = bench_layers
    return H100


def peak_flops(dtype: torch.dtype, precision: Optional[str]) -> float:
    b = _h100()
    if dtype in (torch.float16, torch.bfloat16):
        return b.H100_FP16_TENSOR_FLOPS
    return b.H100_TF32_TENSOR_FLOPS if precision == "tf32" else b.H100_FP32_FLOPS


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def conv_flops(bound: dict) -> int:
    """2 N P Q K C_g R S of a conv kernel's launch, from its (N, K, P, Q) tensor and its weight."""
    out = bound.get("y_ptr") if "w_ptr" in bound and "x_ptr" in bound and "g_ptr" not in bound else bound.get("g_ptr")
    weight = bound.get("w_ptr", bound.get("dw_ptr"))
    if out is None or weight is None:
        return 0
    n, k, p, q = out.shape
    _, c_g, r, s = weight.shape
    return 2 * n * p * q * k * c_g * r * s


def shape_of(bound: dict) -> str:
    """The launch's shape: a conv's x (N, C, H, W), weight (K, C_g, R, S) and stride; else its first 4-D tensor."""
    x = bound.get("x_ptr")
    weight = bound.get("w_ptr", bound.get("dw_ptr"))
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() == 4 and weight.dim() == 4:
        return (f"x{'x'.join(map(str, x.shape))} w{'x'.join(map(str, weight.shape))} "
                f"s{bound.get('STRIDE_H', 1)}")
    for v in bound.values():
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            return "y" + "x".join(map(str, v.shape))
    return "-"


def dtype_name(bound: dict, meta: dict) -> tuple[str, torch.dtype, Optional[str]]:
    for v in bound.values():
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            dt = v.dtype
            break
    else:
        dt = torch.float32
    precision = meta.get("PRECISION")
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dt, "tf32" if precision == "tf32" else "fp32")
    return name, dt, precision


def config_of(meta: dict) -> str:
    blocks = ",".join(f"{k[6:]}={v}" for k, v in sorted(meta.items()) if k.startswith("BLOCK_") and k != "BLOCK_S")
    return f"{blocks},w{meta.get('num_warps', 4)},s{meta.get('num_stages', 3)}"


def flags_of(meta: dict) -> str:
    """The launch's true constexpr flags, and PACK2 where a program runs two groups (pack_groups)."""
    flags = [k for k, v in sorted(meta.items()) if v is True or (k == "PACK" and v != 1)]
    return "|".join(f"PACK{meta[k]}" if k == "PACK" else k for k in flags) or "-"


def min_bytes(bound: dict, names: list[str], used: set) -> int:
    """Bytes of the distinct tensors (by storage and offset) behind the parameters the compiled kernel uses."""
    seen = set()
    total = 0
    for i, name in enumerate(names):
        v = bound.get(name)
        if i in used and isinstance(v, torch.Tensor):
            key = (v.data_ptr(), v.dtype, tuple(v.shape))
            if key not in seen:
                seen.add(key)
                total += _nbytes(v)
    return total


@dataclass
class Audit:
    """Rows of the audit (deduplicated) and the per-launch bytes of the steps run (for the HBM table)."""
    rows: dict = field(default_factory=dict)
    compiled: dict = field(default_factory=dict)   # (arch, kernel hash) -> Compiled
    launch_bytes: list = field(default_factory=list)   # (kernel, bytes) of each launch (first config's analysis)
    launches: list = field(default_factory=list)   # (step label, launch number, arch, struct_us) per launch x config
    launch_count: int = 0
    model: str = ""
    step: tuple = ()   # (label, dtype, pass) of the step running
    record_bytes: bool = False


def _bind(fn, args: tuple, kwargs: dict) -> dict:
    import inspect
    signature = inspect.signature(fn.fn)
    bound = signature.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
    return dict(bound.arguments)


# The structural time model (H100 SXM5): 132 SMs; occupancy (reported, not used by the model) from 64K registers,
# 228 KiB shared memory (1 KiB reserved per block), 64 warps and 32 blocks per SM.
H100_SMS, SM_REGS, SM_SHARED, BLOCK_RESERVED_SHARED, SM_WARPS, SM_BLOCKS = 132, 65536, 233472, 1024, 64, 32


def blocks_per_sm(regs: int, num_warps: int, smem: int) -> int:
    """Resident blocks per SM allowed by registers, shared memory, warps and the block limit (at least 1)."""
    by_regs = SM_REGS // max(regs * 32 * num_warps, 1)
    by_smem = SM_SHARED // (smem + BLOCK_RESERVED_SHARED)
    return max(1, min(by_regs, by_smem, SM_WARPS // num_warps, SM_BLOCKS))


def _phase_taps(a: int, R: int, pad: int, stride: int, dil: int) -> int:
    """How many filter taps reach the input rows of stride phase a (the dgrad kernel's _phase_taps' T)."""
    return sum(1 for r in range(R) if (a + pad - r * dil) % stride == 0)


def executed_flops(name: str, bound: dict, kwargs: dict, programs: int) -> int:
    """The MMA work a GEMM launch issues, tiles included (masked rows, columns and reduction steps; the dgrad's
    live taps per stride phase), 2 * BLOCK_M * BLOCK_N * BLOCK_K per reduction step; 0 for other kernels."""
    bm, bn, bk = (kwargs.get(k, 0) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    step = 2 * bm * bn * bk
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    if name == "_conv_fwd_kernel":
        return programs * step * cdiv(bound["RSC"], bk)
    if name == "_conv_wgrad_kernel":   # grid (k x j tiles, groups, splits): every (k, j) tile reduces all of M
        tiles = programs // max(cdiv(bound["M"], bound["M_PER_SPLIT"]), 1)
        return tiles * cdiv(bound["M"], bm) * step
    if name == "_conv_dgrad_kernel":
        S, K_g = bound["S"], bound["K_g"]
        R = bound["RSK"] // (S * K_g)
        sh, sw = bound["STRIDE_H"], bound["STRIDE_W"]
        cols = programs // (sh * sw * cdiv(bound["M_PH"], bm))
        total = 0
        for a in range(sh):
            for b in range(sw):
                taps = _phase_taps(a, R, bound["PAD_H"], sh, bound["DIL_H"]) * _phase_taps(
                    b, S, bound["PAD_W"], sw, bound["DIL_W"])
                total += cdiv(bound["M_PH"], bm) * cols * cdiv(taps * K_g, bk)
        return total * step
    return 0


# The serial tail of a launch's in-kernel reductions: after its last wave, one program per column block sums slots
# (or split partials) a step at a time while the other SMs idle. A step's time, from Nsight Compute on an H100
# (bench/results/ncu_cuda_20261123.log: pe-2-4-1 layer1.0.conv2, fp16, batch 128, before the two-level sums), as
# assumptions of the model: a sum step (BLOCK_S slots of each row loaded from L2, summed across warps) 1.25 us -- the
# apply backward's 378 us less its ~58 us of traffic (134 MB at the 2.32 TB/s its forward reached), over its 256
# steps (2 rows x 4096 slots / 32); a statistics merge step (_merge_slots: three loads, four cross-warp sums) 2.95 us
# -- the forward with statistics' 352 us less the same GEMM's 163 us without, over its 64 steps (2048 slots / 32).
# A step of several rows costs one step (their loads are issued together: latency-bound); an arrival between the two
# levels (a store, a barrier, an atomic) one sum step; a wgrad split step (a 64 x 64 fp32 tile) one sum step.
SUM_STEP_US = 1.25
MERGE_STEP_US = 2.95


def _two_level_steps(slots_ph: int, phases: int, block_s: int, chunk: int) -> int:
    """Exposed steps of a two-level reduction (_common.sum_chunks_if_last) over `phases` phases of `slots_ph` slots:
    the last chunk's own steps, then, with more than one chunk, an arrival and the level-2 steps."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    chunks = phases * cdiv(slots_ph, chunk)
    steps = cdiv(min(slots_ph, chunk), block_s)
    return steps + 1 + cdiv(chunks, block_s) if chunks > 1 else steps


def reduction_tail(name: str, bound: dict, kwargs: dict) -> tuple[int, float]:
    """(steps, microseconds) of a launch's serial reduction tail (SUM_STEP_US, MERGE_STEP_US); (0, 0) for a launch
    without in-kernel reductions."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    block_s, chunk = kwargs.get("BLOCK_S", 32), kwargs.get("CHUNK", 64)
    if name == "_conv_fwd_kernel" and kwargs.get("STATS"):
        steps = _two_level_steps(cdiv(bound["M"], kwargs["PART_M"]), 1, block_s, chunk)
        return steps, steps * MERGE_STEP_US
    if name == "_bn_apply_bwd_kernel" and kwargs.get("SUMS"):   # one slot a program of ROWS rows
        steps = _two_level_steps(cdiv(bound["M"], bound["ROWS"]), 1, block_s, chunk)
    elif name == "_conv_dgrad_kernel" and ((kwargs.get("PROLOGUE") and kwargs.get("STATS")) or kwargs.get("TAIL")):
        steps = _two_level_steps(cdiv(bound["M_PH"], kwargs["PART_M"]), bound["STRIDE_H"] * bound["STRIDE_W"],
                                    block_s, chunk)
    elif name == "_sum_slots_kernel":
        steps = _two_level_steps(bound["n_slots"], 1, block_s, chunk)
    elif name == "_conv_wgrad_kernel":   # chunks of SPLIT_CHUNK split partials, then the chunks (with the bias
        split, chunk = cdiv(bound["M"], bound["M_PER_SPLIT"]), bound["SPLIT_CHUNK"]   # partials: each loop twice)
        chunks = cdiv(split, chunk)
        steps = 0 if split == 1 else (min(split, chunk) + (1 + chunks if chunks > 1 else 0))
        steps *= 2 if kwargs.get("BIAS_GRAD") else 1
    else:
        return 0, 0.0
    return steps, steps * SUM_STEP_US


# Issue time of a GEMM's main loop. Nsight Compute on the H100 (the same log and layer as the step times above)
# found the three GEMM launches issue-bound rather than MMA- or memory-bound: 1.8-2.4 warp instructions issued per
# SM cycle, issue slots 38-58 % busy. The model counts the SASS the SM issues (the loops' bodies read from the cubin
# with Triton's nvdisasm: what PTX hides, such as a 32-bit division's ~20 instructions, counts), iterations x body x
# warps on the busiest SM. Compiled with Triton 3.6 as on that GPU (the registers match ncu's: 106, 202, 254), the
# loops' SASS ran at 1.93e9 (forward, 162.9 us: 63 programs x 5 x 250 x 4 warps per SM), 2.44e9 (dgrad forming the
# BatchNorm gradient on load, 719 us) and 3.35e9 (wgrad, 379 us less its ~65 us tail) instructions per SM and second.
# ISSUE_SASS_PER_SM_S is the forward's, the lowest (a launch without a serial tail or an on-load transform): the model
# is pessimistic for the backward (dgrad ~1.3x, wgrad ~1.7x too slow on that layer). Without SASS (no nvdisasm), the
# PTX counts x SASS_PER_PTX (1.2-1.7 on those loops).
ISSUE_SASS_PER_SM_S = 1.93e9
SASS_PER_PTX = 1.4

# Latency of the element-wise kernels (every kernel but the GEMMs). Nsight Compute on the H100
# (bench/results/ncu_cuda_20261124.log, pe-2-4-1 layer1.0.conv2, fp16, batch 128) found the BN apply backward -- one
# 32-row tile a program, five cross-row sums through shared memory, 114 registers -- at 145 us against its 42 us of
# traffic: DRAM 27 % busy, L1/TEX 90 %, 0.77 warp instructions issued per SM cycle, each warp issuing one every
# 20.09 cycles (stalled on shared memory, barriers and loads), 4 blocks of 4 warps resident. The model: each resident
# warp issues one instruction every ELEMENTWISE_CPI cycles at SM_CLOCK_HZ (ncu's SM frequency), the busiest SM running
# its programs' SASS (the kernel's own function once, its row loop once a step) over its resident warps. On that
# launch it gives 131 us with the serial tail (1239 SASS a warp x 32 programs x 20.09 / 16 warps / 1.59 GHz + 6 us):
# 10 % under the measured. The BN apply forward (no cross-row sums; ncu_cuda_20261123.log, the same layer) issued at
# 17.27 cycles a warp instruction and ran at its floor (20.2 us): the stall rate of these kernels is the memory's as
# much as the shared memory's. Assumed, not measured: that the rate holds for every element-wise kernel and tile, and
# that loads in flight are enough for the bandwidth (min_bytes).
ELEMENTWISE_CPI = 20.09
SM_CLOCK_HZ = 1.59e9


def elementwise_latency_s(info, outer_iters: int, programs_on_sm: int, occupancy: int, num_warps: int) -> float:
    """Seconds the busiest SM takes to issue an element-wise kernel's programs at ELEMENTWISE_CPI cycles a warp
    instruction: programs x (the function's SASS + (steps - 1) x its loop's) x warps x CPI over the warps resident
    (occupancy blocks, at most the programs it has); 0 without SASS."""
    program = info.entry_sass + max(outer_iters - 1, 0) * info.loop_sass
    resident = min(max(occupancy, 1), max(programs_on_sm, 1)) * num_warps
    return programs_on_sm * num_warps * program * ELEMENTWISE_CPI / resident / SM_CLOCK_HZ


def loop_iterations(name: str, bound: dict, kwargs: dict, phase: Optional[int] = None) -> tuple[int, int]:
    """(iterations of a GEMM program's outer MMA loop, iterations of its inner loop per outer one: 1 unless the loop
    nests another holding an MMA: the RECOMPUTE_Y recompute of y, C_g channels a step); (0, 0) for other kernels.
    The dgrad: its busiest stride phase (the most live taps), or stride phase `phase` (h % sh) * sw + w % sw."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    bk = kwargs.get("BLOCK_K", 0)
    if name == "_conv_fwd_kernel":
        return cdiv(bound["RSC"], bk), 1
    if name == "_conv_wgrad_kernel":
        inner = cdiv(bound["C_g"], bk) if kwargs.get("RECOMPUTE_Y") else 1
        return cdiv(bound["M_PER_SPLIT"], kwargs["BLOCK_M"]), inner
    if name == "_conv_dgrad_kernel":
        S, K_g = bound["S"], bound["K_g"]
        R = bound["RSK"] // (S * K_g)
        sh, sw = bound["STRIDE_H"], bound["STRIDE_W"]
        phases = [(a, b) for a in range(sh) for b in range(sw)] if phase is None else [divmod(phase, sw)]
        taps = max(_phase_taps(a, R, bound["PAD_H"], sh, bound["DIL_H"]) * _phase_taps(
            b, S, bound["PAD_W"], sw, bound["DIL_W"]) for a, b in phases)
        inner = cdiv(bound["C_g"], kwargs.get("BLOCK_C", 16)) if kwargs.get("RECOMPUTE_Y") else 1
        return cdiv(taps * K_g, bk), inner
    if name == "_bn_apply_bwd_kernel":   # its row loop: ROWS / BLOCK_M steps a program
        return cdiv(bound["ROWS"], kwargs["BLOCK_M"]), 1
    return 0, 0


def program_instructions(info, outer_iters: int, inner_iters: int) -> int:
    """SASS loop instructions a program executes: the innermost MMA loop's body per iteration, and for a nested loop
    the outer body's own instructions (its body less the inner one) per outer iteration. Without SASS (no
    nvdisasm): the PTX counts x SASS_PER_PTX."""
    loop, outer = info.loop_sass, info.outer_sass
    if not loop:
        loop, outer = round(info.loop_instrs * SASS_PER_PTX), round(info.outer_instrs * SASS_PER_PTX)
    if outer:
        return outer_iters * (outer - loop + inner_iters * loop)
    return outer_iters * loop


def busiest_sm_instructions(name: str, bound: dict, kwargs: dict, info, programs: int) -> tuple[int, int]:
    """(SASS loop instructions of the busiest program, of the busiest SM): the SM's share of the launch's loop work in
    whole programs, ceil(total / (SMs x busiest program)) x busiest program -- waves x the program for a grid of equal
    programs; the dgrad's stride phases run different tap counts (a 1x1 stride-2 dgrad's three phases without a live
    tap: programs that only store zeros), each phase a 1/phases share of the grid."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    outer, inner = loop_iterations(name, bound, kwargs)
    busiest = program_instructions(info, outer, inner)
    total = programs * busiest
    if name == "_conv_dgrad_kernel":
        per_phase = [program_instructions(info, *loop_iterations(name, bound, kwargs, phase))
                     for phase in range(bound["STRIDE_H"] * bound["STRIDE_W"])]
        total = programs // len(per_phase) * sum(per_phase)
    return busiest, (cdiv(total, H100_SMS * busiest) * busiest if busiest else 0)


def grid_programs(grid, kwargs: dict, bound: dict) -> int:
    g = grid({**bound, **kwargs}) if callable(grid) else grid
    n = 1
    for v in g:
        n *= int(v)
    return n


def _record(audit: Audit, arch: int, fn, args: tuple, kwargs: dict, original_run, first: bool, grid) -> None:
    kernel = original_run(fn, *args, grid=(1,), warmup=True, **kwargs)
    key = (arch, kernel.hash)
    info = audit.compiled.get(key)
    if info is None:
        info = audit.compiled[key] = analyse(kernel, arch)
    bound = _bind(fn, args, kwargs)
    dname, dt, precision = dtype_name(bound, kwargs)
    name = fn.fn.__name__
    flops = conv_flops(bound) if name in GEMM_KERNELS else 0
    nbytes = min_bytes(bound, runtime_params(kernel), info.used)
    peak, bandwidth = peak_flops(dt, precision), _h100().H100_HBM_BYTES_PER_S
    floor = max(flops / peak, nbytes / bandwidth) * 1e6
    constexprs = {k: v for k, v in kwargs.items()
                  if k in fn.arg_names and fn.params[fn.arg_names.index(k)].is_constexpr}
    constexprs.update(num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))
    programs = grid_programs(grid, kwargs, bound)
    occupancy = blocks_per_sm(info.regs, constexprs["num_warps"], info.smem_bytes)
    waves = -(-programs // H100_SMS)   # programs per SM on the busiest SM
    executed = executed_flops(name, bound, kwargs, programs)
    tail_steps, tail_us = reduction_tail(name, bound, kwargs)
    per_program, per_sm = busiest_sm_instructions(name, bound, kwargs, info, programs)
    issue_s = per_sm * constexprs["num_warps"] / ISSUE_SASS_PER_SM_S   # the busiest SM's programs
    latency_s = 0.0 if name in GEMM_KERNELS else elementwise_latency_s(
        info, loop_iterations(name, bound, kwargs)[0], waves, occupancy, constexprs["num_warps"])
    struct_s = (max(executed / peak * waves * H100_SMS / max(programs, 1),
                    nbytes / bandwidth * waves * H100_SMS / max(programs, 1), issue_s, latency_s) + tail_us * 1e-6)
    model = dict(exec_flops=executed, occupancy=occupancy, waves=waves, loop_instrs=info.loop_instrs,
                 outer_instrs=info.outer_instrs, loop_sass=info.loop_sass, outer_sass=info.outer_sass,
                 program_instrs=per_program, issue_us=round(issue_s * 1e6, 3), entry_sass=info.entry_sass,
                 latency_us=round(latency_s * 1e6, 3),
                 tail_steps=tail_steps, tail_us=round(tail_us, 3), struct_us=round(struct_s * 1e6, 3),
                 struct_pct=round(100 * floor / (struct_s * 1e6), 1) if struct_s > 0 else "")
    if first:
        audit.launch_count += 1
    audit.launches.append((audit.step, audit.launch_count, arch, struct_s * 1e6))
    row_key = (name, config_of(constexprs), flags_of(constexprs), shape_of(bound), dname, arch)
    row = audit.rows.get(row_key)
    if row is None:
        row = audit.rows[row_key] = dict(
            zip(("kernel", "config", "flags", "shape", "dtype", "arch"), row_key), regs=info.regs,
            spills=info.spills, smem_bytes=info.smem_bytes, mma=info.mma, loop=info.loop, **info.loads, flops=flops,
            min_bytes=nbytes, floor_us=round(floor, 3), programs=programs, **model, launches=0, models=set())
    row["launches"] += 1   # every launch of an autotuned kernel may run with any of its configs
    if audit.model:
        row["models"].add(audit.model)
    if first and audit.record_bytes:
        audit.launch_bytes.append((name, nbytes))


@contextlib.contextmanager
def compiling_launches(audit: Audit, arch: int):
    """Inside the block, every Triton launch compiles (each autotune config) for `arch` and is audited; nothing
    runs."""
    from triton.runtime import autotuner, jit

    original_run = jit.JITFunction.run

    def jit_run(self, *args, grid, warmup, **kwargs):
        _record(audit, arch, self, args, kwargs, original_run, True, grid)

    def tuned_run(self, *args, grid=None, warmup=False, **kwargs):
        from pe_kernels.triton._common import tried_configs
        for i, config in enumerate(tried_configs(self, args, kwargs)):   # the configs the autotuner may pick
            _record(audit, arch, self.fn, args, {**kwargs, **config.all_kwargs()}, original_run, i == 0, grid)

    saved = jit.JITFunction.run, autotuner.Autotuner.run
    jit.JITFunction.run, autotuner.Autotuner.run = jit_run, tuned_run
    try:
        with compile_target(arch):
            yield audit
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = saved


# ----------------------------------------------------------------------------------------------------- what runs

def _amp(dtype: str) -> Optional[torch.dtype]:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)


@contextlib.contextmanager
def _precision(dtype: str):
    """fp32 convolutions in TF32 (torch's default, cudnn.allow_tf32) or, for "fp32-ieee", in IEEE fp32."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = saved if dtype != "fp32-ieee" else False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def model_step(model_name: str, dtype: str, batch: int, image: int, train: bool = True,
               evaluate: bool = True) -> Callable[[], None]:
    """A training step and / or an eval forward of a Table 8 model through the triton backend (dry: nothing runs)."""
    from count_triton_compiles import run_step

    from pe_kernels.models.registry import get_model

    entry = get_model(model_name)
    torch.manual_seed(0)
    model = entry.build(100)

    def run():
        with _precision(dtype):
            run_step(model, entry.format_batch, _amp(dtype), batch, image, train, evaluate)
    return run


def layer_step(model_name: str, layer_name: str, dtype: str, batch: int,
               passes: tuple = ("fwdbwd", "fwd")) -> Callable[[], None]:
    """bench_layers.py's pe-triton case of one conv shape of a Table 8 model (its layer_fn: conv -> BatchNorm -> ReLU
    in the dtype, NCHW input): a training forward + backward ("fwdbwd"), then an eval forward ("fwd"), or the
    `passes` named."""
    import bench_layers

    layers = {layer.name: layer for layer in bench_layers.conv_layers(model_name)}
    if layer_name not in layers:
        raise ValueError(f"{model_name} has no conv layer {layer_name!r}; its layers: {', '.join(layers)}")
    layer = layers[layer_name]

    def run():
        for pass_ in passes:
            x = torch.randn(batch, layer.in_channels, layer.size, layer.size, dtype=DTYPES[dtype])
            with _precision(dtype):
                bench_layers.layer_fn(layer, "pe-triton", pass_, x, DTYPES[dtype])()
    return run


def audit_steps(steps: list[tuple[str, str, Callable[[], None], str]], archs, audit: Audit,
                progress: Callable[[str], None]) -> Audit:
    """Run each (label, dtype, step, pass) on each arch with every launch compiled and audited."""
    from count_triton_compiles import triton_on_cpu_tensors

    for arch in archs:
        for label, dtype, step, pass_ in steps:
            progress(f"sm_{arch} {label} {pass_} {dtype}")
            audit.model, audit.step = label, (label, dtype, pass_)
            with torch.inference_mode(False), triton_on_cpu_tensors(), compiling_launches(audit, arch):
                step()
    return audit


# ------------------------------------------------------------------------------------------ per-layer time model

LAYER_FIELDS = ("model", "layer", "pass", "dtype", "arch", "count", "batch", "launches", "floor_us", "model_us",
                "model_pct", "git_commit", "triton_version")
_ELEMENT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp32-ieee": 4}


def layer_table_steps(models, dtypes, batch: int) -> list:
    """Every distinct conv layer of `models` (bench_layers.conv_layers) as conv -> BN -> ReLU, eval forward ("fwd") and
    training forward + backward ("fwdbwd") apart: the layers and passes bench_layers.py times on a GPU."""
    import bench_layers

    steps = []
    for model_name in models:
        for layer in bench_layers.conv_layers(model_name):
            for pass_ in ("fwd", "fwdbwd"):
                for dtype in dtypes:
                    steps.append((f"{model_name}:{layer.name}", dtype,
                                  layer_step(model_name, layer.name, dtype, batch, (pass_,)), pass_))
    return steps


def layer_rows(audit: Audit, batch: int) -> list[dict]:
    """Per layer, pass, dtype and arch: the structural model's time of the layer's launches (each at its best config:
    the one of lowest struct_us), beside bench_layers' roofline floor of the layer (its FLOPs and minimal traffic:
    x + w + y for fwd, 3x + 3w + 9y for fwdbwd); model_pct = 100 * floor / model. On a GPU, bench_layers.py measures
    the same layers and passes: its pct_of_h100_roofline is the measured figure this model stands in for."""
    import bench_layers

    layers = {}
    prov = _provenance()
    rows = []
    for ((label, dtype, pass_), arch), (model_us, launches) in sorted(step_totals(audit).items()):
        if ":" not in label:
            continue   # a whole model's step (step_rows)
        model_name, layer_name = label.split(":")
        if model_name not in layers:
            layers[model_name] = {layer.name: layer for layer in bench_layers.conv_layers(model_name)}
        layer = layers[model_name][layer_name]
        floor_us = layer_floor_us(layer, batch, pass_, dtype)
        rows.append(dict(model=model_name, layer=layer_name, dtype=dtype, arch=arch, count=layer.count, batch=batch,
                         launches=launches, floor_us=round(floor_us, 3), model_us=round(model_us, 3),
                         model_pct=round(100 * floor_us / model_us, 1), **{"pass": pass_},
                         git_commit=prov["git_commit"], triton_version=prov["triton_version"]))
    return rows


def step_totals(audit: Audit) -> dict:
    """(step, arch) -> [modelled time, launches]: the sum over the step's launches of each launch's lowest struct_us
    (its best config)."""
    best: dict = {}
    for step, number, arch, struct_us in audit.launches:
        key = (step, arch, number)
        best[key] = min(best.get(key, struct_us), struct_us)
    totals: dict = collections.defaultdict(lambda: [0.0, 0])
    for (step, arch, _), t in best.items():
        totals[(step, arch)][0] += t
        totals[(step, arch)][1] += 1
    return totals


def layer_floor_us(layer, batch: int, pass_: str, dtype: str) -> float:
    """bench_layers' roofline floor of a conv -> BN -> ReLU layer and pass, in microseconds."""
    import bench_layers

    flops, nbytes = bench_layers.flops_and_bytes(layer, batch, layer.size, pass_, _ELEMENT_SIZE[dtype])
    peak = peak_flops(DTYPES[dtype], "ieee" if dtype == "fp32-ieee" else "tf32")
    return max(flops / peak, nbytes / _h100().H100_HBM_BYTES_PER_S) * 1e6


STEP_FIELDS = ("model", "pass", "dtype", "arch", "batch", "launches", "floor_us", "model_us", "model_pct",
               "git_commit", "triton_version")


def step_rows(audit: Audit, batch: int) -> list[dict]:
    """Per model step ("train": a training step, "eval": an eval forward), dtype and arch: the structural model of all
    its Triton launches (each at its best config) against the sum of its conv layers' roofline floors (bench_layers'
    fwdbwd or fwd floor of each distinct layer, times how many layers share it; ATen ops such as the head and the
    loss are neither modelled nor floored)."""
    import bench_layers

    prov = _provenance()
    rows = []
    for ((label, dtype, pass_), arch), (model_us, launches) in sorted(step_totals(audit).items()):
        if ":" in label or pass_ not in ("train", "eval"):
            continue
        layer_pass = "fwdbwd" if pass_ == "train" else "fwd"
        floor_us = sum(layer.count * layer_floor_us(layer, batch, layer_pass, dtype)
                       for layer in bench_layers.conv_layers(label))
        rows.append(dict(model=label, dtype=dtype, arch=arch, batch=batch, launches=launches,
                         floor_us=round(floor_us, 3), model_us=round(model_us, 3),
                         model_pct=round(100 * floor_us / model_us, 1), **{"pass": pass_},
                         git_commit=prov["git_commit"], triton_version=prov["triton_version"]))
    return rows


def layer_misses(rows: list[dict]) -> list[str]:
    """sm_90 layers (fp16, bf16, fp32 with TF32) whose modelled time is above floor / 75 %."""
    return [f"{r['model']} {r['layer']} {r['pass']} {r['dtype']}: modelled at {r['model_pct']} % of its roofline floor"
            for r in rows if r["arch"] == 90 and r["dtype"] != "fp32-ieee" and r["model_pct"] < STRUCT_TARGET_PCT]


# ------------------------------------------------------------------------------------------- HBM bytes per step

_FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "resize_", "set_", "_local_scalar_dense"}


class AtenBytes(TorchDispatchMode):
    """Counts the ATen ops a block runs and their HBM bytes: each distinct tensor input read once, each distinct
    output written once (an in-place op: both); views, allocations and non-ATen ops (the package's custom ops, whose
    kernels are counted at their launches) move nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.namespace != "aten" or func.is_view or name in _FREE_OPS:
            return out
        if name == "convolution_backward":
            nbytes = _conv_backward_bytes(args, out)
        else:
            flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
            flat_out = torch.utils._pytree.tree_leaves(out)
            nbytes = sum(_nbytes(t) for t in _distinct(flat_in)) + sum(_nbytes(t) for t in _distinct(flat_out))
        self.ops += 1
        self.bytes += nbytes
        self.by_op[name] += nbytes
        return out


def _conv_backward_bytes(args: tuple, out: tuple) -> int:
    """aten.convolution_backward(grad_output, input, weight, ..., output_mask) runs one kernel per gradient it
    computes (cuDNN: dgrad, wgrad, and a reduction for the bias), each reading grad_output: dgrad reads grad_output and
    the weight and writes grad_input; wgrad reads grad_output and the input and writes grad_weight; the bias
    gradient reads grad_output and writes grad_bias."""
    grad_output, inp, weight = args[0], args[1], args[2]
    mask = args[-1]
    reads = ((grad_output, weight), (grad_output, inp), (grad_output,))
    total = 0
    for needed, result, operands in zip(mask, out, reads):
        if needed and isinstance(result, torch.Tensor):
            total += sum(_nbytes(t) for t in operands) + _nbytes(result)
    return total


def _distinct(values) -> list:
    seen = set()
    tensors = []
    for v in values:
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            tensors.append(v)
    return tensors


def eager_step_bytes(model_name: str, dtype: str, batch: int, image: int) -> AtenBytes:
    """The stock model's training step (use_backend("torch"): F.conv2d, F.batch_norm, ReLU, ... and their backwards)
    on the meta device, its ATen ops counted by AtenBytes."""
    import torch.nn.functional as F

    import pe_kernels
    from pe_kernels.models.registry import get_model

    entry = get_model(model_name)
    torch.manual_seed(0)
    model = entry.build(100).to(device="meta", dtype=DTYPES[dtype])
    x = torch.empty(batch, 3, image, image, device="meta", dtype=DTYPES[dtype])
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    counter = AtenBytes()
    model.train()
    inputs, targets = entry.format_batch(x, y)
    with pe_kernels.use_backend("torch"), counter:
        out = model(inputs).float()
        loss = F.cross_entropy(out, targets) if out.dim() == 2 else out.square().mean()
        loss.backward()
    return counter


class _TorchSeeingNoMode:
    """Stands in for the `torch` module in the package's modules that check for a TorchDispatchMode
    (`torch._C._len_torch_dispatch_stack()`: an active mode sends the ops through torch.library's composed path): they
    see none, so AtenBytes counts the ATen ops of the path a user's step takes. Everything else is torch's own."""

    class _C:
        @staticmethod
        def _len_torch_dispatch_stack():
            return 0

        def __getattr__(self, name):
            return getattr(torch._C, name)

    def __init__(self) -> None:
        self._C = _TorchSeeingNoMode._C()

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _package_sees_no_mode():
    import pe_kernels.functional
    import pe_kernels.ops._common

    modules = (pe_kernels.ops._common, pe_kernels.functional)
    for module in modules:
        if module.torch is not torch:
            raise RuntimeError(f"{module.__name__}.torch is not the torch module: update kernel_audit's stand-in")
        module.torch = _TorchSeeingNoMode()
    try:
        yield
    finally:
        for module in modules:
            module.torch = torch


def fused_step_bytes(model_name: str, dtype: str, batch: int, image: int, audit: Audit) -> tuple[AtenBytes, list]:
    """The model's training step through the triton backend (dry): ((its ATen ops, counted by AtenBytes), [(kernel,
    min_bytes) per Triton launch]) (sm_90 compiles, mostly cached by the audit before it). Checked: the step launches
    the same kernels, as many times each, as a step without the counter (count_triton_compiles' dry run)."""
    from count_triton_compiles import CompileLog, dry_launches, run_step, triton_on_cpu_tensors

    from pe_kernels.models.registry import get_model

    _h100()  # imported now: bench_layers builds models at its import, which the counter must not see
    entry = get_model(model_name)
    plain = CompileLog()
    for counted in (False, True):
        torch.manual_seed(0)
        model = entry.build(100)
        counter = AtenBytes()
        audit.launch_bytes = []
        audit.record_bytes, audit.model, audit.step = counted, "", (model_name, dtype, "bytes")
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(triton_on_cpu_tensors())
                if counted:
                    stack.enter_context(compiling_launches(audit, 90))
                    stack.enter_context(_package_sees_no_mode())
                    stack.enter_context(counter)
                else:
                    stack.enter_context(dry_launches(plain))
                with _precision(dtype):
                    run_step(model, entry.format_batch, _amp(dtype), batch, image, train=True, evaluate=False)
        finally:
            audit.record_bytes = False
    counted_launches = collections.Counter(name for name, _ in audit.launch_bytes)
    if counted_launches != collections.Counter(plain.launches):
        raise RuntimeError(f"{model_name} {dtype}: the step counted for its bytes launched {dict(counted_launches)}, "
                           f"a plain dry step {dict(plain.launches)}: the byte counter changed the path")
    return counter, list(audit.launch_bytes)


def bytes_rows(models, dtypes, batch: int, image: int, audit: Audit, progress) -> list[dict]:
    rows = []
    prov = _provenance()
    for model_name in models:
        for dtype in dtypes:
            progress(f"HBM bytes {model_name} {dtype}")
            eager = eager_step_bytes(model_name, dtype, batch, image)
            aten, launches = fused_step_bytes(model_name, dtype, batch, image, audit)
            triton_bytes = sum(b for _, b in launches)
            fused_total = triton_bytes + aten.bytes
            common = dict(model=model_name, dtype=dtype, batch=batch, **prov)
            rows.append(dict(common, side="pe-triton", triton_launches=len(launches), triton_bytes=triton_bytes,
                             aten_ops=aten.ops, aten_bytes=aten.bytes, total_bytes=fused_total,
                             ratio_to_eager=round(fused_total / max(eager.bytes, 1), 4)))
            rows.append(dict(common, side="eager", triton_launches=0, triton_bytes=0, aten_ops=eager.ops,
                             aten_bytes=eager.bytes, total_bytes=eager.bytes, ratio_to_eager=1.0))
    return rows


# ----------------------------------------------------------------------------------------------- targets, output

_ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "tf32": 4, "fp32": 4}


def narrow_rows(row: dict) -> bool:
    """True when a conv kernel's operand rows are narrower than a 16-byte vector or not a multiple of one, so that no
    vector load is possible without padding channels: the stem's 3 input channels (6 or 12 bytes a pixel). The
    fwd and wgrad read x rows of C_g channels, the dgrad reads grad rows of K_g channels and weight rows of C_g."""
    m = re.match(r"x\d+x(\d+)x\d+x\d+ w(\d+)x(\d+)x\d+x\d+ s\d+", row["shape"])
    if not m:
        return False
    C, K, C_g = (int(v) for v in m.groups())
    K_g = K // (C // C_g)
    width = _ELEMENT_BYTES[row["dtype"]]
    channels = (K_g, C_g) if row["kernel"] == "_conv_dgrad_kernel" else (C_g,)
    return any(c * width % 16 for c in channels)


TARGET_DTYPES = ("fp16", "bf16", "tf32")   # the Table 8 precisions (fp32 rows run TF32 by torch's default)


def violations(rows: list[dict]) -> list[str]:
    """The sm_90 rows of the Table 8 precisions (TARGET_DTYPES; IEEE fp32, an FMA path, is reported, not held to them)
    that miss the issue's targets: a GEMM kernel (fwd, dgrad, wgrad) without wgmma, with a scalar global load in its
    MMA loop (unless its operand rows cannot be vectorised: narrow_rows); any kernel that spills or needs more shared
    memory than an H100 block may have."""
    found = []
    for r in rows:
        if r["arch"] != 90 or r["dtype"] not in TARGET_DTYPES:
            continue
        where = f"{r['kernel']} [{r['config']}] {r['flags']} {r['shape']} {r['dtype']}"
        if r["spills"] > 0:
            found.append(f"{where}: spills {r['spills']} bytes")
        if r["smem_bytes"] > SHARED_LIMIT[90]:
            found.append(f"{where}: {r['smem_bytes']} bytes of shared memory > {SHARED_LIMIT[90]}")
        if r["kernel"] in GEMM_KERNELS:
            if r["mma"] != "wgmma":
                found.append(f"{where}: {r['mma']} instead of wgmma")
            if r["scalar_loads"] > 0 and not narrow_rows(r):
                found.append(f"{where}: {r['scalar_loads']} scalar global loads in its {r['loop']} loop")
    return found


STRUCT_TARGET_PCT = 75.0


def best_configs(rows: list[dict]) -> list[dict]:
    """Per GEMM launch (kernel, flags, shape, dtype, arch): the row of its config with the highest struct_pct, the one
    an autotuner that met the structural model would keep."""
    best: dict = {}
    for r in rows:
        if r["kernel"] not in GEMM_KERNELS or r.get("struct_pct") in (None, ""):
            continue
        key = (r["kernel"], r["flags"], r["shape"], r["dtype"], r["arch"])
        if key not in best or float(r["struct_pct"]) > float(best[key]["struct_pct"]):
            best[key] = r
    return list(best.values())


def model_misses(rows: list[dict]) -> list[str]:
    """sm_90 GEMM launches (TARGET_DTYPES) whose best config's structural time (struct_us) is above floor_us / 75 %."""
    return [f"{r['kernel']} {r['flags']} {r['shape']} {r['dtype']}: structural model {r['struct_pct']} % of the "
            f"roofline floor (best config {r['config']})"
            for r in best_configs(rows)
            if r["arch"] == 90 and r["dtype"] in TARGET_DTYPES and float(r["struct_pct"]) < STRUCT_TARGET_PCT]


def pct_summary(title: str, rows: list[dict], group_by: tuple, pct: str, count_name: str,
                describe: Callable[[dict], str]) -> str:
    """Lines of `title`, then per group of rows (by the `group_by` fields): how many, the lowest and the median
    `pct`, and `describe` of the lowest row."""
    groups: dict = collections.defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in group_by)].append(r)
    lines = [title]
    for key, rs in sorted(groups.items()):
        pcts = sorted(float(r[pct]) for r in rs)
        worst = min(rs, key=lambda r: float(r[pct]))
        lines.append(f"  {' '.join(f'{k:9s}' for k in map(str, key))} {count_name} {len(rs):3d}  min {pcts[0]:5.1f}  "
                     f"median {pcts[len(pcts) // 2]:5.1f}  (lowest: {describe(worst)})")
    return "\n".join(lines)


def model_summary(rows: list[dict]) -> str:
    """Per GEMM kernel and dtype on sm_90: the lowest and the median struct_pct over its launches (best configs)."""
    return pct_summary("structural model, % of the roofline floor (best config per launch, sm_90):",
                       [r for r in best_configs(rows) if r["arch"] == 90], ("kernel", "dtype"), "struct_pct",
                       "launches", lambda r: f"{r['shape']} {r['flags']}")


def layer_summary(rows: list[dict]) -> str:
    """Per model, pass, dtype (sm_90): the lowest and the median modelled % of a layer's roofline floor."""
    return pct_summary("per-layer time model, % of the layer's roofline floor (sm_90):",
                       [r for r in rows if r["arch"] == 90], ("model", "pass", "dtype"), "model_pct", "layers",
                       lambda r: r["layer"])


def summary(rows: list[dict]) -> str:
    """Per kernel, dtype and arch: rows, MMA kinds, worst spills, registers, loads in the MMA loop, shared memory."""
    groups: dict = collections.defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["dtype"], r["arch"])].append(r)
    lines = [f"{'kernel':24s} {'dtype':5s} {'arch':>5s} {'rows':>4s} {'mma':>15s} {'spill max':>9s} {'regs max':>8s} "
             f"{'scalar':>6s} {'vec16':>5s} {'async':>5s} {'smem max':>8s}"]
    for (kernel, dtype, arch), rs in sorted(groups.items()):
        mmas = "/".join(sorted({r["mma"] for r in rs}))
        lines.append(f"{kernel:24s} {dtype:5s} {'sm_' + str(arch):>5s} {len(rs):4d} {mmas:>15s} "
                     f"{max(r['spills'] for r in rs):9d} {max(r['regs'] for r in rs):8d} "
                     f"{max(r['scalar_loads'] for r in rs):6d} {max(r['vector_loads'] for r in rs):5d} "
                     f"{max(r['async_copies'] for r in rs):5d} {max(r['smem_bytes'] for r in rs):8d}")
    return "\n".join(lines)


def _provenance() -> dict:
    import bench_layers
    return bench_layers.provenance()


def write_csv(path: Path, fields, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)


def audit_rows(audit: Audit) -> list[dict]:
    prov = _provenance()
    rows = []
    for key in sorted(audit.rows, key=lambda k: (k[0], k[4], k[5], k[3], k[1], k[2])):
        r = dict(audit.rows[key])
        r["models"] = " ".join(sorted(r["models"]))
        rows.append(dict(r, git_commit=prov["git_commit"], triton_version=prov["triton_version"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="Table 8 models whose training "
                        "step and eval forward are audited (default: %(default)s)")
    parser.add_argument("--layers", nargs="+", metavar="NAME",
                        help="audit these conv layers of --layer-model (conv -> BN -> ReLU) instead of whole models")
    parser.add_argument("--layer-model", default="pe-2-4-1")
    parser.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES), choices=list(DTYPES),
                        help="fp16/bf16: autocast as the bench's rows; fp32 with TF32 as torch allows it (by default, "
                        "on); fp32-ieee with TF32 off (default: %(default)s)")
    parser.add_argument("--archs", nargs="+", type=int, default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--csv", type=Path, help="write the per-kernel table here")
    parser.add_argument("--bytes-csv", type=Path, help="also model HBM bytes per training step (fused vs eager) of "
                        "--models and write that table here")
    parser.add_argument("--check", action="store_true", help="exit 1 when an sm_90 row of fp16, bf16 or TF32 misses "
                        "a target (the compile targets and the time model's 75 %%)")
    parser.add_argument("--check-compile", action="store_true", help="exit 1 when an sm_90 row of fp16, bf16 or TF32 "
                        "misses a compile target (wgmma, no spills, no scalar loads in an MMA loop, shared memory)")
    parser.add_argument("--bytes-only", action="store_true", help="only the HBM-bytes table (with --bytes-csv)")
    parser.add_argument("--steps-csv", type=Path, help="with whole models: the step model (train step, eval forward) "
                        "written here")
    parser.add_argument("--layers-csv", type=Path, help="instead of whole models: every conv layer of --models, eval "
                        "and training passes apart, and the per-layer time model written here (bench_layers' layers)")
    args = parser.parse_args(argv)

    # The launchers must take their GPU code path: pe_kernels.triton reads TRITON_INTERPRET once, at its import (below).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud (silences its warning)
    import pe_kernels.triton._common as common
    if common.INTERPRET:
        raise SystemExit("pe_kernels.triton was imported under TRITON_INTERPRET=1; run this script in a fresh process")

    def progress(msg: str) -> None:
        print(f"[kernel_audit] {msg}", file=sys.stderr, flush=True)

    if args.bytes_only and not args.bytes_csv:
        parser.error("--bytes-only needs --bytes-csv")
    if args.layers_csv:
        steps = layer_table_steps(args.models, args.dtypes, args.batch)
    elif args.layers:
        steps = [(f"{args.layer_model}:{name}", dtype, layer_step(args.layer_model, name, dtype, args.batch), "both")
                 for name in args.layers for dtype in args.dtypes]
    else:   # each model's training step and eval forward apart (the step model's two passes)
        steps = [(model, dtype, model_step(model, dtype, args.batch, args.image, pass_ == "train",
                                           pass_ == "eval"), pass_)
                 for model in args.models for dtype in args.dtypes for pass_ in ("train", "eval")]
    audit = audit_steps(steps if not args.bytes_only else [], args.archs, Audit(), progress)
    rows = audit_rows(audit)
    if rows:
        print(summary(rows))
        print(model_summary(rows))
    if args.csv:
        write_csv(args.csv, AUDIT_FIELDS, rows)
        print(f"wrote {len(rows)} rows to {args.csv}")
    srows = step_rows(audit, args.batch)
    if srows:
        print(pct_summary("step model, % of the sum of the step's conv layers' roofline floors (sm_90):",
                          [r for r in srows if r["arch"] == 90], ("model", "pass", "dtype"), "model_pct",
                          "rows", lambda r: f"{r['launches']} launches"))
    if args.steps_csv:
        write_csv(args.steps_csv, STEP_FIELDS, srows)
        print(f"wrote {len(srows)} rows to {args.steps_csv}")
    if args.bytes_csv:
        brows = bytes_rows(args.models, args.dtypes, args.batch, args.image, audit, progress)
        write_csv(args.bytes_csv, BYTES_FIELDS, brows)
        for r in brows:
            print(f"{r['model']:10s} {r['dtype']:5s} {r['side']:10s} {r['total_bytes'] / 1e9:8.2f} GB "
                  f"(triton {r['triton_bytes'] / 1e9:.2f}, aten {r['aten_bytes'] / 1e9:.2f}) "
                  f"ratio {r['ratio_to_eager']}")
        print(f"wrote {len(brows)} rows to {args.bytes_csv}")
    compile_missed = violations(rows)
    missed = compile_missed + model_misses(rows)
    if args.layers_csv:
        lrows = layer_rows(audit, args.batch)
        write_csv(args.layers_csv, LAYER_FIELDS, lrows)
        print(layer_summary(lrows))
        print(f"wrote {len(lrows)} rows to {args.layers_csv}")
        missed += layer_misses(lrows)
    print(f"{len(missed)} sm_90 fp16 / bf16 / TF32 row(s) miss a target" + (":" if missed else ""))
    for m in missed:
        print("  " + m)
    return 1 if (args.check and missed) or (args.check_compile and compile_missed) else 0


if __name__ == "__main__":
    sys.exit(main())
