"""Checkpoint folders in the official (Hugging Face) layout: config.json plus model.safetensors or
pytorch_model.bin (single or sharded), read and written with clear errors naming the file."""
from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import nn

from .._files import FolderUpdate, check_replaceable, folder_file, target_name
from ..table.file_format import _chunk_rows, parse_json, safetensors_header
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
        with open(fpath, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{where}: cannot read {fpath}: {e.strerror}") from None
    return parse_json(raw, f"{where}: {fpath} is not valid JSON {what}")


def _file(path: str, name: str) -> Optional[str]:
    """Where ``name`` of the folder ``path`` is read from (None: absent): through the journal of a
    save that was committed but interrupted (:func:`mole_kernels._files.folder_file`)."""
    return folder_file(path, name)


def _read_config(path: str, where: str) -> MoLEConfig:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: {path!r} is not a directory (expected a Hugging Face-format folder "
                                f"with {CONFIG_NAME} and {SAFE_WEIGHTS} or {BIN_WEIGHTS})")
    cfg_path = _file(path, CONFIG_NAME)
    if cfg_path is None:
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
        fpath = _file(path, single)
        if fpath is not None:
            return [fpath]
        ipath = _file(path, single + _INDEX)
        if ipath is not None:
            files = []
            for s in _shard_names(ipath, where):
                fpath = _file(path, s)
                if fpath is None:
                    raise FileNotFoundError(f"{where}: shard {os.path.join(path, s)} listed in {ipath} is missing")
                files.append(fpath)
            return files
    raise FileNotFoundError(f"{where}: {path!r} has no {SAFE_WEIGHTS} or {BIN_WEIGHTS} (nor a sharded index)")


# -- reading tensors in place ------------------------------------------------------------

# safetensors dtype names (other dtypes the format knows are read by no MoLE checkpoint).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_LUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # a LUT is float: only these are served in place


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes lie in a weight file: contiguous row-major data of ``shape`` in ``dtype``."""

    file: str  # the weight file's path
    offset: int  # absolute byte offset of the tensor's first element in the file
    dtype: torch.dtype
    shape: Tuple[int, ...]  # the data is contiguous row-major: nbytes = prod(shape) * itemsize
    identity: Tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file when it was parsed: a replaced file is refused

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _pread_into(fd: int, t: torch.Tensor, offset: int, what: str) -> None:
    """Fills the contiguous CPU tensor ``t`` with the file's bytes at ``offset``."""
    view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise ValueError(f"the file ends inside {what}: truncated while being read")
        view, offset = view[n:], offset + n


class _SafetensorsFile:
    """One safetensors weight file, its header read and validated once (as the library does)."""

    def __init__(self, fpath: str, where: str):
        self.path = fpath
        header, _, data_start, st = safetensors_header(fpath, where)
        self.entries, self.identity = header, (st.st_dev, st.st_ino)
        self.shapes = {k: (tuple(e["shape"]), _ST_DTYPES.get(e["dtype"])) for k, e in header.items()}
        self._start = data_start

    def locate(self, name: str) -> Optional[TensorLocation]:
        shape, dtype = self.shapes[name]
        if dtype not in _LUT_DTYPES:
            return None
        return TensorLocation(self.path, self._start + self.entries[name]["data_offsets"][0], dtype, shape,
                              self.identity)

    def load(self, names) -> Dict[str, torch.Tensor]:
        """The tensors ``names``, each read with ``pread`` into a new tensor."""
        out = {}
        with open(self.path, "rb", buffering=0) as f:
            for name in names:
                shape, dtype = self.shapes[name]
                if dtype is None:
                    raise ValueError(f"tensor {name!r} has dtype {self.entries[name]['dtype']}, which a MoLE "
                                     "checkpoint does not use")
                t = torch.empty(shape, dtype=dtype)
                _pread_into(f.fileno(), t, self._start + self.entries[name]["data_offsets"][0], f"tensor {name!r}")
                out[name] = t
        return out


@dataclass(frozen=True)
class _BinTensor:
    """A tensor of a ``.bin`` as torch would build it, without its data: a view of storage ``key``."""

    key: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int  # in elements
    parameter: bool  # an nn.Parameter (torch rebuilds one)
    requires_grad: bool


def _bin_structure(fpath: str):
    """``(tensors, storages, records)`` of a ``torch.save`` zip file, reading no tensor data:
    ``tensors`` name -> :class:`_BinTensor`, ``storages`` key -> (dtype, nbytes, dtypes it was
    referenced with) for each storage with data (torch makes an empty one anew per reference), ``records`` key -> absolute offset of the storage's bytes, for the
    storages whose bytes are provably what ``torch.load(weights_only=True)`` reads.

    The pickle runs through torch's own weights-only unpickler, with torch's rules for storages
    (one storage per key, cached under the first reference's dtype, as ``torch.load`` does) on the
    ``meta`` device: what torch would build (dtype, shape, strides, storage offset, storage
    identity, a later ``BUILD``/``set_`` included) is read off the result, nothing is computed
    here. A record's bytes count only when torch's zip reader (miniz) and Python's ``zipfile``
    agree on where they are, it is stored uncompressed with exactly the storage's size, its name
    is unique and the byte order is little-endian. None when the file is not such a zip or anything
    in it is not understood (the caller then loads it with ``torch.load``, the authority)."""
    import warnings

    from torch import _weights_only_unpickler

    try:
        reader = torch._C.PyTorchFileReader(fpath)
        records = set(reader.get_all_records())
        if "data.pkl" not in records or "constants.pkl" in records:
            return None
        little = not reader.has_record("byteorder") or reader.get_record("byteorder") == b"little"
        pkl = reader.get_record("data.pkl")
    except Exception:
        return None
    storages: Dict[str, list] = {}  # key -> [typed storage, dtype, nbytes, dtypes seen]
    issued: Dict[int, str] = {}  # the storages this load made (their C pointer) -> key

    def persistent_load(pid):  # as torch.serialization._load's, on the meta device
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise _NotUnderstood("a persistent id")
        storage_type, key, _, numel = pid[1:]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key in storages:
            storages[key][3].add(dtype)
            return storages[key][0]
        nbytes = numel * torch._utils._element_size(dtype)
        if not isinstance(key, str) or not reader.has_record(f"data/{key}"):
            raise _NotUnderstood(f"storage {key!r}")
        untyped = torch.UntypedStorage(nbytes, device="meta")
        typed = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        issued[untyped._cdata] = key
        if nbytes:  # torch caches a storage that has data; an empty one is made per reference
            storages[key] = [typed, dtype, nbytes, {dtype}]
        return typed

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pkl), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = unpickler.load()
    except Exception:
        return None
    finally:
        getattr(torch._utils, "_sparse_tensors_to_validate", []).clear()  # torch's list: nothing of this parse stays
    if not isinstance(obj, dict):
        return None
    tensors = {}
    for name, t in obj.items():
        if not isinstance(name, str) or type(t) not in (torch.Tensor, nn.Parameter) or t.layout != torch.strided \
                or t.device.type != "meta":
            return None
        key = issued.get(t.untyped_storage()._cdata)
        if key is None:
            return None
        tensors[name] = _BinTensor(key, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                                   type(t) is nn.Parameter, t.requires_grad)
    storages = {k: (v[1], v[2], frozenset(v[3])) for k, v in storages.items()}
    return tensors, storages, (_bin_records(fpath, reader, storages) if little else {})


