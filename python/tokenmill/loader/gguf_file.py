"""The layout of a GGUF file: scalar metadata and where each tensor's data
lies, read without loading the file (a vocabulary of 262k tokens is skipped,
not parsed: gguf.GGUFReader takes ~10 s over Gemma 3's)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from tokenmill.errors import ModelLoadError

# GGUF value types: struct format of the scalars; 8 is a string, 9 an array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major, as torch has it (GGUF lists dimensions innermost first)
    qtype: int  # a gguf.GGMLQuantizationType value
    offset: int  # from the start of the file


class GGUFFile:
    def __init__(self, path: str):
        self.path = path
        self.fields: dict[str, object] = {}
        self.tensors: list[TensorInfo] = []
        try:
            with open(path, "rb") as f:
                self._parse(f)
        except (OSError, struct.error, UnicodeDecodeError) as e:
            raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e

    def _parse(self, f) -> None:
        def read(fmt):
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))

        def string():
            (n,) = read("Q")
            return f.read(n).decode("utf-8")

        def value(kind):
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item, count = read("IQ")
                if item == _STRING:  # vocabularies: skipped
                    for _ in range(count):
                        f.seek(read("Q")[0], 1)
                    return None
                if item == _ARRAY:
                    raise ModelLoadError("nested GGUF arrays are not supported")
                fmt = _SCALARS[item]
                data = f.read(struct.calcsize(fmt) * count)
                return list(struct.unpack(f"<{count}{fmt}", data)) if count <= 4096 else None
            return read(_SCALARS[kind])[0]

        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{self.path} is not a GGUF file")
        version, num_tensors, num_fields = read("IQQ")
        if version < 2:
            raise ModelLoadError(f"GGUF version {version} is not supported")
        for _ in range(num_fields):
            key = string()
            (kind,) = read("I")
            self.fields[key] = value(kind)
        infos = []
        for _ in range(num_tensors):
            name = string()
            (ndim,) = read("I")
            dims = read(f"{ndim}Q")
            qtype, offset = read("IQ")
            infos.append((name, tuple(reversed(dims)), qtype, offset))
        alignment = int(self.fields.get("general.alignment") or 32)
        start = -(-f.tell() // alignment) * alignment
        self.tensors = [TensorInfo(n, s, q, start + o) for n, s, q, o in infos]

    @property
    def arch(self) -> str:
        return str(self.fields["general.architecture"])

    def data(self, t: TensorInfo) -> np.ndarray:
        """The tensor's raw data, memory-mapped: float arrays of its shape for
        F32/F16, else uint8 rows of its quantized blocks."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType(t.qtype)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
            return np.memmap(self.path, dtype=dtype, mode="r", offset=t.offset, shape=t.shape)
        block, size = GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(t.shape[:-1]))
        row_bytes = t.shape[-1] // block * size
        data = np.memmap(
            self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(rows, row_bytes)
        )
        return data
