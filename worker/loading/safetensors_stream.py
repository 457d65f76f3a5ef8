"""Safetensors files read and written one tensor at a time, so a build holds a few tensors, not a model.

``safetensors`` writes a whole dict of tensors at once, and reads through a memory map whose pages
count in the process's RSS as they are touched (9.6 GB for EXAONE-2.4B's fp32 checkpoint). Here a
tensor is read with ``pread`` into its own buffer, and a file is written as its header (every name,
dtype, shape and offset, known before any data) followed by each tensor's bytes in turn. The layout
is safetensors' own: 8 bytes of header length, a compact JSON header padded with spaces to a
multiple of 8, then the data, tensors ordered by descending dtype then name (each stays aligned).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "U64": torch.uint64, "I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "U32": torch.uint32,
    "I32": torch.int32, "BF16": torch.bfloat16, "F16": torch.float16, "U16": torch.uint16, "I16": torch.int16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""In the order safetensors writes them (its ``Dtype`` enum, descending)."""
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_RANK = {name: rank for rank, name in enumerate(DTYPES)}
_MAX_HEADER = 100_000_000  # safetensors' own limit


class FormatError(ValueError):
    """A file that is not a readable safetensors file, or a tensor type this module does not handle."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a file (absolute byte offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: Path) -> dict[str, Entry]:
    """The tensors of ``file`` by name, without reading their data."""
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise FormatError(f"{file}: too short for a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER:
            raise FormatError(f"{file}: header of {size} bytes")
        try:
            header = json.loads(fh.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{file}: unreadable header: {exc}") from exc
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise FormatError(f"{file}: tensor {name!r} has dtype {info.get('dtype')!r}, "
                              f"not one of {', '.join(DTYPES)}")
        begin, end = info["data_offsets"]
        entries[name] = Entry(DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, 8 + size + end)
    return entries


def read_tensor(fd: int, entry: Entry, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor, read (no mapping of the file) into memory of its own or into the uint8 buffer ``into``."""
    return read_block(fd, entry.start, entry.end - entry.start, entry.dtype, entry.shape, into)


def row_blocks(entry: Entry, max_bytes: int) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """``(offset, size, shape)`` of a tensor's blocks of whole rows (its first dimension), each at most
    ``max_bytes`` (one row, if a row is larger); a 0- or 1-row tensor is one block."""
    size = entry.end - entry.start
    if len(entry.shape) == 0 or entry.shape[0] <= 1 or size == 0:
        yield entry.start, size, entry.shape
        return
    rows, tail = entry.shape[0], entry.shape[1:]
    row_bytes = size // rows
    step = max(1, max_bytes // row_bytes)
    for first in range(0, rows, step):
        n = min(step, rows - first)
        yield entry.start + first * row_bytes, n * row_bytes, (n, *tail)


def read_block(fd: int, offset: int, size: int, dtype: torch.dtype, shape: tuple[int, ...],
               into: torch.Tensor | None = None) -> torch.Tensor:
    """``size`` bytes at ``offset`` as a ``dtype`` tensor of ``shape``, read into ``into`` (a uint8
    buffer of at least ``size`` bytes, reused so its pages are not faulted in again) or fresh memory."""
    data = torch.empty(size, dtype=torch.uint8) if into is None else into[:size]
    view, done = memoryview(data.numpy()), 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise FormatError(f"file ends {size - done} bytes before the end of a tensor")
        done += n
    return data.view(dtype).reshape(shape)


class Writer:
    """Writes a safetensors file whose tensors are declared up front, then given in :attr:`order`,
    each whole or in blocks of rows; :meth:`close` checks that every declared byte was written."""

    def __init__(self, path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        unknown = sorted({str(dtype) for dtype, _ in tensors.values() if dtype not in _NAMES})
        if unknown:
            raise FormatError(f"cannot write tensors of dtype {', '.join(unknown)}")
        self.order = sorted(tensors, key=lambda n: (_RANK[_NAMES[tensors[n][0]]], n))
        self._specs = tensors
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name in self.order:
            dtype, shape = tensors[name]
            size = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self._next = 0
        self._rows = 0  # of the current tensor, written so far
        self._fh = path.open("wb")
        self._fh.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The tensor ``name``, or its next block of rows."""
        if self._next >= len(self.order) or name != self.order[self._next]:
            raise ValueError(f"tensor {name!r} written out of order")
        dtype, shape = self._specs[name]
        whole = self._rows == 0 and tuple(tensor.shape) == shape
        block = len(shape) > 0 and tuple(tensor.shape[1:]) == shape[1:] and tensor.dim() == len(shape) \
            and self._rows + tensor.shape[0] <= shape[0]
        if tensor.dtype != dtype or not (whole or block):
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}"
                             + (f" ({self._rows} rows written)" if self._rows else ""))
        self._fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if not whole:
            self._rows += tensor.shape[0]
        if whole or self._rows == shape[0]:
            self._next, self._rows = self._next + 1, 0

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self.order):
            raise ValueError(f"{len(self.order) - self._next} declared tensors were not written in full "
                             f"(first: {self.order[self._next]})")

    def abort(self) -> None:
        self._fh.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