class _NotUnderstood(Exception):
    """A part of a ``.bin`` pickle this reader does not mirror (never executed)."""


def _bin_records(fpath: str, reader, storages) -> Dict[str, int]:
    """key -> absolute offset of the storage's bytes, for the records torch's zip reader and
    ``zipfile`` both place at that offset, stored uncompressed with exactly the storage's size
    under a name no other entry has (see :func:`_bin_structure`)."""
    try:
        with zipfile.ZipFile(fpath) as z:
            infos = z.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names) or not infos:
            return {}
        prefix = names[0].split("/", 1)[0] + "/"  # torch's archive name: the first entry's folder
        by_name = {i.filename: i for i in infos}
        out = {}
        with open(fpath, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for key, (dtype, nbytes, _) in storages.items():
                info = by_name.get(f"{prefix}data/{key}")
                if info is None or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1 \
                        or info.file_size != nbytes or info.compress_size != nbytes:
                    continue
                local = os.pread(f.fileno(), 30, info.header_offset)
                if len(local) != 30 or local[:4] != b"PK\x03\x04" or struct.unpack("<H", local[8:10])[0] != 0:
                    continue
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                data = info.header_offset + 30 + name_len + extra_len
                if data != reader.get_record_offset(f"data/{key}") or data + nbytes > size:
                    continue
                out[key] = data
        return out
    except Exception:
        return {}


def _view_extent(t: _BinTensor) -> int:
    """Elements of the storage the view reaches (from its start)."""
    if 0 in t.shape:
        return 0
    return t.offset + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride))


