"""Checkpoint folders in the official (Hugging Face) layout: config.json plus model.safetensors or
pytorch_model.bin (single or sharded), read and written with clear errors naming the file."""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import nn

from .._files import atomic_path, atomic_write
from ..table.file_format import is_ints, safetensors_header
from .config import MoLEConfig

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
BIN_WEIGHTS = "pytorch_model.bin"
_INDEX = ".index.json"
LUT_KEY = "model.moe_table.weight"
# Shard names as Hugging Face writes them (model-00001-of-00002.safetensors, ...).
_HF_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")


def _read_json(fpath: str, where: str, what: str):
    try:
        with open(fpath, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: {fpath} is not valid JSON {what} ({e})") from None


def _read_config(path: str, where: str) -> MoLEConfig:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: {path!r} is not a directory (expected a Hugging Face-format folder "
                                f"with {CONFIG_NAME} and {SAFE_WEIGHTS} or {BIN_WEIGHTS})")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{where}: {path!r} has no {CONFIG_NAME}")
    return MoLEConfig.from_dict(_read_json(cfg_path, where, "(a config)"), source=f"{where}: {cfg_path}")


def _shard_names(ipath: str, where: str) -> List[str]:
    """The shard file names a ``*.index.json`` lists: plain names in its folder, each a weight file."""
    index = _read_json(ipath, where, "(a shard index)")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{where}: {ipath} is not a valid shard index (expected {{\"weight_map\": {{tensor name: "
                         f"shard file name}}}})")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        # A shard outside the folder, or a file that is not weights, is not something to read (or delete).
        if os.path.basename(name) != name or name in (".", "..") or not name.endswith((".safetensors", ".bin")):
            raise ValueError(f"{where}: {ipath} lists shard {name!r}, which is not a .safetensors/.bin file name in "
                             "its folder")
    return shards


def _weight_files(path: str, where: str) -> List[str]:
    """The weight files of a folder: single or sharded (``*.index.json``), safetensors preferred."""
    for single in (SAFE_WEIGHTS, BIN_WEIGHTS):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
        ipath = os.path.join(path, single + _INDEX)
        if os.path.isfile(ipath):
            files = [os.path.join(path, s) for s in _shard_names(ipath, where)]
            for fpath in files:
                if not os.path.isfile(fpath):
                    raise FileNotFoundError(f"{where}: shard {fpath} listed in {ipath} is missing")
            return files
    raise FileNotFoundError(f"{where}: {path!r} has no {SAFE_WEIGHTS} or {BIN_WEIGHTS} (nor a sharded index)")


# -- reading tensors in place ------------------------------------------------------------

# safetensors dtype names and item sizes (sub-byte types are not sized here: never located or written).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_LUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # a LUT is float: only these are located
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes lie in a weight file: contiguous row-major data of ``shape`` in ``dtype``."""

    file: str  # the weight file's path
    offset: int  # absolute byte offset of the tensor's first element in the file
    dtype: torch.dtype
    shape: Tuple[int, ...]  # the data is contiguous row-major: nbytes = prod(shape) * itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _safetensors_header(fpath: str, where: str) -> Tuple[Dict[str, dict], int]:
    """(tensor entries, absolute offset of the data) of a safetensors file, validated against the
    file (every entry's size matches its shape and lies inside the file); a problem is a ValueError
    naming the file. Reads the header only; a FIFO or device is refused without blocking on it."""

    def bad(msg):
        return ValueError(f"{where}: {fpath}: {msg}")

    header, _, data_start, st = safetensors_header(fpath, where)
    for name, e in header.items():
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or not is_ints(e.get("shape")) \
                or not is_ints(e.get("data_offsets"), 2):
            raise bad(f"tensor {name!r} entry {e!r} needs dtype (a string), shape (a list of ints) and "
                      "data_offsets (two ints)")
        (begin, end), shape = e["data_offsets"], e["shape"]
        if min(shape, default=0) < 0 or not 0 <= begin <= end or data_start + end > st.st_size:
            raise bad(f"tensor {name!r} has shape {shape} and data_offsets [{begin}, {end}], outside the file's "
                      f"{st.st_size - data_start} data bytes: corrupt or truncated")
        dtype = _ST_DTYPES.get(e["dtype"])
        if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} data_offsets [{begin}, {end}] hold {end - begin} bytes but shape {shape} in "
                      f"{e['dtype']} needs {math.prod(shape) * dtype.itemsize}")
    return header, data_start


class _NotLocatable(Exception):
    """A .bin file's pickle holds something the record parser does not read (never executed)."""


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str  # the zip record is <prefix>/data/<key>
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorRecord:
    storage: _Storage
    offset: int  # in elements
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


def _tensor_record(storage, storage_offset, size, stride, *_):
    """Stands in for ``torch._utils._rebuild_tensor_v2``: where the tensor is, not the tensor."""
    def ints(x):
        return isinstance(x, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)

    if not isinstance(storage, _Storage) or not ints((storage_offset,)) or not ints(size) or not ints(stride) \
            or len(size) != len(stride):
        raise _NotLocatable("a tensor record of an unknown form")
    return _TensorRecord(storage, storage_offset, size, stride)


def _parameter(data, *_):
    """Stands in for ``torch._utils._rebuild_parameter[_with_state]``: a parameter is where its data is."""
    if not isinstance(data, _TensorRecord):
        raise _NotLocatable("a parameter of an unknown form")
    return data


_BIN_STORAGES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                 "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                 "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                 "BoolStorage": torch.bool}


class _RecordUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` pickle into names -> :class:`_TensorRecord` without building a tensor:
    the few globals a state dict uses map to inert stand-ins, any other global is refused (never
    imported, never called)."""

    _GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
                ("torch._utils", "_rebuild_tensor_v2"): _tensor_record,
                ("torch._utils", "_rebuild_parameter"): _parameter,
                ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
                **{("torch", n): _StorageType(d) for n, d in _BIN_STORAGES.items()}}

    def find_class(self, module, name):
        try:
            return self._GLOBALS[(module, name)]
        except KeyError:
            raise _NotLocatable(f"global {module}.{name}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise _NotLocatable("a storage of an unknown form")
        return _Storage(pid[2], pid[1].dtype)


def _bin_records(fpath: str) -> Optional[Tuple[Dict[str, _TensorRecord], Dict[str, zipfile.ZipInfo]]]:
    """(names -> tensor records, storage key -> its zip entry) of a ``torch.save`` zip file, reading
    no tensor data; None when it is not one this parser reads (a legacy file, a big-endian save, a
    pickle with any other global or form, not a dict of tensors, a broken zip)."""
    try:
        with zipfile.ZipFile(fpath) as z:
            pkls = [i for i in z.infolist() if re.fullmatch(r"[^/]+/data\.pkl", i.filename)]
            if len(pkls) != 1:
                return None
            prefix = pkls[0].filename[:-len("data.pkl")]
            if prefix + "byteorder" in z.NameToInfo and z.read(prefix + "byteorder") != b"little":
                return None
            obj = _RecordUnpickler(io.BytesIO(z.read(pkls[0]))).load()
            entries = {i.filename[len(prefix + "data/"):]: i for i in z.infolist()
                       if i.filename.startswith(prefix + "data/")}
    except Exception:  # a foreign or broken file, whatever the parser tripped on: not located, never run
        return None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _TensorRecord)
                                            for k, v in obj.items()):
        return None
    return dict(obj), entries


def _row_major(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> bool:
    want = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size != 1 and st != want:
            return False
        want *= size
    return True


def _locate_bin_record(fpath: str, rec: _TensorRecord, entry: Optional[zipfile.ZipInfo]) -> Optional[TensorLocation]:
    """The location of a ``.bin`` tensor record: its storage's zip entry must be stored uncompressed
    (``torch.save`` never compresses) and hold the tensor, which must be a float row-major one."""
    dtype = rec.storage.dtype
    if entry is None or entry.compress_type != zipfile.ZIP_STORED or entry.flag_bits & 1 \
            or dtype not in _LUT_DTYPES or (math.prod(rec.shape) and not _row_major(rec.shape, rec.stride)):
        return None
    begin = rec.offset * dtype.itemsize
    if begin + math.prod(rec.shape) * dtype.itemsize > entry.file_size:
        return None
    try:
        with open(fpath, "rb") as f:
            local = os.pread(f.fileno(), 30, entry.header_offset)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if len(local) != 30 or local[:4] != _ZIP_MAGIC:
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    data = entry.header_offset + 30 + name_len + extra_len  # the record's bytes follow its local header
    if data + entry.file_size > size:
        return None
    return TensorLocation(fpath, data + begin, dtype, tuple(rec.shape))


def _is_zip(fpath: str) -> bool:
    """Whether a ``.bin`` is in ``torch.save``'s zip format (since torch 1.6), as torch tells it."""
    with open(fpath, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


def _load_bin(fpath: str) -> dict:
    """``torch.load`` of a ``.bin``, memory-mapped when it is a zip file: no tensor data is read until touched."""
    return torch.load(fpath, map_location="cpu", weights_only=True, mmap=_is_zip(fpath))


def _check_part(fpath: str, part, seen: set, where: str) -> None:
    """``part`` (what ``fpath`` holds) is a state dict with no tensor named in ``seen`` (the other shards')."""
    if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in part.items()):
        raise ValueError(f"{where}: {fpath} does not hold a state dict (names -> tensors)")
    twice = sorted(seen & set(part))
    if twice:
        raise ValueError(f"{where}: {fpath} repeats tensor(s) of another shard, e.g. {twice[:4]}")


def tensor_names(files: List[str], where: str) -> Dict[str, str]:
    """name -> the file holding it, for every tensor of a checkpoint's weight files, reading no tensor data.

    safetensors: from the header. ``.bin``: from the pickle (:class:`_RecordUnpickler`), or else
    through ``torch.load(weights_only=True)``, memory-mapped (a legacy non-zip ``.bin`` is read whole).
    A file that cannot be read, or a tensor in two files, is a ValueError naming the file."""
    out: Dict[str, str] = {}
    for fpath in files:
        if fpath.endswith(".safetensors"):
            part = _safetensors_header(fpath, where)[0]
        else:
            records = _bin_records(fpath)
            try:
                part = records[0] if records is not None else _load_bin(fpath)
            except Exception as e:  # a truncated or foreign file: say which
                raise ValueError(f"{where}: cannot read weights from {fpath}: {e}") from e
            if records is None:
                _check_part(fpath, part, set(), where)
        twice = sorted(set(out) & set(part))
        if twice:
            raise ValueError(f"{where}: {fpath} repeats tensor(s) of another shard, e.g. {twice[:4]}")
        out.update(dict.fromkeys(part, fpath))
    return out


def locate_tensor(files: List[str], name: str, where: str) -> Optional[TensorLocation]:
    """Where tensor ``name``'s bytes lie in the weight files, reading no tensor data.

    None when it cannot be read in place, and then the caller loads it: the tensor is absent, or
    not F32/F16/BF16 (a LUT is float), or in a ``.bin`` that is not plainly readable (a legacy
    non-zip file, a pickle with any global beyond a state dict's tensors, parameters and typed
    storages: never executed), or not row-major contiguous there (a transposed view), or its
    record is compressed or too short. A ``.bin`` whose pickle cannot be read leaves it unknown
    whether it holds ``name``: None as well. A safetensors header problem, or ``name`` in two
    files, is a ValueError naming the file."""
    found: List[TensorLocation] = []
    holders: List[str] = []
    for fpath in files:
        if fpath.endswith(".safetensors"):
            header, data_start = _safetensors_header(fpath, where)
            if name in header:
                holders.append(fpath)
                e = header[name]
                dtype = _ST_DTYPES.get(e["dtype"])
                if dtype in _LUT_DTYPES:
                    found.append(TensorLocation(fpath, data_start + e["data_offsets"][0], dtype, tuple(e["shape"])))
        else:
            records = _bin_records(fpath)
            if records is None:
                return None
            if name in records[0]:
                holders.append(fpath)
                rec = records[0][name]
                loc = _locate_bin_record(fpath, rec, records[1].get(rec.storage.key))
                if loc is not None:
                    found.append(loc)
    if len(holders) > 1:
        raise ValueError(f"{where}: {holders[1]} repeats tensor {name!r} of another shard ({holders[0]})")
    return found[0] if found else None


def _read_safetensors(fpath: str, where: str, skip: FrozenSet[str]) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file but ``skip``, each read with ``pread`` into a new tensor."""
    header, data_start = _safetensors_header(fpath, where)
    part = {}
    with open(fpath, "rb", buffering=0) as f:
        for name, e in header.items():
            if name in skip:
                continue
            dtype = _ST_DTYPES.get(e["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has dtype {e['dtype']}, which a MoLE checkpoint does not use")
            t = torch.empty(e["shape"], dtype=dtype)
            view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            offset = data_start + e["data_offsets"][0]
            while len(view):
                n = os.preadv(f.fileno(), [view], offset)
                if n == 0:
                    raise ValueError(f"the file ends inside tensor {name!r}: truncated while being read")
                view, offset = view[n:], offset + n
            part[name] = t
    return part


def _load_state_dict(files: List[str], where: str, skip: FrozenSet[str] = frozenset()) -> Dict[str, torch.Tensor]:
    """Every tensor of the weight files but those named in ``skip``, whose data is never read.

    The kept tensors are in memory of their own: safetensors tensors are read with ``pread`` into
    new tensors (once: no mapping, no copy), a ``.bin`` is mapped to pick them and they are copied
    (storages shared as in the file), so nothing returned is backed by a mapping of a file that
    another process might truncate (a SIGBUS on the next read)."""
    sd: Dict[str, torch.Tensor] = {}
    for fpath in files:
        try:
            if fpath.endswith(".safetensors"):
                part = _read_safetensors(fpath, where, skip)
            else:
                part = _load_bin(fpath)
                if isinstance(part, dict):
                    part = copy.deepcopy({k: v for k, v in part.items() if k not in skip})
        except Exception as e:  # a truncated or foreign file: say which
            raise ValueError(f"{where}: cannot read weights from {fpath}: {e}") from e
        _check_part(fpath, part, set(sd), where)
        sd.update(part)
    return sd


def _stale_files(path: str, keep: str) -> List[str]:
    """What a save of ``keep`` would leave behind in ``path`` for a loader to find: the other weight
    file, every shard index and the shards they list or that are named like shards."""
    names = {SAFE_WEIGHTS, BIN_WEIGHTS, SAFE_WEIGHTS + _INDEX, BIN_WEIGHTS + _INDEX}
    for index in (SAFE_WEIGHTS + _INDEX, BIN_WEIGHTS + _INDEX):
        ipath = os.path.join(path, index)
        if os.path.isfile(ipath):
            try:
                names.update(_shard_names(ipath, "save_pretrained"))
            except ValueError:
                pass  # a broken index is removed; what it lists is not trusted
    names.update(n for n in os.listdir(path) if _HF_SHARD.match(n))
    names.discard(keep)
    return sorted(n for n in names if os.path.isfile(os.path.join(path, n)) or os.path.islink(os.path.join(path, n)))


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor written chunk by chunk (a LUT too big to hold twice): ``read_rows(a, b)`` gives rows
    [a, b) of dim 0 as a CPU tensor of ``dtype``, shape ``(b - a, *shape[1:])``."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    read_rows: Callable[[int, int], torch.Tensor]


_STREAM_CHUNK = 16 << 20  # bytes of rows per read_rows call


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor without copying it (a uint8 view: bf16 has no numpy dtype)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data


def _rows(name: str, s: StreamedTensor, a: int, b: int) -> torch.Tensor:
    chunk = s.read_rows(a, b)
    want = (b - a, *s.shape[1:])
    if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != want or chunk.dtype != s.dtype:
        got = f"{tuple(chunk.shape)} {chunk.dtype}" if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise ValueError(f"save_pretrained: streamed tensor {name!r}: read_rows({a}, {b}) gave {got}, expected "
                         f"{want} {s.dtype}")
    return chunk.to("cpu")


def _write_safetensors(fpath: str, sd: Dict[str, torch.Tensor], streamed: Dict[str, StreamedTensor]) -> None:
    """Writes a safetensors file tensor by tensor, the streamed ones in chunks of rows (~16 MiB):
    no tensor is copied whole, nor the state dict (``safetensors.torch.save_file`` copies both).

    As safetensors writes it: tensors by falling item size, then name (each aligned to its item
    size), data in that order without gaps, the header padded with spaces to a multiple of 8."""
    meta = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    meta.update({k: (tuple(s.shape), s.dtype) for k, s in streamed.items()})
    bad = sorted(k for k, (_, dtype) in meta.items() if dtype not in _ST_NAMES)
    if bad:
        raise ValueError(f"save_pretrained: safetensors cannot hold tensor(s) {bad[:4]} of dtype "
                         f"{meta[bad[0]][1]}")
    order = sorted(meta, key=lambda k: (-meta[k][1].itemsize, k))
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    end = 0
    for k in order:
        shape, dtype = meta[k]
        begin, end = end, end + math.prod(shape) * dtype.itemsize
        header[k] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(fpath, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in order:
            if k not in streamed:
                f.write(_raw(sd[k].detach().to("cpu")))
                continue
            s = streamed[k]
            step = max(1, _STREAM_CHUNK // max(1, math.prod(s.shape[1:]) * s.dtype.itemsize))
            for a in range(0, s.shape[0], step):
                f.write(_raw(_rows(k, s, a, min(s.shape[0], a + step))))


def save_checkpoint(path: str, sd: Dict[str, torch.Tensor], config: dict, safe: bool,
                    streamed: Optional[Dict[str, StreamedTensor]] = None) -> None:
    """Writes ``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``) into
    the folder ``path``, replacing any earlier checkpoint there.

    ``streamed``: more tensors, read a chunk of rows at a time (:class:`StreamedTensor`). In
    safetensors the extra memory is one chunk; ``torch.save`` needs whole tensors, so for
    ``pytorch_model.bin`` each is read whole (materialized) first.

    Every file is written whole or not at all (:mod:`mole_kernels._files`). The folder changes only
    after the weights are fully written: then ``config.json`` is removed, every weight file, shard
    index and shard of an earlier save that a loader could pick up instead is removed, the weights
    are published and the new ``config.json`` is written last. A crash in that short window leaves a
    folder without ``config.json`` (a loud error on load), never old weights read with a new config.
    """
    streamed = dict(streamed or {})
    both = sorted(set(sd) & set(streamed))
    if both:
        raise ValueError(f"save_pretrained: tensor(s) {both[:4]} given both whole and streamed")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_pretrained: {path!r} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    keep = SAFE_WEIGHTS if safe else BIN_WEIGHTS
    for name in (keep, CONFIG_NAME):  # refused now: found when publishing, the old files would be gone
        if os.path.isdir(os.path.join(path, name)):
            raise ValueError(f"save_pretrained: {os.path.join(path, name)!r} is a directory")
    with atomic_path(os.path.join(path, keep)) as tmp:
        if safe:
            _write_safetensors(tmp, sd, streamed)
        else:
            whole = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
            whole.update({k: _rows(k, s, 0, s.shape[0]) for k, s in streamed.items()})
            torch.save(whole, tmp)
        for name in [CONFIG_NAME] + _stale_files(path, keep):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, name))
    with atomic_write(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _is_expert_key(k: str) -> bool:
    return ".experts." in k or k.endswith("expert_layernorm.weight")


def _check_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], where: str, path: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing {len(missing)} tensor(s), e.g. {missing[:4]}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:4]}")
        raise ValueError(f"{where}: {path!r} does not match its config.json: " + "; ".join(msg))
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{where}: {path!r}: tensor {k} has shape {list(sd[k].shape)}, the config needs "
                             f"{list(shape)}")
        if not sd[k].is_floating_point():
            raise ValueError(f"{where}: {path!r}: tensor {k} has dtype {sd[k].dtype}, expected a float type")
