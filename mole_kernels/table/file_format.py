"""The table file: safetensors with one tensor ``"lut"`` ``[V, L, E, D]`` (or ``[V, E, D]``) and
metadata, its data starting on a page boundary; quantized tables store their packed uint8 rows
``[V, L, E, row_bytes]`` and name format, block size and dtype in the metadata. Headers are
validated on read (every problem a ValueError naming the file); files are written whole or not at all."""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .._files import atomic_write, check_replaceable
from .._progress import progress_bar
from ..mixed import is_mixed_metadata
from ..quant import QuantizedLUT

#: The newest file format this version reads. Float tables are written as version 1 (readable by
#: every release); quantized tables as version 2 (a U8 tensor plus quantization metadata).
FORMAT_VERSION = 2
_FLOAT_FORMAT_VERSION = 1
TENSOR_NAME = "lut"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_NAMES[torch.uint8] = "U8"  # written for quantized tables only
_HEADER_ALIGN = 4096  # the data starts on a page boundary (safetensors allows header padding)
_MAX_HEADER = 100 << 20  # the safetensors limit
# Bytes per step when a table is filled, converted, saved or loaded: a 32nd of the table, within
# [4 MiB, 64 MiB]. What a step holds besides the table is a chunk (a few, converting): bounded, and
# small against the table, while a step stays long enough for its per-call costs not to show.
_CHUNK_MIN, _CHUNK_MAX = 4 << 20, 64 << 20
_PROGRESS_MIN = 1 << 30  # show a progress bar for tables at least this large


