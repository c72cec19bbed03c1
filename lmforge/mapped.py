"""safetensors files mapped instead of read, and written so that mapping them serves as loading them.

``SafetensorsMap`` maps a file and hands out views of its tensors (no copy): pages are read as they are touched and
can be given back (``release``: they stay in the page cache). ``write_aligned`` writes a safetensors file whose
tensors start on 64-byte boundaries in the file (and so in a page-aligned mapping), as PyTorch's allocations do: its
packed kernels need that, so the tensors of such a file can be used in place. safetensors' own writer aligns to 8
bytes only. The files are ordinary safetensors files (the header is padded with spaces, as the format allows, and
the tensors whose sizes are multiples of 64 bytes come first).

No PyTorch here: ``lmforge.infer.lean`` decodes without importing it.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from lmforge.errors import LMForgeError

ALIGN = 64
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1}
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8, "I32": np.int32, "I64": np.int64}


class SafetensorsMap:
    """A safetensors file mapped read-only (``writable``: copy-on-write, the file never changes): ``get(name)`` is a
    numpy view of the file's bytes, ``entry(name)`` where they are."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)
            n = int.from_bytes(self.mm[:8], "little")
            if not 0 < n <= len(self.mm) - 8:
                raise ValueError("header length out of range")
            header = json.loads(self.mm[8 : 8 + n])
            if not isinstance(header, dict):
                raise ValueError("header is not a mapping")
        except (OSError, ValueError) as e:
            raise LMForgeError(f"{path}: cannot read safetensors: {e}") from None
        self.metadata = header.pop("__metadata__", None)
        self.header, self.base = header, 8 + n
        self.read: set[str] = set()  # the names ``get`` has handed out

    def entry(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
        """(dtype, shape, offset in the file, bytes) of the tensor ``name``, checked against the file's size."""
        e = self.header.get(name)
        if e is None:
            raise LMForgeError(f"{self.path}: tensor {name!r} is missing")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPE_SIZES or not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise LMForgeError(f"{self.path}: tensor {name!r} has no valid dtype and shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise LMForgeError(f"{self.path}: tensor {name!r} has no valid data_offsets")
        begin, end = offsets
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
        if end - begin != nbytes or self.base + end > len(self.mm):
            raise LMForgeError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated)")
        return dtype, tuple(shape), self.base + begin, nbytes

    def get(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name``, which must be ``dtype`` (safetensors' name: F32, U8, I8...) of ``shape``."""
        e = self.header.get(name)
        if e is not None and (e.get("dtype") != dtype or tuple(e.get("shape", ())) != shape):
            raise LMForgeError(f"{self.path}: tensor {name!r} is {e.get('dtype')} {tuple(e.get('shape', ()))}; the "
                               f"config and quantization.json need {dtype} {shape}")
        _, _, offset, _ = self.entry(name)
        self.read.add(name)
        return np.frombuffer(self.mm, NUMPY_DTYPES[dtype], int(np.prod(shape)), offset).reshape(shape)

    def release(self) -> None:
        """Let go of the pages read so far (they stay in the page cache; a later read maps them again): what has been
        copied into another layout no longer counts towards this process's resident memory."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Unmap; while views of it are still alive (an error raised while reading keeps them in its traceback) the
        mapping goes with the last of them instead."""
        try:
            self.mm.close()
        except BufferError:
            pass


def write_aligned(path: str | Path, tensors: dict[str, tuple[str, tuple[int, ...], memoryview]],
                  metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> (safetensors dtype, shape, contiguous bytes)) to ``path`` as a safetensors file
    whose tensors of a multiple of 64 bytes each start at a multiple of 64 in the file."""
    names = sorted(tensors, key=lambda k: (len(tensors[k][2]) % ALIGN != 0, k))  # the aligned sizes first
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in names:
        dtype, shape, data = tensors[k]
        if len(data) != int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]:
            raise ValueError(f"tensor {k!r}: {len(data)} bytes for {dtype} {list(shape)}")
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # the data starts on a boundary
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for k in names:
            f.write(tensors[k][2])
        f.flush()
        os.fsync(f.fileno())
