"""Custom ops: ``torch.ops.tokenmill.*``, native on CPU (and CUDA when built).

Every op writes into arguments that its schema marks as mutated and returns
nothing, so the fake implementations have nothing to compute.
"""

import os

import torch

from tokenmill import ops_composite as composite
from tokenmill.devices import CUDA_LIBRARY, NATIVE_DIR, cuda_kernels_available

torch.ops.load_library(os.path.join(NATIVE_DIR, "_ops.so"))

ops = torch.ops.tokenmill

# In this order they are also a program's op numbers (cpp/bindings/ops.cpp).
OP_NAMES = (
    "reshape_and_cache",
    "paged_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_and_mul",
    "linear",
    "int4_linear",
    "int4_dequantize",
    "coded_linear",
    "gguf_packed_linear",
    "gguf_packed_rows",
)

# Ops that programs do not run.
OTHER_OPS = (
    "fused_moe",
    "fused_moe_coded",
    "gguf_linear",
    "gguf_dequantize",
    "gguf_pack",
    "apply_token_bitmask",
)

if cuda_kernels_available():
    torch.ops.load_library(CUDA_LIBRARY)

for _name in (*OP_NAMES, *OTHER_OPS, "run_loaded_program"):
    torch.library.register_fake(f"tokenmill::{_name}")(lambda *args, **kwargs: None)
    # Devices without a native kernel for an op run its torch composite.
    for _key in ("CUDA", "XPU"):
        if hasattr(composite, _name) and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"tokenmill::{_name}", _key
        ):
            torch.library.impl(f"tokenmill::{_name}", _key)(getattr(composite, _name))

reshape_and_cache = ops.reshape_and_cache
paged_attention = ops.paged_attention
rms_norm = ops.rms_norm
fused_add_rms_norm = ops.fused_add_rms_norm
rotary_embedding = ops.rotary_embedding
silu_and_mul = ops.silu_and_mul
gelu_and_mul = ops.gelu_and_mul
fused_moe = ops.fused_moe
gguf_linear = ops.gguf_linear
gguf_dequantize = ops.gguf_dequantize
gguf_pack = ops.gguf_pack
gguf_packed_linear = ops.gguf_packed_linear
gguf_packed_rows = ops.gguf_packed_rows
apply_token_bitmask = ops.apply_token_bitmask
