"""pe_kernels: fused grouped conv + BatchNorm + ReLU kernels that make Packed-Ensembles fast.

Layers (imports point down): models -> nn -> functional -> ops -> backends (reference, triton, cuda).
Backend choice: `pe_kernels.use_backend(name)`, `PE_KERNELS_BACKEND`, `pe_kernels.backends()`;
`pe_kernels.autotune(model, x)` measures the backends on this device for `auto`.
Nothing here touches a GPU at import.
"""

from ._backend import (BackendSpec, BackendUnavailableError, backend_names, backends, last_dispatch,
                       register_backend, unregister_backend, use_backend)
from . import functional, ops  # noqa: E402  (registers the torch.library ops)
from .functional import clear_caches  # noqa: E402
from . import nn, models  # noqa: E402
from .tuning import AutotuneReport, autotune  # noqa: E402

__version__ = "0.1.0"

__all__ = ["backends", "backend_names", "register_backend", "unregister_backend", "BackendSpec", "use_backend",
           "last_dispatch", "BackendUnavailableError", "autotune", "AutotuneReport", "clear_caches",
           "functional", "ops", "nn", "models", "__version__"]
