"""Which devices and native kernels this installation can use."""

from __future__ import annotations

import logging
import os

import torch

from tokenmill import _core

logger = logging.getLogger(__name__)

# Native libraries are installed beside _core (which is not always this folder).
NATIVE_DIR = os.path.dirname(_core.__file__)
CUDA_LIBRARY = os.path.join(NATIVE_DIR, "_cuda_ops.so")
CUDA_ARCHS_FILE = os.path.join(NATIVE_DIR, "cuda_archs.txt")


def cuda_archs() -> list[str]:
    """The GPU architectures this installation's CUDA kernels were compiled for."""
    if not os.path.exists(CUDA_LIBRARY) or not os.path.exists(CUDA_ARCHS_FILE):
        return []
    with open(CUDA_ARCHS_FILE) as f:
        return [a.strip() for a in f.read().replace(";", ",").split(",") if a.strip()]


def arch_runs_on(arch: str, major: int, minor: int) -> bool:
    """Whether code built for `arch` (CMake spelling: 80, 90a, 89-real) runs on sm major.minor.

    Machine code runs on its own major version at an equal or higher minor;
    "a" variants only on the exact version; embedded PTX (no "-real") is
    compiled by the driver for any newer GPU.
    """
    name = arch.strip()
    real_only = name.endswith("-real")
    name = name.removesuffix("-real").removesuffix("-virtual")
    exact = name.endswith(("a", "f"))
    digits = name.rstrip("af")
    a_major, a_minor = int(digits[:-1]), int(digits[-1])
    if exact:
        return (a_major, a_minor) == (major, minor)
    if a_major == major and a_minor <= minor:
        return True
    return not real_only and (a_major, a_minor) <= (major, minor)


def cuda_kernels_available() -> bool:
    """True when a CUDA device is present and the kernels were built for it."""
    if not torch.cuda.is_available() or not cuda_archs():
        return False
    major, minor = torch.cuda.get_device_capability()
    return any(arch_runs_on(a, major, minor) for a in cuda_archs())


def explain_cuda_kernels() -> str | None:
    """Why CUDA tensors run on torch composites instead of tokenmill's kernels, if they do."""
    if not torch.cuda.is_available():
        return None
    if not os.path.exists(CUDA_LIBRARY):
        return "this installation has no CUDA kernels (built without TOKENMILL_CUDA)"
    if not cuda_kernels_available():
        major, minor = torch.cuda.get_device_capability()
        return (
            f"tokenmill's CUDA kernels were built for sm {','.join(cuda_archs())}, "
            f"not for this GPU (sm {major}{minor}); rebuild with "
            f"CMAKE_CUDA_ARCHITECTURES={major}{minor}"
        )
    return None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    if resolved.type == "cuda" and (why := explain_cuda_kernels()):
        logger.warning("%s; running torch composites, which are slower", why)
    return resolved
