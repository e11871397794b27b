"""Count the Triton compiles a Table 8 model's first training step + eval forward triggers, without a GPU.

    python tools/count_triton_compiles.py --model pe-2-4-1 --dtype fp16          # batch 128, 32x32
    python tools/count_triton_compiles.py --model single --dtype fp32 --json

Dry run: the model runs on CPU tensors through the `triton` backend's launchers exactly as on a GPU (GPU tile
choice, autotuned kernels), but no kernel executes: every launch records its compile key and returns, so
outputs are garbage. That is enough because what a launch compiles depends on launch metadata only (shapes,
strides, dtypes, flags), never on tensor values: no launcher or module branches on data (`--verify` checks it:
the launch sequence of a real run under the interpreter equals the dry run's, on a small block).

A compile key is what Triton 3.6 specialises a JITFunction on (tests/test_triton_compile_count.py checks
`specialize` against the installed Triton's own where it can):
  constexpr values (the autotune config's included), pointer dtypes and 16-byte alignment, int arguments'
  type (i32/i64) and, unless `do_not_specialize`, value == 1 and divisibility by 16; num_warps, num_stages.
An autotuned launch counts one key per config: Triton compiles (and benchmarks) every config the first time
it meets an autotune key, so this is an upper bound (a launch whose autotune key is already tuned compiles
only the winner). Autotune keys (key arguments + tensor dtypes) are counted apart: each new one costs a
benchmarking round on the GPU. fp16/bf16 run under CPU autocast, which casts as CUDA autocast does for these
ops: the launch metadata (dtypes, shapes, strides, flags) is the GPU step's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3  # the CUDA backend's default

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                  torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
                  torch.bool: "i1"}


def specialize(value, specialize_value: bool = True, specialize_alignment: bool = True) -> tuple:
    """(type, specialisation) of one non-constexpr argument, as Triton 3.6's specialize_impl gives it."""
    if value is None:
        return ("constexpr", None)
    if isinstance(value, bool):
        return ("u1", None)
    if isinstance(value, int):
        if specialize_value and value == 1:
            return ("constexpr", 1)
        kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return (kind, ("D" if value % 16 == 0 else "") if specialize_value else None)
    if isinstance(value, float):
        return ("fp32", None)
    if isinstance(value, torch.Tensor):
        kind = "*" + _TRITON_DTYPES[value.dtype]
        if not specialize_value:
            return (kind, None)
        return (kind, "D" if specialize_alignment and value.data_ptr() % 16 == 0 else "")
    raise TypeError(f"cannot specialise a kernel argument of type {type(value).__name__}")


def _jit_name(fn) -> str:
    while not hasattr(fn, "params"):  # Autotuner / Heuristics wrap a JITFunction
        fn = fn.fn
    return fn.fn.__name__


def compile_key(fn, args: tuple, kwargs: dict) -> tuple:
    """Everything a JITFunction's compile cache is keyed on, for one launch."""
    signature = inspect.signature(fn.fn)
    bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
    bound.apply_defaults()
    spec = []
    for param in fn.params:
        value = bound.arguments[param.name]
        if param.is_constexpr:
            spec.append(("constexpr", value))
        else:
            spec.append(specialize(value, not param.do_not_specialize,
                                   not getattr(param, "do_not_specialize_on_alignment", False)))
    options = {k: v for k, v in kwargs.items() if k not in signature.parameters and v is not None}
    options.setdefault("num_warps", DEFAULT_NUM_WARPS)
    options.setdefault("num_stages", DEFAULT_NUM_STAGES)
    return tuple(spec), tuple(sorted(options.items()))


def autotune_key(tuner, args: tuple, kwargs: dict) -> tuple:
    """Triton's Autotuner cache key: the `key` arguments, then every tensor argument's dtype."""
    all_args = {**dict(zip(tuner.arg_names, args)), **kwargs}
    all_args = {k: v for k, v in all_args.items() if k in tuner.arg_names}
    key = [all_args[k] for k in tuner.keys if k in all_args]
    key += [str(v.dtype) for v in all_args.values() if hasattr(v, "dtype")]
    return tuple(key)