def _chunk_rows(token_bytes: int, total_bytes: int) -> int:
    """Tokens per step over a table of ``total_bytes`` with ``token_bytes`` per token (see _CHUNK_MIN)."""
    chunk = min(_CHUNK_MAX, max(_CHUNK_MIN, total_bytes // 32))
    return max(1, chunk // max(1, token_bytes))


def _progress(total: int, desc: Optional[str]):
    """A bar over bytes, shown only for tables of at least ``_PROGRESS_MIN`` bytes (never when ``desc`` is None)."""
    return progress_bar(total, desc or "", enabled=desc is not None and total >= _PROGRESS_MIN, unit="B",
                        unit_scale=True)


@dataclass
class _FileInfo:
    shape: Tuple[int, int, int, int]  # of the stored tensor (quantized: [V, L, E, row_bytes])
    dtype: torch.dtype  # of the stored tensor (quantized: uint8)
    data_offset: int  # absolute offset of the table's first byte
    nbytes: int
    metadata: Dict[str, str]
    quantized: bool = False
    identity: Tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file the header was read from
    template: Optional[QuantizedLUT] = None  # quantized: format/dim/block/dtype over a meta payload


def _read_header(path: str, tensor: str = TENSOR_NAME, as_shape=None) -> _FileInfo:
    """Parses and validates a safetensors header; every problem is a ValueError naming the file.

    ``as_shape``: the ``[V, L, E, D]`` to read a float tensor stored under another shape as (same
    V and element count: an official checkpoint's ``[V, L*E*D]`` LUT is byte for byte the table).
    Only a regular file is read (a FIFO or device is refused without blocking on it)."""

    def bad(msg):
        return ValueError(f"LookupTable.open: {path}: {msg}")

    header, meta, data_start, st = safetensors_header(path, "LookupTable.open")  # entries and spans validated
    if is_mixed_metadata(meta):
        raise bad("a mixed-precision table (mole_kernels.mixed.save_mixed), not a LookupTable file: open it with "
                  "MixedLookupTable.open(path, 'host' | 'disk') or MoLEForCausalLM.from_pretrained(..., lut_file=path); "
                  "LookupTable, tensor parallelism and vLLM do not serve mixed tables")
    if tensor not in header:
        raise bad(f"no tensor named {tensor!r} (tensors: {sorted(header)[:8]}); pass tensor= to pick one")
    entry = header[tensor]
    dtype_name, shape = entry["dtype"], list(entry["shape"])
    begin, end = entry["data_offsets"]
    quantized = QuantizedLUT.is_quantized_metadata(meta)
    if quantized:
        if dtype_name != "U8":
            raise bad(f"metadata names a quantized table (mole_kernels.format={meta['mole_kernels.format']}) but "
                      f"tensor {tensor!r} has dtype {dtype_name}; quantized rows are stored as U8")
        dtype = torch.uint8
    elif dtype_name == "U8":
        raise bad(f"tensor {tensor!r} is U8 but the metadata names no quantization (mole_kernels.format, "
                  "mole_kernels.block_size, ...): cannot tell how to decode its rows")
    elif dtype_name not in _ST_DTYPES:
        raise bad(f"tensor {tensor!r} has dtype {dtype_name}; a table must be one of {sorted(_ST_DTYPES)} "
                  "(or U8 with quantization metadata)")
    else:
        dtype = _ST_DTYPES[dtype_name]
    if as_shape is not None:
        as_shape = [int(x) for x in as_shape]
        if quantized or len(shape) < 1 or shape[0] != as_shape[0] or math.prod(shape) != math.prod(as_shape):
            raise bad(f"tensor {tensor!r} has shape {shape} ({dtype_name}); expected the [V, L, E, D] = {as_shape} "
                      f"table or [V, L*E*D] = {[as_shape[0], math.prod(as_shape[1:])]}")
        shape = as_shape
    if len(shape) == 3:
        shape = [shape[0], 1, shape[1], shape[2]]
    if len(shape) == 4 and any(s > (1 << 62) for s in shape):
        raise bad(f"tensor {tensor!r} has shape {shape}: too large to be a table")
    if len(shape) != 4 or min(shape) < 0:
        raise bad(f"tensor {tensor!r} has shape {shape}; a table is [V, L, E, D] or [V, E, D]")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0:
        raise bad(f"tensor {tensor!r} data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} "
                  f"in {dtype_name} needs {nbytes}")
    # The metadata, when present, must agree with the tensor (a mismatch means a corrupt or foreign file).
    logical, logical_dtype = list(shape), str(dtype).replace("torch.", "")
    if quantized:
        q = _quantized_on_meta(shape, meta, bad)
        logical, logical_dtype = list(q.shape), str(q.dtype).replace("torch.", "")
    want = {"vocab": logical[0], "layers": logical[1], "experts": logical[2], "hidden": logical[3]}
    for key, val in want.items():
        if key in meta and str(meta[key]) != str(val):
            raise bad(f"metadata says {key}={meta[key]} but tensor {tensor!r} has shape {shape} ({key}={val})")
    if "dtype" in meta and meta["dtype"] != logical_dtype:
        raise bad(f"metadata says dtype={meta['dtype']} but tensor {tensor!r} is {dtype_name}"
                  + (f" quantized from {logical_dtype}" if quantized else ""))
    version = meta.get("format_version", "1")
    if not version.isdigit() or len(version) > 9:
        raise bad(f"format_version {version[:20]!r} is not a version number")
    if int(version) > FORMAT_VERSION:
        raise bad(f"format_version {version} is newer than this mole_kernels ({FORMAT_VERSION})")
    return _FileInfo(tuple(shape), dtype, data_start + begin, nbytes, dict(meta), quantized, (st.st_dev, st.st_ino),
                     q if quantized else None)


def is_ints(x, n=None) -> bool:
    """A JSON list of ints (not strings, floats or booleans), of length ``n`` if given."""
    return (isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
            and (n is None or len(x) == n))


# Bits per element of every dtype the safetensors library knows (its header may name any of them).
_ST_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
            "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
            "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_U64 = (1 << 64) - 1


def parse_json(raw, what: str):
    """``json.loads`` whose every failure (bad syntax or UTF-8, nesting too deep, an integer too
    long to convert) is a ValueError starting with ``what`` (the file, and the field if known)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(f"{what}: nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digits limit
        raise ValueError(f"{what}: not valid JSON ({e})") from None


class _Negative(int):
    """An integer written with a minus sign (``-0`` included): never a size or an offset."""


class _Object(dict):
    """A JSON object that remembers which keys it held more than once."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.repeated = {k for k, _ in pairs} if len(self) < len(pairs) else set()
        if self.repeated:
            seen = set()
            self.repeated = {k for k, _ in pairs if k in seen or seen.add(k)}


def _strict_number(text: str):
    value = float(text)
    if math.isinf(value):  # beyond float64 (the library's JSON reader refuses such numbers)
        raise ValueError(f"number {text[:20]}... out of range")
    return value


def _strict_int(text: str):
    _strict_number(text)
    return _Negative(int(text)) if text.startswith("-") else int(text)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MAX_DEPTH = 127  # the safetensors library's JSON reader stops at 128 nested arrays/objects


def _safetensors_json(text: str, bad):
    """The header as the safetensors library's (serde) JSON reader reads it: nesting at most 127
    deep, no NaN/Infinity, no number beyond float64, strings valid Unicode (no lone surrogate);
    objects keep which keys they repeated (:class:`_Object`), minus-signed ints are :class:`_Negative`."""
    depth = 0
    for c in re.findall(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        if depth > _MAX_DEPTH:
            raise bad(f"the header nests deeper than {_MAX_DEPTH} levels")
    try:
        header = json.loads(text, object_pairs_hook=_Object, parse_int=_strict_int, parse_float=_strict_number,
                            parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise bad(f"the header is not valid JSON ({e}): not a safetensors file") from None
    stack = [header]
    while stack:  # every string must be valid UTF-8 (a lone surrogate escape is not)
        x = stack.pop()
        items = list(x.items()) if isinstance(x, dict) else list(enumerate(x)) if isinstance(x, list) else []
        for k, v in items:
            for t in (k, v):
                if isinstance(t, str):
                    try:
                        t.encode("utf-8")
                    except UnicodeEncodeError:
                        raise bad(f"the header holds an invalid string {t[:20]!r}") from None
            if isinstance(v, (dict, list)):
                stack.append(v)
    return header


def safetensors_header(path: str, where: str):
    """``(tensor entries, metadata, absolute offset of the data, os.stat_result)`` of a safetensors
    file, reading its header only, accepting exactly what the safetensors library accepts (its
    rules, checked here without mapping the file: the library maps it whole, which a table larger
    than the address space allows cannot be): JSON as its reader reads it (:func:`_safetensors_json`),
    every entry with a known dtype, a shape and two data offsets (non-negative 64-bit ints, a field
    named once) whose span holds exactly the shape's bytes, the spans in offset order tiling the
    data from 0 to the file's end without gap or overlap (a tensor named twice: the last entry
    counts, as in the library). A problem (also: not a regular file (a FIFO or device is
    refused without blocking on it), short, a length field past the end, not a JSON object,
    metadata not strings to strings) is a ValueError naming ``where`` and the file."""

    def bad(msg):
        return ValueError(f"{where}: {path}: {msg}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{where}: cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise bad("not a regular file (a directory, FIFO, socket or device cannot hold a table)")
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise bad(f"{st.st_size} bytes is too short for a safetensors file (8-byte header length + JSON header)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER or 8 + n > st.st_size:
            raise bad(f"header length field says {n} bytes but the file has {st.st_size} bytes: not a safetensors "
                      "file, or truncated")
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the header is not valid JSON ({e}): not a safetensors file") from None
    header = _safetensors_json(text, bad)
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object: not a safetensors file")
    if "__metadata__" in header.repeated:
        raise bad("__metadata__ appears twice")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ must be a JSON object of strings to strings (the safetensors format)")
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or not is_ints(e.get("shape")) \
                or not is_ints(e.get("data_offsets"), 2):
            raise bad(f"tensor {name!r} entry {e!r} needs dtype (a string), shape (a list of ints) and "
                      "data_offsets (two ints)")
        if e.repeated & {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} entry names {sorted(e.repeated)} twice")
        (begin, end), shape = e["data_offsets"], e["shape"]
        if not all(0 <= v <= _U64 and not isinstance(v, _Negative) for v in (begin, end, *shape)):
            raise bad(f"tensor {name!r}: shape {shape} and data_offsets [{begin}, {end}] must be 64-bit "
                      "non-negative ints")
        bits = _ST_BITS.get(e["dtype"])
        if bits is None:
            raise bad(f"tensor {name!r} has dtype {e['dtype']!r}, not a safetensors dtype")
        nbits = math.prod(shape) * bits
        if nbits % 8 or nbits // 8 > _U64 or end - begin != nbits // 8:
            raise bad(f"tensor {name!r} data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} "
                      f"in {e['dtype']} needs {nbits / 8:g}")
        spans.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise bad(f"tensor {name!r} data_offsets start at {begin}, expected {covered}: tensors must tile the "
                      "data without gap or overlap")
        covered = end
    if 8 + n + covered != st.st_size:
        raise bad(f"the tensors cover {covered} data bytes but the file holds {st.st_size - 8 - n}: truncated, or "
                  "bytes appended")
    return header, meta, 8 + n, st


def _quantized_on_meta(shape, meta: Dict[str, str], bad) -> QuantizedLUT:
    """The QuantizedLUT the metadata describes, over a meta-device payload of ``shape``: checks that
    format, dim, block size, dtype and layout are valid and that the row size matches them."""
    try:
        return QuantizedLUT.from_metadata(torch.empty(shape, dtype=torch.uint8, device="meta"), meta,
                                          check_sample=False)
    except ValueError as e:
        raise bad(f"quantized table: {e}") from None


def _header_bytes(shape, dtype, metadata: Dict[str, str]) -> bytes:
    header = {
        "__metadata__": metadata,
        TENSOR_NAME: {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [0, math.prod(shape) * dtype.itemsize]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(raw))) % _HEADER_ALIGN
    return struct.pack("<Q", len(raw) + pad) + raw + b" " * pad


def _metadata(shape, dtype, quantized: Optional[QuantizedLUT] = None) -> Dict[str, str]:
    """File metadata of a ``[V, L, E, D]`` table of ``dtype``; a quantized one adds its QuantizedLUT.metadata()."""
    V, L, E, D = shape
    version = FORMAT_VERSION if quantized is not None else _FLOAT_FORMAT_VERSION
    meta = {"format": "mole_kernels.lut", "format_version": str(version), "vocab": str(V), "layers": str(L),
            "experts": str(E), "hidden": str(D), "dtype": str(dtype).replace("torch.", "")}
    if quantized is not None:
        meta.update(quantized.metadata())
    return meta


def _check_quantized_rows(sample: torch.Tensor, info: _FileInfo, path: str) -> None:
    """Checks a quantized file's first and last tokens' rows (``sample``: their packed bytes)."""
    q = info.template
    try:
        QuantizedLUT(sample, q.format, q.dim, q.block_size, q.dtype).check_sample()
    except ValueError as e:
        raise ValueError(f"LookupTable.open: {path}: quantized table: {e}") from None


def _write_table(path: str, shape, dtype: torch.dtype, metadata: Dict[str, str],
                 read_tokens: Callable[[int, int], torch.Tensor], step: Optional[int] = None,
                 progress: bool = True) -> None:
    """Writes a table file whole or not at all (:func:`mole_kernels._files.atomic_write`: a unique
    temporary file in the target's folder, never a fixed name, never through a symlink, the usual
    permissions), filled chunk by chunk with ``read_tokens(a, b)`` (the stored rows of tokens
    [a, b) as a CPU tensor; ``step`` tokens at a time, default :func:`_chunk_rows`): a table is
    never copied whole."""
    check_replaceable(path, "saving a table")  # a FIFO or device (/dev/null) is never replaced by a file
    shape = tuple(shape) if len(shape) == 4 else (shape[0], 1, *shape[1:])
    nbytes = math.prod(shape) * dtype.itemsize
    with _progress(nbytes, f"saving {os.path.basename(path)}" if progress else None) as bar, atomic_write(path) as f:
        f.write(_header_bytes(shape, dtype, metadata))
        step = step or _chunk_rows(math.prod(shape[1:]) * dtype.itemsize, nbytes)
        for a in range(0, shape[0], step):
            chunk = read_tokens(a, min(shape[0], a + step))
            f.write(chunk.contiguous().view(torch.uint8).numpy().data)
            bar.update(chunk.numel() * dtype.itemsize)
