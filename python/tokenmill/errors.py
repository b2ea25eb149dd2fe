"""Typed errors raised by tokenmill."""


class TokenmillError(Exception):
    """Base class of tokenmill's errors."""


class InvalidParameterError(TokenmillError, ValueError):
    """A request or sampling parameter is out of range or of the wrong type."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


class PromptTooLongError(InvalidParameterError):
    """The prompt does not fit in the model's context."""


class ModelLoadError(TokenmillError):
    """A model cannot be found, read or built."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture or quantization is not supported."""


class KVCacheTooSmallError(TokenmillError, ValueError):
    """The KV-cache budget cannot hold one sequence of max_model_len."""


class WorkerDiedError(TokenmillError, RuntimeError):
    """A tensor-parallel worker process died; the engine cannot continue."""
