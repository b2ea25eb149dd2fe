"""Host memory on transparent huge pages.

A CPU decode step streams every weight once. With 4 KiB pages such a stream
takes a TLB miss every 4 KiB; on 2 MiB
pages it takes almost none, and the same reads run faster (on a 2-core
Zen 3: a plain 2-thread read of 256 MB 20.4-21.0 GB/s on 4 KiB pages and
22.8-25.5 GB/s on huge pages; the dense GEMV over 60 decode-sized bf16
weights 19.1-22.6 against 21.1-24.2 GB/s, medians of the same runs). The
KV cache stays on plain pages: attention reads it in scattered blocks, and a
huge page's first touch costs more (see ModelRunner._allocate_kv_cache).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import threading

import torch
from torch import nn

log = logging.getLogger("tokenmill")

_HUGE_PAGE = 2 << 20
_ALIGN = 4096


def huge_page_buffer(nbytes: int, huge: bool = True) -> torch.Tensor:
    """A zeroed uint8 CPU tensor of ``nbytes`` in anonymous memory advised for
    huge pages (plain pages where the OS offers none, or with huge=False).
    The OS zeroes each page at its first touch: nothing is written here."""
    # Private: shared anonymous memory is shmem, which has its own THP setting.
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=flags)
    advice = "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE"
    if hasattr(mmap, advice):
        try:
            region.madvise(getattr(mmap, advice))
        except OSError:
            pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    skip = -whole.data_ptr() % _HUGE_PAGE
    return whole[skip : skip + nbytes]


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype, huge: bool = True) -> torch.Tensor:
    """An uninitialised-looking (zeroed) CPU tensor on huge pages (huge=True)
    or plain ones."""
    numel = math.prod(shape)
    return huge_page_buffer(numel * dtype.itemsize, huge).view(dtype).view(shape)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def commit_in_background(t: torch.Tensor) -> threading.Thread:
    """Faults in the pages of an anonymous-memory tensor on a thread, without
    writing to them (madvise MADV_POPULATE_WRITE, through ctypes, which lets
    go of the GIL): the memory is committed soon after start-up, so RSS stays
    flat under load, while the caller goes on and may already write to it.
    Older kernels refuse the advice; the pages then commit at first touch."""

    def populate():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        start = t.data_ptr() - t.data_ptr() % _ALIGN
        end = t.data_ptr() + t.numel() * t.element_size()
        if libc.madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
            log.debug("KV memory commits at first touch (madvise: errno %d)", ctypes.get_errno())

    thread = threading.Thread(target=populate, name="tokenmill-commit", daemon=True)
    thread.start()
    return thread


def move_to_huge_pages(module: nn.Module) -> int:
    """Moves the module's CPU parameters and buffers into one huge-page arena,
    one tensor at a time (each old tensor is freed as its copy lands).
    Tensors shared between modules stay shared. Returns the bytes moved."""
    slots = []  # (owner, kind, name, tensor)
    seen: set[int] = set()
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(owner, kind).items():
                if t is None or t.device.type != "cpu" or id(t) in seen:
                    continue
                seen.add(id(t))
                slots.append((owner, kind, name, t))
    sizes = [_aligned(t) for *_, t in slots]
    if not slots:
        return 0
    arena = huge_page_buffer(sum(sizes))
    offset = 0
    for (owner, kind, name, t), size in zip(slots, sizes, strict=True):
        nbytes = t.numel() * t.element_size()
        moved = arena[offset : offset + nbytes].view(t.dtype).view(t.shape)
        moved.copy_(t)
        if kind == "_parameters":
            t.data = moved  # the Parameter object, and whoever shares it, now reads the arena
        else:
            getattr(owner, kind)[name] = moved
        offset += size
    log.info("weights: %.1f MiB on huge pages", offset / 2**20)
    return offset


def huge_page_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of CPU tensors, together in one huge-page arena."""
    if not tensors:
        return []
    arena = huge_page_buffer(sum(_aligned(t) for t in tensors))
    copies, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        copies.append(arena[offset : offset + nbytes].view(t.dtype).view(t.shape).copy_(t))
        offset += _aligned(t)
    return copies


def _aligned(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
