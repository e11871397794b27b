"""Build script: the pure-Python package always; the CUDA extension `pe_kernels._C` only when it can be built.

Metadata lives in pyproject.toml; this file only adds ext_modules/cmdclass. The extension is built when
  * torch imports (install with `pip install --no-build-isolation .` so the build sees the installed torch),
  * torch.version.cuda is set (a CUDA build of torch; the CPU wheel cannot link a CUDA extension),
  * nvcc is found (CUDA_HOME / PATH), and
  * PE_KERNELS_SKIP_CUDA_BUILD is not truthy.
Otherwise the pure-Python package installs and one line says why. Archs: PE_KERNELS_CUDA_ARCHS (default
"8.0;9.0", entries like "8.6" or "9.0+PTX"); parallel jobs: MAX_JOBS (honoured by torch's BuildExtension).
No network access is needed.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
SOURCES = ["binding.cpp", "conv_fwd.cu", "conv_bwd.cu", "bn.cu"]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _arch_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace("+PTX", "").replace(".", "")
        if not num.isdigit():
            raise ValueError(f"PE_KERNELS_CUDA_ARCHS: cannot parse arch {arch!r} in {archs!r} (use e.g. '8.0;9.0')")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _cuda_extension():
    """(ext_modules, cmdclass, reason): the extension, or empty lists and why it is skipped."""
    if _truthy("PE_KERNELS_SKIP_CUDA_BUILD"):
        return [], {}, "PE_KERNELS_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except Exception as exc:  # build isolation, or no torch at all
        return [], {}, f"torch is not importable in the build environment ({type(exc).__name__}: {exc}); " \
                       "use `pip install --no-build-isolation .` to build the CUDA extension"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} has no CUDA (torch.version.cuda is None)"
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc")
    if not nvcc:
        return [], {}, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    archs = os.environ.get("PE_KERNELS_CUDA_ARCHS", "8.0;9.0")
    ext = cpp_extension.CUDAExtension(
        name="pe_kernels._C",
        sources=[os.path.join(CSRC, s) for s in SOURCES],
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", *_arch_flags(archs)],
        },
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
    return [ext], cmdclass, f"building pe_kernels._C for archs {archs} with {nvcc}"


ext_modules, cmdclass, reason = _cuda_extension()
print(f"pe_kernels setup: {reason}" if ext_modules else f"pe_kernels setup: pure-Python install ({reason})",
      file=sys.stderr)

setup(
    packages=find_packages(include=["pe_kernels", "pe_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