def _row_major(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> bool:
    want = 1
    for size, st in zip(reversed(shape), reversed(stride)):
        if size != 1 and st != want:
            return False
        want *= size
    return True


class _BinFile:
    """One ``pytorch_model.bin`` (``torch.save``), its pickle read once. Tensors whose storages'
    bytes are provably torch's (:func:`_bin_structure`) are read with ``pread`` (storages shared as
    torch shares them); anything else in the file is loaded by ``torch.load(weights_only=True)``
    itself, whole, once."""

    def __init__(self, fpath: str, where: str):
        self.path, self._where = fpath, where
        self._loaded: Optional[Dict[str, torch.Tensor]] = None
        try:
            st = os.stat(fpath)
        except OSError as e:
            raise ValueError(f"{where}: cannot read weights from {fpath}: {e.strerror}") from None
        self.identity = (st.st_dev, st.st_ino)
        structure = _bin_structure(fpath)
        if structure is None:
            self._tensors, self._storages, self._records = {}, {}, {}
            self._torch_load()
            self.shapes = {k: (tuple(v.shape), v.dtype) for k, v in self._loaded.items()}
        else:
            self._tensors, self._storages, self._records = structure
            self.shapes = {k: (t.shape, t.dtype) for k, t in self._tensors.items()}

    def _torch_load(self) -> Dict[str, torch.Tensor]:
        if self._loaded is None:
            try:  # never mmap=True: a mapped load takes a compressed record's bytes as its data
                part = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file: say which
                raise ValueError(f"{self._where}: cannot read weights from {self.path}: {e}") from e
            _check_part(self.path, part, set(), self._where)
            self._loaded = part
        return self._loaded

    def _readable(self, t: _BinTensor) -> bool:
        """Whether ``t``'s bytes can be read from its record: the record is proven, the view lies in it."""
        if t.key not in self._storages:  # an empty storage (torch makes one per reference): no bytes
            return _view_extent(t) == 0
        dtype, nbytes, _ = self._storages[t.key]
        return t.key in self._records and _view_extent(t) * dtype.itemsize <= nbytes

    def locate(self, name: str) -> Optional[TensorLocation]:
        t = self._tensors.get(name)
        if t is None or t.dtype not in _LUT_DTYPES or t.key not in self._records or not self._readable(t) \
                or len(self._storages[t.key][2]) != 1 or not _row_major(t.shape, t.stride):
            return None  # (an empty tensor has no record: loaded, it costs nothing)
        return TensorLocation(self.path, self._records[t.key] + t.offset * t.dtype.itemsize, t.dtype, t.shape,
                              self.identity)

    def load(self, names) -> Dict[str, torch.Tensor]:
        names = list(names)
        if self._loaded is not None or not all(self._readable(self._tensors[n]) for n in names):
            loaded = self._torch_load()
            return {n: loaded[n] for n in names}
        out, storages = {}, {}
        with open(self.path, "rb", buffering=0) as f:
            for name in names:
                t = self._tensors[name]
                if t.key not in self._storages:
                    v = torch.empty_strided(t.shape, t.stride, dtype=t.dtype)
                else:
                    if t.key not in storages:
                        dtype, nbytes, _ = self._storages[t.key]
                        raw = torch.empty(nbytes, dtype=torch.uint8)
                        _pread_into(f.fileno(), raw, self._records[t.key], f"tensor {name!r}")
                        storages[t.key] = raw.untyped_storage()
                    v = torch.empty(0, dtype=t.dtype).set_(storages[t.key], t.offset, t.shape, t.stride)
                out[name] = nn.Parameter(v, t.requires_grad) if t.parameter else v.requires_grad_(t.requires_grad)
        return out


def is_safetensors(fpath: str) -> bool:
    """Whether a weight file is safetensors (by its name; a file still under the temporary name of
    an interrupted save, read through its journal, by its target's)."""
    return target_name(fpath).endswith(".safetensors")


def _check_part(fpath: str, part, seen: set, where: str) -> None:
    """``part`` (what ``fpath`` holds) is a state dict with no tensor named in ``seen`` (the other shards')."""
    if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in part.items()):
        raise ValueError(f"{where}: {fpath} does not hold a state dict (names -> tensors)")
    twice = sorted(seen & set(part))
    if twice:
        raise ValueError(f"{where}: {fpath} repeats tensor(s) of another shard, e.g. {twice[:4]}")


