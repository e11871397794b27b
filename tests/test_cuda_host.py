"""Host-side arithmetic of the CUDA backend (csrc/conv_params.h, csrc/tiling.h) checked on CPU.

csrc/host_capi.cpp (a C ABI over the headers) is compiled with plain g++ into a shared library and loaded with
ctypes: output sizes against torch's conv2d shape rule, validation messages, tile choice, grid dimensions and
workspace sizes against the formulas the kernels rely on. Also the Python side of pe_kernels.cuda without the
extension: import never raises, every op raises RuntimeError with the recorded reason.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
F16, BF16, F32, F64 = 0, 1, 2, 3
I64P = ctypes.POINTER(ctypes.c_int64)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++/c++) on PATH")
    so = tmp_path_factory.mktemp("pehost") / "libpehost.so"
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                           str(CSRC / "host_capi.cpp"), "-o", str(so)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lib = ctypes.CDLL(str(so))
    lib.pe_conv_out_size.restype = ctypes.c_int64
    lib.pe_conv_out_size.argtypes = [ctypes.c_int64] * 5
    lib.pe_make_conv_shape.argtypes = [I64P, I64P, ctypes.c_char_p, ctypes.c_int]
    lib.pe_plan_conv.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, I64P, I64P,
                                 ctypes.c_char_p, ctypes.c_int]
    lib.pe_plan_rows_channels.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, I64P,
                                          ctypes.c_char_p, ctypes.c_int]
    return lib


def _args(N, C, H, W, K, Cw, R, S, stride=(1, 1), pad=(0, 0), dil=(1, 1), groups=1):
    vals = [N, C, H, W, K, Cw, R, S, stride[0], stride[1], pad[0], pad[1], dil[0], dil[1], groups]
    return (ctypes.c_int64 * 15)(*vals)


def make_shape(lib, *a, **kw):
    out = (ctypes.c_int64 * 11)()
    err = ctypes.create_string_buffer(512)
    rc = lib.pe_make_conv_shape(_args(*a, **kw), out, err, 512)
    keys = ("N", "C", "H", "W", "K", "R", "S", "P", "Q", "Cg", "Kg")
    return rc, dict(zip(keys, out)), err.value.decode()


PLAN_KEYS = ("tile_id", "bm", "bn", "bk", "threads", "grid_x", "grid_y", "grid_z", "m_tiles", "n_tiles", "splits",
             "chunk", "workspace_bytes")


def plan(lib, kind, dtype, tf32, flag, *a, **kw):
    out = (ctypes.c_int64 * 13)()
    err = ctypes.create_string_buffer(512)
    rc = lib.pe_plan_conv(kind, dtype, int(tf32), int(flag), _args(*a, **kw), out, err, 512)
    return rc, dict(zip(PLAN_KEYS, out)), err.value.decode()


# (N, C, H, W, K, R, S, stride, pad, dil, groups): stem, 1x1, strided 3x3, grouped PE-like, dilated, odd sizes.
SHAPES = [
    (2, 3, 32, 32, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (1, 64, 8, 8, 256, 1, 1, (1, 1), (0, 0), (1, 1), 4),
    (3, 128, 15, 17, 128, 3, 3, (2, 2), (1, 1), (1, 1), 8),
    (2, 24, 7, 9, 48, 3, 5, (2, 1), (0, 2), (2, 1), 2),
    (1, 16, 5, 5, 16, 5, 5, (3, 3), (2, 2), (1, 1), 16),
    (4, 512, 4, 4, 2048, 1, 1, (1, 1), (0, 0), (1, 1), 4),
    (0, 8, 4, 4, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
def test_output_size_matches_torch(lib, shape):
    N, C, H, W, K, R, S, stride, pad, dil, groups = shape
    x = torch.empty(N, C, H, W, device="meta")
    w = torch.empty(K, C // groups, R, S, device="meta")
    expected = F.conv2d(x, w, None, stride, pad, dil, groups).shape
    rc, s, err = make_shape(lib, N, C, H, W, K, C // groups, R, S, stride, pad, dil, groups)
    assert rc == 0, err
    assert (s["N"], s["K"], s["P"], s["Q"]) == tuple(expected)
    assert s["Cg"] == C // groups and s["Kg"] == K // groups
    assert lib.pe_conv_out_size(H, pad[0], dil[0], R, stride[0]) == expected[2]


@pytest.mark.parametrize("args, kw, needle", [
    ((2, 30, 8, 8, 64, 7, 3, 3), {"groups": 4}, "divisible by groups=4"),
    ((2, 32, 8, 8, 64, 16, 3, 3), {"groups": 4}, "expects 64 input channels, got 32"),
    ((2, 32, 2, 2, 64, 32, 5, 5), {}, "output size is empty"),
    ((2, 32, 8, 8, 64, 32, 3, 3), {"pad": (-1, 0)}, "padding=(-1, 0)"),
    ((2, 32, 8, 8, 64, 32, 3, 3), {"stride": (0, 1)}, "stride=(0, 1)"),
    ((2, 32, 8, 8, 64, 32, 3, 3), {"groups": 0}, "groups must be positive, got 0"),
    ((2, 0, 8, 8, 64, 32, 3, 3), {}, "got (2, 0, 8, 8)"),
])
def test_validation_messages_name_values(lib, args, kw, needle):
    rc, _, err = make_shape(lib, *args, **kw)
    assert rc == 1
    assert needle in err, err


def _ceil(a, b):
    return -(-a // b)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("dtype, tf32", [(F16, False), (BF16, False), (F32, True), (F32, False), (F64, False)])
def test_forward_plan(lib, shape, dtype, tf32):
    N, C, H, W, K, R, S, stride, pad, dil, groups = shape
    rc, s, _ = make_shape(lib, N, C, H, W, K, C // groups, R, S, stride, pad, dil, groups)
    rc, p, err = plan(lib, 0, dtype, tf32, True, N, C, H, W, K, C // groups, R, S, stride, pad, dil, groups)
    assert rc == 0, err
    simt = dtype == F64 or (dtype == F32 and not tf32)
    Kg = K // groups
    expected_tile = 2 if simt else (1 if Kg <= 32 else 0)
    assert p["tile_id"] == expected_tile
    assert (p["bm"], p["bn"], p["bk"], p["threads"]) == {0: (64, 64, 32, 128), 1: (128, 32, 32, 128),
                                                        2: (64, 64, 16, 256)}[expected_tile]
    M = N * s["P"] * s["Q"]
    assert p["m_tiles"] == p["grid_x"] == _ceil(M, p["bm"])
    assert p["grid_y"] == _ceil(Kg, p["bn"]) * groups and p["grid_z"] == 1
    acc = 8 if dtype == F64 else 4
    assert p["workspace_bytes"] == 3 * p["m_tiles"] * K * acc  # per row tile: [count, mean, M2] per channel
    rc, p2, _ = plan(lib, 0, dtype, tf32, False, N, C, H, W, K, C // groups, R, S, stride, pad, dil, groups)
    assert p2["workspace_bytes"] == 0


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("dtype, tf32", [(F16, False), (F32, False), (F64, False)])
def test_backward_plans(lib, shape, dtype, tf32):
    N, C, H, W, K, R, S, stride, pad, dil, groups = shape
    Cg, Kg = C // groups, K // groups
    rc, s, _ = make_shape(lib, N, C, H, W, K, Cg, R, S, stride, pad, dil, groups)
    acc = 8 if dtype == F64 else 4
    rc, d, err = plan(lib, 1, dtype, tf32, True, N, C, H, W, K, Cg, R, S, stride, pad, dil, groups)
    assert rc == 0, err
    assert d["grid_x"] == _ceil(N * H * W, d["bm"]) and d["grid_y"] == _ceil(Cg, d["bn"]) * groups
    assert d["workspace_bytes"] == 2 * d["m_tiles"] * C * acc

    rc, w, err = plan(lib, 2, dtype, tf32, False, N, C, H, W, K, Cg, R, S, stride, pad, dil, groups)
    assert rc == 0, err
    M = N * s["P"] * s["Q"]
    assert w["chunk"] % w["bk"] == 0 and w["chunk"] > 0
    assert 1 <= w["splits"] <= 64
    assert w["splits"] * w["chunk"] >= M                 # every reduction row belongs to a split
    assert M == 0 or (w["splits"] - 1) * w["chunk"] < M  # and no split is empty
    assert w["grid_x"] == _ceil(R * S * Cg, w["bn"]) and w["grid_y"] == _ceil(Kg, w["bm"])
    assert w["grid_z"] == groups * w["splits"]
    assert w["workspace_bytes"] == w["splits"] * K * R * S * Cg * acc
    assert w["splits"] * K * R * S * Cg <= max(2 ** 25, K * R * S * Cg)


def test_grid_limit_is_reported(lib):
    # Depthwise conv with 70000 groups: grid.y = groups * column tiles exceeds 65535.
    rc, _, err = plan(lib, 0, F16, False, False, 1, 70000, 4, 4, 70000, 1, 3, 3, (1, 1), (1, 1), (1, 1), 70000)
    assert rc == 2
    assert "65535" in err and "70000" in err


def test_rows_channels_plan(lib):
    out = (ctypes.c_int64 * 13)()
    err = ctypes.create_string_buffer(256)
    assert lib.pe_plan_rows_channels(1000, 100, 3, F32, out, err, 256) == 0
    p = dict(zip(PLAN_KEYS, out))
    assert p["grid_x"] == math.ceil(1000 / 64) and p["grid_y"] == math.ceil(100 / 32)
    assert p["workspace_bytes"] == 3 * p["grid_x"] * 100 * 4
    assert p["threads"] == 256


def test_math_selection(lib):
    assert lib.pe_select_math(F16, 0) == 1 and lib.pe_select_math(BF16, 1) == 1
    assert lib.pe_select_math(F32, 1) == 2 and lib.pe_select_math(F32, 0) == 0
    assert lib.pe_select_math(F64, 1) == 0


# ---------------------------------------------------------------------------------------------------------------
# Python side without the extension.

def test_cuda_backend_import_never_raises_and_explains():
    import pe_kernels.cuda as cuda_backend

    if cuda_backend.is_built():
        assert cuda_backend.load_error() is None
        return
    reason = cuda_backend.load_error()
    assert isinstance(reason, str) and "pe_kernels._C" in reason
    if torch.version.cuda is None:
        assert "torch.version.cuda is None" in reason
    x = torch.randn(1, 4, 4, 4)
    w = torch.randn(4, 4, 3, 3)
    with pytest.raises(RuntimeError, match="pe_kernels._C"):
        cuda_backend.conv_fused(x, w, None, None, None, False, None, None, None, False, (1, 1), (1, 1), (1, 1), 1,
                                False)
    with pytest.raises(RuntimeError, match="pe_kernels._C"):
        cuda_backend.bn_finalize(torch.zeros(2, 4), 8, None, None, 1e-5)


def test_cuda_backend_mirrors_reference_signatures():
    import inspect

    import pe_kernels.cuda as cuda_backend
    from pe_kernels import reference

    for name in ("conv_fused", "conv_fused_backward", "bn_finalize", "bn_running_update", "bn_apply",
                 "bn_apply_backward"):
        ref = inspect.signature(getattr(reference, name))
        ours = inspect.signature(getattr(cuda_backend, name))
        assert list(ref.parameters) == list(ours.parameters), name


def test_running_update_count_check_precedes_extension():
    import pe_kernels.cuda as cuda_backend

    with pytest.raises(ValueError, match="count=1"):
        cuda_backend.bn_running_update(torch.zeros(2, 3), 1, torch.zeros(3), torch.ones(3), 0.1)


@pytest.mark.parametrize("stats, needle", [(None, "is None"), (torch.zeros(0), "is empty"),
                                           (torch.zeros(2, 3), r"must both be \(2, 4\)")])
def test_backward_stats_check_precedes_extension(stats, needle):
    """grad_stats needs the forward's (2, K) [mean, m2] (the contract): a ValueError, before the extension."""
    import pe_kernels.cuda as cuda_backend

    x, w = torch.randn(1, 4, 4, 4), torch.randn(4, 4, 3, 3)
    y = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match=needle):
        cuda_backend.conv_fused_backward(y, torch.zeros(2, 4), x, w, None, None, None, False, None, None, None, False,
                                         (1, 1), (0, 0), (1, 1), 1, y, [True] * 8, stats)


def test_jit_arch_flags():
    from pe_kernels.cuda.jit import nvcc_arch_flags

    assert nvcc_arch_flags("8.0;9.0") == ["-gencode=arch=compute_80,code=sm_80",
                                          "-gencode=arch=compute_90,code=sm_90"]
    assert nvcc_arch_flags("9.0+PTX") == ["-gencode=arch=compute_90,code=sm_90",
                                          "-gencode=arch=compute_90,code=compute_90"]
