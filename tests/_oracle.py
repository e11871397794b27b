"""The error budget of DESIGN.md, one copy for every kernel test.

    |out - ref64| <= 2 |same - ref64| + atol        elementwise

ref64 is the float64 reference on CPU, `same` the reference in the tested dtype on the tested device (cuDNN /
ATen on a GPU). `assert_budget` takes atol = ATOL[dtype] * max(1, max|ref64|): one rounding of the output in the
dtype. An output that went through a dot (`dot=True`: conv outputs, statistics, gradients) in fp32 on CUDA while
torch.backends.cudnn.allow_tf32 is set (torch's default, followed by the Triton kernels and by cuDNN) had its
operands rounded to TF32's 10 mantissa bits, fp16's: it gets fp16's atol. The interpreter computes fp32 dots
exactly (TF32 is not emulated), so on CPU fp32 keeps its own atol.
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def tf32_active(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an fp32 conv on `device` may round its operands to TF32 under the current torch flags."""
    return dtype == torch.float32 and device.type == "cuda" and bool(torch.backends.cudnn.allow_tf32)


def atol_for(dtype: torch.dtype, device: torch.device, dot: bool = False) -> float:
    """Relative atol of the budget for an output of `dtype` computed on `device` (see the module docstring)."""
    if dot and tf32_active(device, dtype):
        return ATOL[torch.float16]
    return ATOL[dtype]


def check_budget(name: str, out: torch.Tensor, same: torch.Tensor, ref64: torch.Tensor, atol: float,
                 slack: torch.Tensor | None = None) -> None:
    """|out - ref64| <= 2 |same - ref64| + atol (+ slack) elementwise (absolute atol), compared in float64 on CPU.

    `slack` (optional, elementwise, float64): an allowance the caller computed in float64 for elements the dtype
    cannot decide (tests/test_fuzz.py: a ReLU input within rounding of zero); None adds nothing."""
    assert out is not None, f"{name}: kernel returned None"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out, same, ref64 = (t.detach().cpu().double() for t in (out, same, ref64))
    err = (out - ref64).abs()
    budget = 2 * (same - ref64).abs() + atol
    if slack is not None:
        budget = budget + slack.detach().cpu().double()
    bad = err > budget  # False where err or budget is NaN: NaNs are judged apart
    torch_nan = torch.isnan(ref64) | torch.isnan(same)
    bad |= torch.isnan(out) & ~torch_nan                                       # a NaN torch does not give
    bad |= torch.isnan(ref64) & torch.isnan(same) & ~torch.isnan(out)          # a NaN torch gives, hidden
    nan = f" ({int(torch.isnan(out[bad]).sum())} NaN)" if torch.isnan(out[bad]).any() else ""
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements outside the budget{nan}; "
                           f"max err {err.max().item():.3e}, max budget excess {(err - budget).max().item():.3e}")


def assert_budget(name: str, out: torch.Tensor, same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                  dot: bool = False, square: bool = False) -> None:
    """The budget with atol = atol_for(dtype, out.device, dot) * max(1, max|ref64|), twice that for a sum of squares
    (`square`: the statistics' m2) of TF32 dots: each squared deviation carries its operands' rounding twice (a
    1-channel 1x1 conv's m2 on an H100 was 2.02e-3 off relative, fp16's atol 2e-3, where cuDNN ran it in fp32)."""
    assert out is not None, f"{name}: kernel returned None"
    atol = atol_for(dtype, out.device, dot) * max(1.0, ref64.detach().abs().max().item() if ref64.numel() else 0.0)
    if square and dot and tf32_active(out.device, dtype):
        atol *= 2
    check_budget(f"{name} ({dtype}, {out.device.type})", out, same, ref64, atol)
