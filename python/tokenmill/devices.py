"""Which devices and native kernels this installation can use."""

import ctypes
import os

import torch


def cuda_library_path() -> str | None:
    from tokenmill.ops import NATIVE_DIR

    path = os.path.join(NATIVE_DIR, "_cuda_ops.so")
    return path if os.path.exists(path) else None


def cuda_archs() -> list[str]:
    """The GPU architectures the CUDA kernels were compiled for."""
    path = cuda_library_path()
    if path is None or not torch.cuda.is_available():
        return []
    lib = ctypes.CDLL(path)
    lib.tokenmill_cuda_archs.restype = ctypes.c_char_p
    return lib.tokenmill_cuda_archs().decode().split(",")


def cuda_kernels_available() -> bool:
    """True when a CUDA device is present and the kernels were built for it."""
    if not torch.cuda.is_available() or cuda_library_path() is None:
        return False
    major, minor = torch.cuda.get_device_capability()
    archs = cuda_archs()
    return any(a.rstrip("af") == f"{major}{minor}" for a in archs)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        return torch.device("cpu")
    return torch.device(device)
