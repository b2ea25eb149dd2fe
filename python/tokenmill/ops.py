"""Custom ops: ``torch.ops.tokenmill.*``, native on CPU (and CUDA when built).

Every op writes into arguments that its schema marks as mutated and returns
nothing, so the fake implementations have nothing to compute.
"""

import os

import torch

from tokenmill import _core

# Native libraries are installed beside _core (which is not always this folder).
NATIVE_DIR = os.path.dirname(_core.__file__)
torch.ops.load_library(os.path.join(NATIVE_DIR, "_ops.so"))

ops = torch.ops.tokenmill

for _name in (
    "reshape_and_cache",
    "paged_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_and_mul",
):
    torch.library.register_fake(f"tokenmill::{_name}")(lambda *args, **kwargs: None)

reshape_and_cache = ops.reshape_and_cache
paged_attention = ops.paged_attention
rms_norm = ops.rms_norm
fused_add_rms_norm = ops.fused_add_rms_norm
rotary_embedding = ops.rotary_embedding
silu_and_mul = ops.silu_and_mul
gelu_and_mul = ops.gelu_and_mul
