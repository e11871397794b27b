"""Development build of the CUDA extension with torch.utils.cpp_extension.load (ninja), for iterating on a GPU
machine without reinstalling the package::

    from pe_kernels.cuda import jit
    jit.load(verbose=True)            # compiles csrc/*.cu + csrc/binding.cpp, installs it for pe_kernels.cuda

Needs a CUDA build of torch, nvcc and ninja. Archs from PE_KERNELS_CUDA_ARCHS (default "8.0;9.0"), or the
current GPU's when PE_KERNELS_CUDA_ARCHS=native. The build directory defaults to torch's extension cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Optional

from . import _ext

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("binding.cpp", "conv_fwd.cu", "conv_bwd.cu", "bn.cu")


def nvcc_arch_flags(archs: Optional[str] = None) -> list[str]:
    """-gencode flags for "8.0;9.0"-style arch lists (the PE_KERNELS_CUDA_ARCHS syntax)."""
    archs = archs or os.environ.get("PE_KERNELS_CUDA_ARCHS", "8.0;9.0")
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def load(verbose: bool = False, build_directory: Optional[str] = None) -> ModuleType:
    """Compile and load the extension, then make pe_kernels.cuda use it. Raises on build failure."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError("pe_kernels.cuda.jit.load: torch has no CUDA (torch.version.cuda is None)")
    archs = os.environ.get("PE_KERNELS_CUDA_ARCHS", "8.0;9.0")
    if archs == "native":
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}.{minor}"
    module = cpp_extension.load(
        name="pe_kernels_C_jit",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=["-O3", "-std=c++20"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", *nvcc_arch_flags(archs)],
        extra_include_paths=[str(CSRC)],
        build_directory=build_directory,
        verbose=verbose,
    )
    _ext.set_module(module)
    return module