@dataclasses.dataclass
class CompileLog:
    """What a run launched: distinct compile keys and autotune keys per kernel, launches per kernel."""

    compiles: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(set))
    autotune: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(set))
    launches: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> dict:
        names = sorted(set(self.compiles) | set(self.launches))
        return dict(
            compiles={n: len(self.compiles[n]) for n in names},
            autotune_keys={n: len(self.autotune[n]) for n in names if self.autotune[n]},
            launches={n: self.launches[n] for n in names},
            total_compiles=sum(len(v) for v in self.compiles.values()),
            total_autotune_keys=sum(len(v) for v in self.autotune.values()),
            total_launches=sum(self.launches.values()))


@contextlib.contextmanager
def dry_launches(log: CompileLog):
    """Inside the block, Triton launches record their compile (and autotune) keys and run nothing."""
    from triton.runtime import autotuner, jit

    def record(fn, args, kwargs):
        log.compiles[_jit_name(fn)].add(compile_key(fn, args, kwargs))

    def jit_run(self, *args, grid, warmup, **kwargs):
        log.launches[_jit_name(self)] += 1
        record(self, args, kwargs)

    def tuned_run(self, *args, grid=None, warmup=False, **kwargs):
        name = _jit_name(self)
        log.launches[name] += 1
        if len(self.configs) > 1:  # each autotuner (a kernel may have several wrappers) has its own cache
            log.autotune[name].add((id(self),) + autotune_key(self, args, kwargs))
        from pe_kernels.triton._common import tried_configs
        # a new autotune key compiles (and benchmarks) every config its prune keeps
        for config in tried_configs(self, args, kwargs):
            record(self.fn, args, {**kwargs, **config.all_kwargs()})

    saved = jit.JITFunction.run, autotuner.Autotuner.run
    jit.JITFunction.run, autotuner.Autotuner.run = jit_run, tuned_run
    try:
        yield log
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = saved


@contextlib.contextmanager
def no_launches():
    """Inside the block, Triton launches return at once (nothing recorded, nothing run): what is left of a call is
    the launchers' and the package's own host cost (bench/host_time.py --backend triton-dry)."""
    from triton.runtime import autotuner, jit

    saved = jit.JITFunction.run, autotuner.Autotuner.run
    jit.JITFunction.run = autotuner.Autotuner.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = saved


@contextlib.contextmanager
def triton_on_cpu_tensors():
    """Let the dispatcher send CPU tensors to the `triton` backend (its kernels never run in a dry run)."""
    import pe_kernels
    from pe_kernels import _backend

    original = getattr(_backend, "_call_reason", None)
    if original is None:
        raise RuntimeError("pe_kernels._backend._call_reason is gone: update count_triton_compiles.py's routing")

    def call_reason(name, device, dtype):
        if name == "triton" and device.type == "cpu":
            return None if dtype in _backend.FAST_DTYPES else original(name, device, dtype)
        return original(name, device, dtype)

    _backend._call_reason = call_reason
    try:
        with pe_kernels.use_backend("triton"):
            yield
    finally:
        _backend._call_reason = original


def run_step(model: torch.nn.Module, format_batch: Callable, amp: Optional[torch.dtype], batch: int, image: int,
             train: bool = True, evaluate: bool = True, num_classes: int = 100, channels: int = 3) -> None:
    """One training step's forward + backward, then one eval forward, as bench/throughput.py runs them."""
    x = torch.randn(batch, channels, image, image)
    y = torch.randint(0, num_classes, (batch,))

    def autocast():
        return torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()

    if train:
        model.train()
        inputs, targets = format_batch(x, y)
        with autocast():
            out = model(inputs).float()
        loss = F.cross_entropy(out, targets) if out.dim() == 2 else out.square().mean()
        loss.backward()
    if evaluate:
        model.eval()
        with torch.no_grad(), autocast():
            model(x)


def count(model_name: str = "pe-2-4-1", dtype: str = "fp16", batch: int = 128, image: int = 32,
          train: bool = True, evaluate: bool = True) -> dict:
    """Summary of the compiles (see CompileLog.summary) of one training step + one eval forward."""
    import pe_kernels.triton._common as common
    from pe_kernels.models.registry import get_model

    if common.INTERPRET:
        raise RuntimeError("pe_kernels.triton was imported under TRITON_INTERPRET=1: the launchers took the "
                           "interpreter's code path; run this tool in a fresh process without it")
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype!r}")
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[dtype]
    entry = get_model(model_name)
    torch.manual_seed(0)
    model = entry.build(100)
    log = CompileLog()
    with torch.inference_mode(False), triton_on_cpu_tensors(), dry_launches(log):
        run_step(model, entry.format_batch, amp, batch, image, train, evaluate)
    if not log.launches:
        raise RuntimeError("no Triton launch was recorded: the model did not reach the triton backend")
    return dict(model=model_name, dtype=dtype, batch=batch, image=image, train=train, eval=evaluate,
                **log.summary())


