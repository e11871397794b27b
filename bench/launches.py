"""Kernel launches per conv of the Table 8 models: pe_kernels (one backend) beside the stock eager twin, on CPU.

    python bench/launches.py                              # every Table 8 model, pe-triton vs eager, infer + train
    python bench/launches.py --model pe-2-4-1 single --json
    python bench/launches.py --model pe-2-4-1 --top 15    # also the most frequent launching ops

What a GPU step would launch, counted without a GPU (deterministic, so tests/test_launch_count.py asserts it):
* Triton launches, dry (tools/count_triton_compiles.py: each launch records itself and runs nothing; the launch
  sequence does not depend on data, which that tool's --verify checks);
* ATen ops that launch a kernel: from torch.profiler, each innermost aten:: op that is neither a view nor an
  allocation (aten::empty, view, as_strided, ... below). A composite op counts as what it calls (aten::zeros is
  its aten::zero_), an op that calls none counts once. aten::_local_scalar_dense (.item(), float(t), bool(t)) is
  a host sync, counted apart as `syncs` (a CUDA graph cannot capture one).
"inference" is one eval forward under no_grad; "training step" is forward, loss and backward (gradients set to
None before, as optimizer.zero_grad() does; the optimizer is the same for every provider and not counted), after
one warm-up step of each (caches filled, first-call work done). Batch 2, 8x8 images: counts do not depend on size.
pe providers run the model under use_backend(<backend>), eager runs registry.eager_twin(model); both channels_last
(model.to(memory_format=torch.channels_last): NHWC activations, KRSC conv weights, as the bench's providers run),
or in the default layout with --nchw. Between the warm-up and a counted training step every parameter is bumped in
place (p.add_(0), as an optimizer step bumps its version counter), so per-version caches are counted as a training
loop pays them; inference counts a deployed model's repeated forwards (parameters unchanged).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The dry run needs the Triton launchers' GPU code path: pe_kernels.triton must be imported with the interpreter off.
if os.environ.get("TRITON_INTERPRET") == "1" and __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pe_kernels  # noqa: E402
from pe_kernels.models.registry import TABLE8_MODELS, eager_twin, get_model  # noqa: E402

# ATen ops that launch nothing on a GPU: views, allocations, metadata, and no-op calls (an eval dropout).
NOT_LAUNCHES = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::view", "aten::_unsafe_view", "aten::view_as", "aten::as_strided", "aten::as_strided_", "aten::reshape",
    "aten::_reshape_alias",
    "aten::permute", "aten::transpose", "aten::t", "aten::expand", "aten::expand_as", "aten::squeeze",
    "aten::unsqueeze", "aten::select", "aten::slice", "aten::narrow", "aten::unbind", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::flatten", "aten::unflatten", "aten::movedim", "aten::alias",
    "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::resize_", "aten::set_", "aten::contiguous",
    "aten::to", "aten::_to_copy", "aten::result_type", "aten::size", "aten::stride", "aten::numel",
    "aten::is_nonzero", "aten::resolve_conj", "aten::resolve_neg", "aten::requires_grad_", "aten::retain_grad",
    "aten::_has_compatible_shallow_copy_type", "aten::dropout", "aten::feature_dropout", "aten::align_to",
})
SYNC_OPS = frozenset({"aten::_local_scalar_dense"})


def _load_tool(name: str):
    path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pe_kernels_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def aten_launches(events) -> tuple[collections.Counter, int]:
    """(launching ATen ops by name, host syncs) of a profile's CPU events (see the module docstring)."""
    counts: collections.Counter = collections.Counter()
    syncs = 0

    def visit(event) -> int:
        nonlocal syncs
        below = sum(visit(child) for child in event.cpu_children)
        name = event.name
        if name in SYNC_OPS:
            syncs += 1
        if not name.startswith("aten::") or name in NOT_LAUNCHES or below:
            return below
        counts[name] += 1
        return 1

    for event in events:
        if event.cpu_parent is None:
            visit(event)
    return counts, syncs


