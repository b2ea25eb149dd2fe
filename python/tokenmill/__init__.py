"""tokenmill: fast LLM inference and serving."""

import torch  # noqa: F401  (loads torch's OpenMP runtime before the native modules)

from tokenmill.errors import (
    InvalidParameterError,
    ModelLoadError,
    TokenmillError,
    UnsupportedModelError,
)
from tokenmill.llm import LLM
from tokenmill.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from tokenmill.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "BeamSearchParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "TokenmillError",
    "InvalidParameterError",
    "ModelLoadError",
    "UnsupportedModelError",
]