# ---------------------------------------------------------------- data independence of the launch sequence

def _describe(value) -> object:
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(value.stride()), value.data_ptr() % 16 == 0)
    return value


def _verify_worker(out_path: str, model_name: str) -> None:
    """Under the interpreter: a train step + eval forward of `model_name` ('block': a small PE bottleneck; else a
    Table 8 model at batch 2, 8x8), once executing the kernels and once dry; writes both launch sequences
    (kernel, arguments' metadata, grid) to out_path as JSON."""
    from triton.runtime.interpreter import InterpretedFunction

    import pe_kernels
    from pe_kernels.models.registry import get_model
    from pe_kernels.nn import PackedBottleneck

    original = InterpretedFunction.run
    runs = []
    for execute in (True, False):
        seq = []

        def recording_run(self, *args, grid, warmup, **kwargs):
            meta = {k: _describe(v) for k, v in sorted(kwargs.items())}
            g = grid(kwargs) if callable(grid) else grid
            seq.append([self.fn.__name__, [_describe(a) for a in args], meta, list(g)])
            return original(self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

        torch.manual_seed(0)
        InterpretedFunction.run = recording_run
        try:
            with pe_kernels.use_backend("triton"):
                if model_name == "block":
                    block = PackedBottleneck(32, 16, 2, alpha=2, num_estimators=4, gamma=1, conv_bias=False,
                                             dropout_rate=0, groups=1)
                    run_step(block, lambda a, b: (a, b), None, 2, 8, channels=64)
                else:
                    entry = get_model(model_name)
                    run_step(entry.build(100), entry.format_batch, None, 2, 8)
        finally:
            InterpretedFunction.run = original
        runs.append(seq)
    Path(out_path).write_text(json.dumps(runs, default=repr))


def verify_data_independence(model_name: str = "block") -> tuple[bool, int]:
    """(the real and dry launch sequences are equal, number of launches), run in an interpreter subprocess."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seq.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        subprocess.run([sys.executable, __file__, "--verify-worker", out, model_name], env=env, check=True)
        real, dry = json.loads(Path(out).read_text())
    return real == dry, len(real)


# ---------------------------------------------------------------- command line

def _print(summary: dict) -> None:
    print(f"{summary['model']} {summary['dtype']} batch {summary['batch']} {summary['image']}x{summary['image']}: "
          f"{'train step' if summary['train'] else ''}{' + ' if summary['train'] and summary['eval'] else ''}"
          f"{'eval forward' if summary['eval'] else ''}")
    print(f"{'kernel':32s} {'compiles':>9s} {'autotune keys':>14s} {'launches':>9s}")
    for name, n in summary["compiles"].items():
        print(f"{name:32s} {n:9d} {summary['autotune_keys'].get(name, 0):14d} {summary['launches'][name]:9d}")
    print(f"{'total':32s} {summary['total_compiles']:9d} {summary['total_autotune_keys']:14d} "
          f"{summary['total_launches']:9d}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pe-2-4-1", help="Table 8 model name (pe_kernels.models.registry)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="fp16/bf16: autocast, as the fp16 rows of the bench; fp32: plain")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--no-train", action="store_true", help="only the eval forward")
    parser.add_argument("--no-eval", action="store_true", help="only the training step")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--verify", nargs="?", const="block", metavar="MODEL",
                        help="check that the launch sequence does not depend on data: real vs dry run under the "
                             "interpreter, of a small PE block (default) or of MODEL at batch 2, 8x8 (minutes)")
    parser.add_argument("--verify-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.verify_worker:
        # The launchers must take their GPU code path: pe_kernels.triton is imported (below, on first use) with
        # the interpreter off, as it is read once at import. --verify turns it on in a subprocess of its own.
        os.environ.pop("TRITON_INTERPRET", None)
    if args.verify_worker:
        _verify_worker(*args.verify_worker)
        return
    if args.verify:
        same, n = verify_data_independence(args.verify)
        print(f"launch sequence, real vs dry run ({n} launches): {'identical' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit(1)
        return
    summary = count(args.model, args.dtype, args.batch, args.image, not args.no_train, not args.no_eval)
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary)


if __name__ == "__main__":
    main()
