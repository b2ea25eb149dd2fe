"""tokenmill: fast LLM inference and serving."""

import torch  # noqa: F401  (loads torch's OpenMP runtime before the native modules)

__version__ = "0.1.0"
