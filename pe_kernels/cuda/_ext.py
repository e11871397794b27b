"""Loader of the compiled CUDA extension `pe_kernels._C`; never raises at import.

`is_built()` says whether the extension imported; `load_error()` says why not, in words a user can act on
(e.g. "pe_kernels._C was not built: torch has no CUDA (torch.version.cuda is None)"). No GPU is queried here.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

_C: Optional[ModuleType] = None
_ERROR: Optional[str] = None


def _explain_missing(exc: BaseException) -> str:
    try:
        import torch
    except Exception as torch_exc:  # pragma: no cover - torch is a hard dependency
        return f"pe_kernels._C is unavailable: torch does not import ({torch_exc!r})"
    if getattr(torch.version, "cuda", None) is None:
        return ("pe_kernels._C was not built: torch has no CUDA (torch.version.cuda is None); "
                "install a CUDA build of torch and reinstall pe_kernels (pip install --no-build-isolation .)")
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("pe_kernels._C", "_C"):
        return ("pe_kernels._C was not built (the package was installed without the CUDA extension: nvcc not "
                "found, PE_KERNELS_SKIP_CUDA_BUILD set, or build isolation hid torch); reinstall with "
                "`pip install --no-build-isolation .` on a machine with nvcc, or use pe_kernels.cuda.jit.load()")
    return f"pe_kernels._C failed to import: {type(exc).__name__}: {exc}"


def _load() -> None:
    global _C, _ERROR
    try:
        import torch  # noqa: F401  (the extension links against libtorch: import torch first)

        _C = importlib.import_module("pe_kernels._C")
        _ERROR = None
    except Exception as exc:  # ImportError, OSError (undefined symbol), anything: record, never raise
        _C = None
        _ERROR = _explain_missing(exc)


def is_built() -> bool:
    """True when the compiled extension imported."""
    return _C is not None


def load_error() -> Optional[str]:
    """Why the compiled extension is unavailable, or None when it loaded."""
    return _ERROR


def get() -> ModuleType:
    """The extension module; RuntimeError with load_error() when it is missing."""
    if _C is None:
        raise RuntimeError(_ERROR or "pe_kernels._C is not loaded")
    return _C


def set_module(module: Optional[ModuleType], error: Optional[str] = None) -> None:
    """Install an extension module built elsewhere (pe_kernels.cuda.jit) or record why it is missing."""
    global _C, _ERROR
    _C = module
    _ERROR = None if module is not None else (error or "pe_kernels._C is not loaded")


_load()