class WeightFiles:
    """A checkpoint's weight files, each header (safetensors) or pickle (``.bin``) read once:
    :attr:`shapes` (name -> (shape, dtype)) and :attr:`holder` (name -> file) without reading any
    tensor data, :meth:`locate` (where a float tensor's bytes lie, to serve it in place) and
    :meth:`load`. Every problem is a ValueError naming the file; a tensor in two files is one too."""

    def __init__(self, files: List[str], where: str):
        self.where = where
        self.files = [(_SafetensorsFile if is_safetensors(f) else _BinFile)(f, where) for f in files]
        self.shapes: Dict[str, Tuple[Tuple[int, ...], Optional[torch.dtype]]] = {}
        self.holder: Dict[str, object] = {}
        for wf in self.files:
            twice = sorted(set(self.holder) & set(wf.shapes))
            if twice:
                raise ValueError(f"{where}: {wf.path} repeats tensor(s) of another shard ({self.holder[twice[0]].path}),"
                                 f" e.g. {twice[:4]}")
            self.shapes.update(wf.shapes)
            self.holder.update(dict.fromkeys(wf.shapes, wf))

    def locate(self, name: str) -> Optional[TensorLocation]:
        """Where tensor ``name``'s bytes lie, when it can be served in place: float32/16/bf16,
        row-major contiguous, in a safetensors file or a ``.bin`` record proven to hold exactly
        what torch reads (else None: load it)."""
        wf = self.holder.get(name)
        return None if wf is None else wf.locate(name)

    def load(self, skip: FrozenSet[str] = frozenset()) -> Dict[str, torch.Tensor]:
        """Every tensor but those named in ``skip``, whose data is never read (unless torch must
        load their ``.bin`` whole), each in memory of its own (no file mapping: a file truncated
        later cannot SIGBUS them)."""
        sd = {}
        for wf in self.files:
            try:
                sd.update(wf.load([k for k in wf.shapes if k not in skip]))
            except ValueError as e:
                if str(e).startswith(f"{self.where}:"):
                    raise
                raise ValueError(f"{self.where}: cannot read weights from {wf.path}: {e}") from e
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
    """Writes a safetensors file tensor by tensor, the streamed ones in chunks of rows (the
    package's one chunk policy, :func:`mole_kernels.table.file_format._chunk_rows`): no tensor is
    copied whole, nor the state dict (``safetensors.torch.save_file`` copies both).

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
            row = math.prod(s.shape[1:]) * s.dtype.itemsize
            step = _chunk_rows(row, s.shape[0] * row)
            for a in range(0, s.shape[0], step):
                f.write(_raw(_rows(k, s, a, min(s.shape[0], a + step))))


def check_output_folder(path: str, where: str) -> None:
    """ValueError unless ``path`` can become a checkpoint folder: absent (its parent a folder) or a
    folder whose ``config.json`` and weight file names are free or regular files. Checked before
    any work."""
    check = f"{where}: {path!r}"
    if not path:
        raise ValueError(f"{where}: the output folder path is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{check} exists and is not a directory")
    if os.path.isdir(path):
        for name in (SAFE_WEIGHTS, BIN_WEIGHTS, CONFIG_NAME):
            check_replaceable(os.path.join(path, name), where)


def save_checkpoint(path: str, sd: Dict[str, torch.Tensor], config: dict, safe: bool,
                    streamed: Optional[Dict[str, StreamedTensor]] = None) -> None:
    """Writes ``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``) into
    the folder ``path``, replacing any earlier checkpoint there.

    ``streamed``: more tensors, read a chunk of rows at a time (:class:`StreamedTensor`). In
    safetensors the extra memory is one chunk; ``torch.save`` needs whole tensors, so for
    ``pytorch_model.bin`` each is read whole (materialized) first.

    The folder's content changes in one commit (:class:`mole_kernels._files.FolderUpdate`): the
    weights and ``config.json`` are written and fsynced under temporary names, a journal commits
    them, they are renamed into place, and only then are the files of an earlier save that a
    loader could pick up instead (the other format, shard indexes and shards) removed. An
    interruption at any instant (Ctrl-C, SIGTERM, SIGKILL, power loss) leaves the old model or
    the new one for :meth:`from_pretrained`, and the temporary files of a killed save are removed
    by the next save into the folder.
    """
    streamed = dict(streamed or {})
    both = sorted(set(sd) & set(streamed))
    if both:
        raise ValueError(f"save_pretrained: tensor(s) {both[:4]} given both whole and streamed")
    path = os.fspath(path)
    check_output_folder(path, "save_pretrained")
    os.makedirs(path, exist_ok=True)
    keep = SAFE_WEIGHTS if safe else BIN_WEIGHTS
    with FolderUpdate(path, "save_pretrained") as update:
        tmp = update.temp_for(keep)
        if safe:
            _write_safetensors(tmp, sd, streamed)
        else:
            whole = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
            whole.update({k: _rows(k, s, 0, s.shape[0]) for k, s in streamed.items()})
            torch.save(whole, tmp)
        with open(update.temp_for(CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for name in _stale_files(path, keep):
            update.remove(name)


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


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.\d+\.experts\.(\d+)\.")


def check_counts(cfg: MoLEConfig, shapes: Dict[str, Tuple[Tuple[int, ...], object]], where: str, path: str) -> None:
    """Checks ``config.json``'s sizes against the weight files' headers before a model is built:
    the layer and expert indices the tensor names hold are exactly ``range(num_hidden_layers)`` and
    ``range(num_experts)`` (train form), and the embedding and LUT shapes match. After this, the
    model the config describes has no more modules than the files have tensors: building it costs
    what reading the files does (a config claiming a million layers cannot spend minutes first)."""
    def bad(msg):
        return ValueError(f"{where}: {path!r} does not match its config.json: {msg}")

    layers = {int(m.group(1)) for k in shapes for m in [_LAYER.match(k)] if m}
    if layers != set(range(cfg.num_hidden_layers)):
        raise bad(f"num_hidden_layers={cfg.num_hidden_layers} but the weights hold layers "
                  f"{_ranges(layers) or 'none'}")
    experts = {int(m.group(1)) for k in shapes for m in [_EXPERT.match(k)] if m}
    if experts and experts != set(range(cfg.num_experts)):
        raise bad(f"num_experts={cfg.num_experts} but the weights hold experts {_ranges(experts)}")
    V, L, E, D = cfg.lut_shape
    want = {"model.embed_tokens.weight": [(V, D)], LUT_KEY: [(V, L * E * D), (V, L, E, D)]}
    for name, shapes_ok in want.items():
        if name in shapes and tuple(shapes[name][0]) not in shapes_ok:
            raise bad(f"{name} has shape {list(shapes[name][0])}, the config needs {list(shapes_ok[0])}")


def _ranges(ints) -> str:
    s = sorted(ints)
    return f"{s[0]}..{s[-1]} ({len(s)} indices)" if s else ""
