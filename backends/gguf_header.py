"""A GGUF file's metadata and tensor table, read from its header alone.

``gguf.GGUFReader`` maps the whole file and decodes every array, the tokenizer's included:
seconds per model, too slow for a catalog scanned at start. The header format is small
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): key/value pairs, then one
entry per tensor; arrays we do not need are skipped by their lengths. Only the block sizes
of the quantisation types come from the ``gguf`` package.

A file whose tensors need more bytes than it has is truncated (an interrupted copy or
download) and raises, as does anything that is not GGUF.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_STRING, _ARRAY = 8, 9
# arrays longer than this are skipped, not decoded (tokens, merges, scores)
_MAX_DECODED_ARRAY = 256


class GGUFError(ValueError):
    """Not a GGUF file, or a damaged one."""


class TensorInfo:
    __slots__ = ("elements", "name", "offset", "type")

    def __init__(self, name: str, elements: int, type_: int, offset: int) -> None:
        self.name = name
        self.elements = elements
        self.type = type_
        self.offset = offset

    def nbytes(self) -> int:
        block, size = _quant_sizes().get(self.type, (1, 0))
        return self.elements * size // block


class GGUFHeader:
    """``fields``: every key with its value (long arrays as their length, under
    ``"<key>.len"``); ``tensors``: the tensor table; ``data_bytes``: what the tensors need."""

    __slots__ = ("data_bytes", "fields", "file_bytes", "path", "tensors")

    def __init__(
        self, path: str, fields: dict[str, Any], tensors: list[TensorInfo], file_bytes: int
    ) -> None:
        self.path = path
        self.fields = fields
        self.tensors = tensors
        self.file_bytes = file_bytes
        self.data_bytes = sum(t.nbytes() for t in tensors)


def _quant_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES  # the block sizes of every ggml type

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


class _Cursor:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str, size: int) -> Any:
        if self.pos + size > len(self.buf):
            raise GGUFError("the header ends early (truncated file)")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        return int(self.take("<I", 4))

    def u64(self) -> int:
        return int(self.take("<Q", 8))

    def string(self) -> str:
        length = self.u64()
        if self.pos + length > len(self.buf):
            raise GGUFError("the header ends early (truncated file)")
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.u64()  # read first: ``pos += u64()`` would add to the old position
        self.pos += length

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.take(*_SCALARS[kind])
        raise GGUFError(f"unknown metadata value type {kind}")


def read_header(path: str | Path) -> GGUFHeader:
    p = Path(path)
    with p.open("rb") as f:
        size = p.stat().st_size
        if size < 24:
            raise GGUFError(f"{p}: {size} bytes is too short for a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(str(p), buf, size)


def _parse(path: str, buf: mmap.mmap, size: int) -> GGUFHeader:
    if buf[:4] != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file")
    c = _Cursor(buf)
    c.pos = 4
    version = c.u32()
    if version < 2:
        raise GGUFError(f"{path}: GGUF version {version} is not supported")
    tensor_count, kv_count = c.u64(), c.u64()
    if tensor_count > 1_000_000 or kv_count > 1_000_000:
        raise GGUFError(f"{path}: implausible header counts (damaged file)")
    fields = _read_fields(c, kv_count, path)
    tensors = _read_tensors(c, tensor_count, path)
    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    data_start = -(-c.pos // alignment) * alignment
    header = GGUFHeader(path, fields, tensors, size)
    if tensors:
        end = data_start + max(t.offset + t.nbytes() for t in tensors)
        if end > size:
            raise GGUFError(
                f"{path}: truncated: its tensors need {end:,} bytes, the file has {size:,}"
            )
    return header


def _read_fields(c: _Cursor, count: int, path: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for _ in range(count):
        key = c.string()
        kind = c.u32()
        if kind != _ARRAY:
            fields[key] = c.value(kind)
            continue
        item, length = c.u32(), c.u64()
        fields[f"{key}.len"] = length
        if item not in _SCALARS and item != _STRING:
            raise GGUFError(f"{path}: nested arrays in metadata key {key!r}")
        if length <= _MAX_DECODED_ARRAY:
            fields[key] = [c.value(item) for _ in range(length)]
        elif item == _STRING:
            for _ in range(length):
                c.skip_string()
        else:
            c.pos += _SCALARS[item][1] * length
    return fields


def _read_tensors(c: _Cursor, count: int, path: str) -> list[TensorInfo]:
    tensors = []
    for _ in range(count):
        name = c.string()
        dims = c.u32()
        if dims > 8:
            raise GGUFError(f"{path}: tensor {name!r} has {dims} dimensions (damaged file)")
        elements = 1
        for _ in range(dims):
            elements *= c.u64()
        type_, offset = c.u32(), c.u64()
        tensors.append(TensorInfo(name, elements, type_, offset))
    return tensors
