"""What tokenmill decides from the CPU it runs on: its features, free memory,
and the batch sizes and tile sizes at which each path wins."""

from __future__ import annotations

import functools
import os

import torch

# Up to this many rows the weight-streaming kernel beats the BLAS on CPUs.
SMALL_M = 32
# Where the CPU multiplies bfloat16 natively, oneDNN wins from three rows on
# (576 x 3072 bf16 on a Zen 4: 0.17-0.20 ms packed at 4-8 rows against
# 0.40-0.54 for the kernel's portable path then), and the kernel keeps the one
# or two rows it reads at memory speed (0.10 against 0.18).
SMALL_M_NATIVE_BF16 = 2
# Weights packed for oneDNN in float32 (their own dtype, or bfloat16 widened
# on CPUs without native bf16): the AVX2 kernel reads their own bytes and wins
# up to 16 rows in whole decode steps (docs/cpu.md has the figures).
SMALL_M_PACKED = 16
# Up to this many rows int4 (GPTQ/AWQ) weights take the int4 kernel; above,
# dequantized tiles and the BLAS.
INT4_SMALL_M = 32
# Up to this many rows a bfloat16 weight's coded copy (layers/coded.py) serves.
CODED_M = 2
# Rows of the matmuls oneDNN chooses a packed layout for.
PACK_ROWS_HINT = 256
# Weight rows converted to float32 at a time for a BLAS matmul (prefill of
# weights the CPU cannot multiply natively, and int4 weights).
TILE_ROWS = 512
# A CPU computes a padded graph's rows in full, so small batches each get a
# graph; larger ones would only hold more buffers for a saving that shrinks.
MAX_CPU_GRAPH_BATCH = 8
# The greedy head's int8 copy of the LM head pays when the head is at least
# this share of a step's weight reads.
GREEDY_HEAD_MIN_SHARE = 1 / 8
# The KV cache takes at most this much, and half the free memory, by default.
DEFAULT_KV_CACHE_BYTES = 4 << 30


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_avx2() -> bool:
    """Whether the kernels take their AVX2 paths (TOKENMILL_DISABLE_AVX2 turns them off)."""
    return {"avx2", "fma"} <= cpu_flags() and not os.environ.get("TOKENMILL_DISABLE_AVX2")


def available_memory_bytes() -> int:
    """Memory this process can still take: MemAvailable of /proc/meminfo (or
    the free pages where there is none), within the container's cgroup limit."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    headroom = cgroup_memory_headroom()
    return free if headroom is None else min(free, headroom)


def cgroup_memory_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """The cgroup's memory limit less its usage (v2, else v1); None without a limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            with open(os.path.join(root, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(root, usage_file)) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        # v2 says "max"; v1 says a page-rounded 2**63 when unlimited
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def small_m(dtype: torch.dtype, packed_dtype: torch.dtype | None = None) -> int:
    """Most rows that take tokenmill's kernel rather than the BLAS on CPUs, for
    a weight of `dtype` packed as `packed_dtype` (None: not packed)."""
    if dtype == torch.bfloat16 and cpu_has_native_bf16():
        return SMALL_M_NATIVE_BF16
    return SMALL_M if packed_dtype is None else SMALL_M_PACKED


def multiplies_natively(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16())


def greedy_head_pays(head: torch.Tensor, total_weight_bytes: int) -> bool:
    return head.numel() * head.element_size() >= GREEDY_HEAD_MIN_SHARE * total_weight_bytes


def default_cpu_kv_budget() -> int:
    return min(DEFAULT_KV_CACHE_BYTES, available_memory_bytes() // 2)