def _conv_count(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def _run(model, entry, mode: str, x, y) -> None:
    if mode == "train":
        model.zero_grad(set_to_none=True)
        inputs, targets = entry.format_batch(x, y)
        out = model(inputs)
        F.cross_entropy(out.float(), targets).backward()
    else:
        with torch.no_grad():
            model(x)


def count(model_name: str, mode: str, provider: str = "pe-triton", batch: int = 2, image: int = 8,
          channels_last: bool = True) -> dict:
    """Launches of one inference forward or training step of a Table 8 model (module docstring)."""
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    entry = get_model(model_name)
    torch.manual_seed(0)
    model = entry.build(100)
    triton_log = None
    stack = contextlib.ExitStack()
    with stack:
        model = eager_twin(model) if provider == "eager" else model
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if provider == "pe-triton":
            tool = _load_tool("count_triton_compiles")
            triton_log = tool.CompileLog()
            stack.enter_context(tool.triton_on_cpu_tensors())
            stack.enter_context(tool.dry_launches(triton_log))
        elif provider.startswith("pe-"):
            stack.enter_context(pe_kernels.use_backend(provider[3:]))
        elif provider != "eager":
            raise ValueError(f"provider must be eager, pe-triton, pe-torch or pe-auto, got {provider!r}")
        model.train(mode == "train")
        x = torch.randn(batch, 3, image, image)
        y = torch.randint(0, 100, (batch,))
        _run(model, entry, mode, x, y)  # warm-up: caches filled, first-call work done
        if triton_log is not None:
            triton_log.launches.clear()
        if mode == "train":  # what an optimizer step does to the version counters (the caches follow them)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _run(model, entry, mode, x, y)
    aten, syncs = aten_launches(prof.events())
    triton = dict(triton_log.launches) if triton_log is not None else {}
    convs = _conv_count(model)
    total = sum(aten.values()) + sum(triton.values())
    return dict(model=model_name, mode=mode, provider=provider, layout="channels_last" if channels_last else "nchw",
                convs=convs, launches=total,
                per_conv=round(total / convs, 3), triton=sum(triton.values()), aten=sum(aten.values()), syncs=syncs,
                triton_kernels=triton, aten_ops=dict(aten.most_common()))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["all"], choices=tuple(TABLE8_MODELS) + ("all",))
    parser.add_argument("--mode", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--provider", nargs="+", default=["pe-triton", "eager"],
                        choices=["pe-triton", "pe-torch", "pe-auto", "eager"])
    parser.add_argument("--top", type=int, default=0, help="also print the N most frequent launching ops")
    parser.add_argument("--nchw", action="store_true", help="models in the default (NCHW / KCRS) layout instead of "
                                                           "channels_last")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    args = parser.parse_args(argv)
    models = list(TABLE8_MODELS) if "all" in args.model else args.model
    if not args.json:
        print(f"{'model':<14}{'mode':<7}{'provider':<11}{'convs':>6}{'launches':>10}{'per conv':>10}"
              f"{'triton':>8}{'aten':>7}{'syncs':>7}")
    for name in models:
        for mode in args.mode:
            for provider in args.provider:
                row = count(name, mode, provider, channels_last=not args.nchw)
                if args.json:
                    print(json.dumps(row), flush=True)
                    continue
                print(f"{name:<14}{mode:<7}{provider:<11}{row['convs']:>6}{row['launches']:>10}{row['per_conv']:>10.2f}"
                      f"{row['triton']:>8}{row['aten']:>7}{row['syncs']:>7}", flush=True)
                if args.top:
                    top = collections.Counter({**row["aten_ops"], **row["triton_kernels"]}).most_common(args.top)
                    print("    " + ", ".join(f"{k} {v}" for k, v in top))


if __name__ == "__main__":
    main()
