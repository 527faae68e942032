"""`LookupTable`: one object that owns where a LUT lives and gets its rows to where they are used.

Tiers (``placement``):

- ``"device"``: the table is a CUDA tensor; rows are read in place (path ``"device"``).
- ``"host"``: page-aligned host memory of exactly the table's size, registered with CUDA
  (pinned) when CUDA is available. Two paths to the GPU:
  ``"zero_copy"`` (the CUDA kernel reads the rows over PCIe in place; no synchronisation,
  best for small decode batches whose ids are on the GPU) and ``"dma"`` (ids on the host are
  deduplicated, host threads gather the unique rows into pinned staging and one async copy per
  chunk moves them to a device buffer, then a device-side gather expands them; best for large
  prefill batches). On a machine without
  CUDA the host tier is ordinary memory and both paths run on the CPU (same results).
- ``"disk"``: a safetensors file, kept open; nothing is read up front (a file larger than
  RAM works). Path ``"staged"``: host threads in the extension read the unique rows with
  ``pread`` (never through a memory mapping: a file truncated or rewritten by another process
  after ``open`` is then a clear error, not a SIGBUS) into the result on a CPU, or into a small
  pinned staging buffer on a GPU (in chunks when they do not fit, double-buffered so a chunk's
  DMA overlaps the next chunk's read), then the device gather.

``path="auto"`` picks: device tier -> ``device``; host tier -> ``zero_copy`` when ids are on
the GPU (moving them to the host would synchronise) or the batch has at most
``dma_min_tokens`` ids, else ``dma``; disk tier -> ``staged``.

Quantized tables (:class:`mole_kernels.QuantizedLUT`: int8 / fp8 / nf4 rows with in-row
scales) live on every tier the same way: the tier holds the packed uint8 rows
``[V, L, E, row_bytes]``, every copy (pinning, file, staging, DMA) moves those bytes only, and
the gather kernel dequantizes in registers. ``shape`` and ``dtype`` stay the logical
``[V, L, E, D]`` and the float dtype the table was quantized from; byte counts (``nbytes``,
``row_bytes``, :class:`TableStats`) are quantized bytes. A quantized file is the same
safetensors layout with a ``U8`` tensor and metadata naming format, block size and dtype.

Bad ids: ids on the host are checked there (an id outside ``[0, V)`` raises ``ValueError``
naming the first one); ids on a GPU are not (that would synchronise): such an id reads zero
rows and is counted in :attr:`LookupTable.faults`.

Threads: one table may be used from several threads at once; calls on it are serialised by a
lock (the GPU paths share pinned staging). A :class:`Prefetcher` or a reader belongs to one thread.

The C++ side (exact-size allocation and its release, the open file, the row copy threads) is
``torch.classes.mole_kernels.TableStore`` (csrc/lookup_table.cpp); this module is a thin owner of it.
"""
from __future__ import annotations

import math
import os
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .. import _C
from .._ops import ops, raise_on_bad_ids
from ..lut_gather import lut_gather
from ..quant import QuantizedLUT, canonical_format, quantize, quantized_layout
from .file_format import (_ST_DTYPES, TENSOR_NAME, _check_quantized_rows, _chunk_rows, _FileInfo, _metadata,
                          _progress, _read_header, _write_table)
from .prefetch import Prefetcher
from .reader import LayerReader

PLACEMENTS = ("device", "host", "disk")
_PATHS = {"device": ("device",), "host": ("zero_copy", "dma"), "disk": ("staged",)}


def host_allocations() -> Dict[str, int]:
    """Live exact-size host allocations made by tables (pinned or not): ``{"count", "bytes"}``."""
    count, nbytes = ops.host_allocations()
    return {"count": count, "bytes": nbytes}


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024


@dataclass
class TableStats:
    """Counters every call updates (cheap: a few integer adds and two clock reads per stage).

    ``bytes_read`` counts table bytes read from each tier; ``bytes_h2d`` the bytes that crossed
    from host to device (zero-copy reads or DMA). ``seconds`` is host wall time per stage
    (``read``: dedupe and bringing the unique rows over, by memcpy, pread or staged DMA;
    ``gather``: the kernel that reads or expands them); on CUDA it is submission time unless the
    stage synchronises.
    """

    calls: int = 0
    rows_requested: int = 0
    unique_rows: int = 0
    bytes_read: Dict[str, int] = field(default_factory=lambda: {t: 0 for t in PLACEMENTS})
    bytes_h2d: int = 0
    dma_copies: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)
    last_path: Optional[str] = None
    paths: Dict[str, int] = field(default_factory=dict)

    def add_time(self, stage: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + (t1 - t0)
        return t1

    def as_dict(self) -> dict:
        return {
            "calls": self.calls, "rows_requested": self.rows_requested, "unique_rows": self.unique_rows,
            "bytes_read": dict(self.bytes_read), "bytes_h2d": self.bytes_h2d, "dma_copies": self.dma_copies,
            "seconds": dict(self.seconds), "last_path": self.last_path, "paths": dict(self.paths),
        }


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _store(kind: str, path: str = "", offset: int = 0, nbytes: int = 0, pin: bool = False, device=None):
    """A TableStore; a pinned one is registered with CUDA under ``device`` (the device the table serves:
    registration works in the current device's context, which must not be another GPU's)."""
    if pin and device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            return torch.classes.mole_kernels.TableStore(kind, path, offset, nbytes, pin)
    return torch.classes.mole_kernels.TableStore(kind, path, offset, nbytes, pin)


class LookupTable:
    """A ``[V, L, E, D]`` lookup table in VRAM, pinned host memory or a file.

    Build with :meth:`from_tensor` or :meth:`open`; read rows with :meth:`gather` /
    :meth:`gather_combine` (results on :attr:`device`); :meth:`reader` serves a model's steps
    (one fused call per layer) and :meth:`prefetcher` fetches all layers' rows ahead of use.
    The table may be quantized (:attr:`format` is then ``"int8"``, ``"fp8_e4m3"`` or ``"nf4"``);
    results are then dequantized rows in :attr:`dtype`. See the module docstring for tiers and paths.
    """

    #: host tier, ``path="auto"``: batches of at most this many ids use zero-copy even when on the host.
    dma_min_tokens = 32

    def __init__(self, *, stored_shape, stored_dtype: torch.dtype, quant: Optional[QuantizedLUT], placement: str,
                 device: torch.device, lut=None, store=None, staging_bytes: int = 0,
                 metadata: Optional[Dict[str, str]] = None, _token=None):
        if _token is not _PRIVATE:
            raise TypeError("use LookupTable.from_tensor(...) or LookupTable.open(...)")
        # lut: the table in memory (device/host tiers), a [V, L, E, D] tensor or a QuantizedLUT over
        # the packed rows; None for the disk tier, whose rows are read from the file on demand.
        self._lut = lut
        self._store = store
        self._quant = quant  # quantized: format, dim, block size, dtype (its payload is not used)
        self._stored_shape = tuple(stored_shape)  # as the tier holds it (quantized: [V, L, E, row_bytes])
        self._stored_dtype = stored_dtype
        self.placement = placement
        self.device = device
        self.shape = (*self._stored_shape[:3], quant.dim) if quant is not None else self._stored_shape
        self.dtype = quant.dtype if quant is not None else stored_dtype
        self._token_bytes = math.prod(self._stored_shape[1:]) * stored_dtype.itemsize
        self.metadata = dict(metadata or {})
        self._stats = TableStats()
        # The CPU steps' counts ([steps, ids, tokens read]: LayerReader's steps, in C++ (csrc/module.cpp says
        # why)), folded into stats when they are read.
        self._tally = torch.zeros(3, dtype=torch.int64)
        self._readers = weakref.WeakSet()  # the LayerReaders over it (drop_cached_rows reaches their row caches)
        self._staging_bytes = staging_bytes
        self._staging = None  # GPU staging: pinned, two halves (created on first use)
        self._faults = None  # bad ids among ids that were on a GPU (created on first use)
        self._lock = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------ construction ------------

    @classmethod
    def from_tensor(cls, lut, placement: str = "host", device=None, *, path: Optional[str] = None,
                    staging_bytes: int = 64 << 20, format: Optional[str] = None,
                    block_size: Optional[int] = None) -> "LookupTable":
        """A table holding a copy of ``lut`` (``[V, L, E, D]`` or ``[V, E, D]``).

        Args:
            lut: a float32/float16/bfloat16 tensor, or a :class:`mole_kernels.QuantizedLUT`
                (its packed rows are copied as they are).
            placement: ``"device"``, ``"host"`` or ``"disk"`` (for disk, ``lut`` is saved to
                ``path``, or to an anonymous temporary file when ``path`` is None).
            device: where results land (default: the current CUDA device if any, else CPU).
            staging_bytes: GPU dma/disk paths: size of the pinned staging buffer rows pass through.
            format, block_size: quantize a float ``lut`` first (:func:`mole_kernels.quantize`:
                ``"int8"``, ``"fp8"``/``"fp8_e4m3"`` or ``"nf4"``). With a QuantizedLUT they may
                only repeat its own format and block size.
        """
        if isinstance(lut, QuantizedLUT):
            if format is not None and canonical_format(format) != lut.format:
                raise ValueError(f"LookupTable.from_tensor: format={format!r} but lut is already quantized as "
                                 f"{lut.format!r} (dequantize it first to change the format)")
            if block_size is not None and block_size != lut.block_size:
                raise ValueError(f"LookupTable.from_tensor: block_size={block_size!r} but lut is quantized with "
                                 f"block_size={lut.block_size}")
        elif not isinstance(lut, torch.Tensor):
            raise ValueError(f"LookupTable.from_tensor: lut must be a tensor or a QuantizedLUT, got {type(lut).__name__}")
        elif lut.dim() not in (3, 4):
            raise ValueError(f"LookupTable.from_tensor: lut must be [V, L, E, D] or [V, E, D], got {tuple(lut.shape)}")
        elif lut.dtype not in _ST_DTYPES.values():
            raise ValueError(f"LookupTable.from_tensor: lut must be float32, float16 or bfloat16, got {lut.dtype}")
        elif lut.device.type not in ("cpu", "cuda"):
            raise ValueError(f"LookupTable.from_tensor: lut must be on the CPU or a CUDA device, got {lut.device}")
        elif format is None and block_size is not None:
            raise ValueError("LookupTable.from_tensor: block_size needs format= (a float table has no blocks)")
        placement, device = cls._check_placement(placement, device, "from_tensor")
        lut = _as_4d(lut)
        if isinstance(lut, QuantizedLUT):  # its packed rows are stored as they are
            payload = lut.data
            return cls._build_stored(payload.shape, payload.dtype, lut, placement, device, path=path,
                                     staging_bytes=staging_bytes, desc="copying LUT",
                                     fill_stored=lambda a, b, dst: dst.copy_(payload[a:b]))
        return cls.build(lut.shape, lut.dtype, lambda a, b, dst: dst.copy_(lut[a:b]), placement, device, path=path,
                         format=format, block_size=block_size, staging_bytes=staging_bytes, desc="copying LUT")

    @classmethod
    def build(cls, shape, dtype, fill, placement: str = "host", device=None, *, path: Optional[str] = None,
              format: Optional[str] = None, block_size: Optional[int] = None, staging_bytes: int = 64 << 20,
              desc: str = "building LUT", progress: bool = True) -> "LookupTable":
        """A ``[V, L, E, D]`` table of float ``dtype`` whose rows ``fill`` writes chunk by chunk,
        straight into the tier: the table is never held twice.

        ``fill(a, b, out)`` writes the rows of tokens ``[a, b)`` into ``out``, a ``[b - a, L, E, D]``
        tensor of ``dtype``: on the host and device tiers a slice of the table's own memory; on the
        disk tier, or when ``format`` quantizes, a CPU chunk that is then quantized and/or appended
        to the file. Chunks are a 32nd of the table within [4, 64] MiB, so besides the table (host,
        device) or nothing (disk) a build holds a few chunks. Calls go in token order.
        ``placement``, ``device``, ``path``, ``format``, ``block_size``, ``staging_bytes``: as in
        :meth:`from_tensor`. ``progress``: a bar named ``desc`` for tables of 1 GiB or more.
        """
        shape = tuple(shape)
        if len(shape) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
            raise ValueError(f"LookupTable.build: shape must be [V, L, E, D] (four ints >= 0), got {shape!r}")
        if dtype not in _ST_DTYPES.values():
            raise ValueError(f"LookupTable.build: dtype must be float32, float16 or bfloat16, got {dtype}")
        if format is None:
            if block_size is not None:
                raise ValueError("LookupTable.build: block_size needs format= (a float table has no blocks)")
            return cls._build_stored(shape, dtype, None, placement, device, path=path, staging_bytes=staging_bytes,
                                     desc=desc if progress else None, fill_stored=fill)
        quant = quantized_layout(shape, format, block_size, dtype)
        chunk = None  # the float CPU chunk rows are quantized from, allocated once

        def quantized_rows(a, b, dst):
            nonlocal chunk
            if chunk is None:
                chunk = torch.empty((b - a, *shape[1:]), dtype=dtype)
            fill(a, b, chunk[:b - a])
            dst.copy_(quantize(chunk[:b - a], quant.format, quant.block_size, progress=False, first_token=a).data)

        # quantize() holds a few float32 temporaries per value: chunks are sized on those.
        return cls._build_stored(quant.data.shape, torch.uint8, quant, placement, device, path=path,
                                 staging_bytes=staging_bytes, desc=desc if progress else None,
                                 fill_stored=quantized_rows, chunk_token_bytes=math.prod(shape[1:]) * 4 * 4)

    @classmethod
    def _build_stored(cls, stored_shape, stored_dtype, quant: Optional[QuantizedLUT], placement: str, device, *,
                      path, staging_bytes: int, desc: Optional[str], fill_stored,
                      chunk_token_bytes: int = 0) -> "LookupTable":
        """:meth:`build` over the rows as the tier stores them: ``fill_stored(a, b, dst)`` writes tokens
        [a, b)'s stored rows into ``dst`` (the tier's memory, or a CPU chunk bound for the file).
        ``chunk_token_bytes``: what ``fill_stored`` holds per token when more than a stored token.
        ``desc``: the progress bar's name (None: no bar)."""
        placement, device = cls._check_placement(placement, device, "build")
        stored_shape = tuple(stored_shape)
        token_bytes = math.prod(stored_shape[1:]) * stored_dtype.itemsize
        _check_staging(staging_bytes, token_bytes, "build")
        step = _chunk_rows(max(token_bytes, chunk_token_bytes), stored_shape[0] * token_bytes)
        meta = _metadata((*stored_shape[:3], quant.dim) if quant is not None else stored_shape,
                         quant.dtype if quant is not None else stored_dtype, quant)
        if placement == "disk":
            target = path
            if target is None:  # an anonymous file: unlinked once open (the open descriptor keeps it)
                fd, target = tempfile.mkstemp(suffix=".safetensors", prefix="mole_lut_")
                os.close(fd)

            buf = torch.empty((min(step, stored_shape[0]), *stored_shape[1:]), dtype=stored_dtype)  # reused: one chunk

            def stored_chunk(a, b):
                fill_stored(a, b, buf[:b - a])
                return buf[:b - a]

            try:
                _write_table(os.fspath(target), stored_shape, stored_dtype, meta, stored_chunk, step=step,
                             progress=desc is not None)
                return cls.open(target, "disk", device, staging_bytes=staging_bytes)
            finally:
                if path is None:
                    os.unlink(target)
        kw = dict(stored_shape=stored_shape, stored_dtype=stored_dtype, quant=quant, placement=placement,
                  device=device, metadata=meta, _token=_PRIVATE)
        if placement == "device":
            store, view = None, torch.empty(stored_shape, dtype=stored_dtype, device=device)
        else:
            store, view = cls._host_store(stored_shape, stored_dtype, device)
        _fill(view, fill_stored, desc, step)
        return cls(lut=_like(quant, view), store=store, **kw)

    @classmethod
    def open(cls, path, placement: str = "disk", device=None, *, tensor: str = TENSOR_NAME, shape=None,
             staging_bytes: int = 64 << 20) -> "LookupTable":
        """Opens a safetensors table (header validated now: truncation, dtype, shape vs metadata).

        ``placement="disk"`` keeps the file open and reads nothing up front; ``"host"``/``"device"``
        load it (in chunks, never a second full copy in memory). A quantized file (U8 tensor with
        ``mole_kernels.format`` metadata) is checked against its metadata now: row size from
        format/dim/block size, and the first and last tokens' rows (zero padding, finite scales).
        Only a regular file is opened (a FIFO or device is refused, never waited on).

        ``tensor`` and ``shape`` open a float tensor of any safetensors file as the ``[V, L, E, D]``
        table ``shape`` (same V and element count): e.g. an official checkpoint's
        ``model.moe_table.weight`` ``[V, L*E*D]``, which is the table byte for byte, so the disk
        tier serves that file in place and the host tier reads it once into its own memory.
        """
        path = os.fspath(path)
        placement, device = cls._check_placement(placement, device, "open")
        return cls._open_info(path, _read_header(path, tensor, shape), placement, device, staging_bytes)

    @classmethod
    def _open_at(cls, path: str, offset: int, shape, dtype: torch.dtype, placement: str, device,
                 identity: Optional[Tuple[int, int]] = None) -> "LookupTable":
        """A float ``[V, L, E, D]`` table whose bytes lie at ``offset`` in a file of another format
        (e.g. a tensor's record inside a ``pytorch_model.bin``), opened as :meth:`open` opens one.
        ``identity``: the file's (st_dev, st_ino) when ``offset`` was read from it (a file replaced
        since is refused)."""
        placement, device = cls._check_placement(placement, device, "open")
        if identity is None:
            st = os.stat(path)
            identity = (st.st_dev, st.st_ino)
        nbytes = math.prod(shape) * dtype.itemsize
        info = _FileInfo(tuple(shape), dtype, offset, nbytes, {}, identity=tuple(identity))
        return cls._open_info(path, info, placement, device, 64 << 20)

    @classmethod
    def _open_info(cls, path: str, info: _FileInfo, placement: str, device, staging_bytes: int) -> "LookupTable":
        _check_staging(staging_bytes, math.prod(info.shape[1:]) * info.dtype.itemsize, "open")
        store = _store("file", path, info.data_offset, info.nbytes)
        try:
            if tuple(store.identity()) != tuple(info.identity):
                raise ValueError(f"LookupTable.open: {path} was replaced while it was being opened; open it again")
            if info.quantized:
                _check_quantized_rows(_first_and_last_tokens(store, info), info, path)
        except BaseException:
            store.close()
            raise
        kw = dict(stored_shape=info.shape, stored_dtype=info.dtype, quant=info.template, placement=placement,
                  device=device, metadata=info.metadata, _token=_PRIVATE)
        if placement == "disk":
            return cls(store=store, staging_bytes=staging_bytes, **kw)
        try:
            token_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
            if placement == "host":
                host, view = cls._host_store(info.shape, info.dtype, device)
                _fill(view, lambda a, b, dst: store.read(a * token_bytes, (b - a) * token_bytes, _bytes(dst)),
                      f"loading {os.path.basename(path)}")
                return cls(lut=_like(info.template, view), store=host, **kw)
            view = torch.empty(info.shape, dtype=info.dtype, device=device)

            def load(a, b, dst):
                chunk = torch.empty((b - a, *info.shape[1:]), dtype=info.dtype)
                store.read(a * token_bytes, (b - a) * token_bytes, _bytes(chunk))
                dst.copy_(chunk)
            _fill(view, load, f"loading {os.path.basename(path)}")
            return cls(lut=_like(info.template, view), **kw)
        finally:
            store.close()

    @staticmethod
    def _check_placement(placement, device, where):
        if placement not in PLACEMENTS:
            raise ValueError(f"LookupTable.{where}: placement must be one of {PLACEMENTS}, got {placement!r}")
        device = _default_device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"LookupTable.{where}: device must be cpu or cuda, got {device}")
        if placement == "device" and device.type != "cuda":
            raise ValueError(f"LookupTable.{where}: placement='device' needs a CUDA device, got device={device} "
                             "(use placement='host' on a machine without CUDA)")
        return placement, device

    @staticmethod
    def _host_store(shape, dtype, device):
        nbytes = math.prod(shape) * dtype.itemsize
        # Pin only when the rows will go to a GPU: pinning needs CUDA and costs locked memory.
        store = _store("host", "", 0, nbytes, device.type == "cuda", device)
        return store, store.tensor().view(dtype).view(shape)

    # ------------------------------------------------------------ properties ---------------

    @property
    def format(self) -> Optional[str]:
        """The quantization format (``"int8"``, ``"fp8_e4m3"``, ``"nf4"``), or None for a float table."""
        return self._quant.format if self._quant is not None else None

    @property
    def block_size(self) -> Optional[int]:
        """Values per quantization scale, or None for a float table."""
        return self._quant.block_size if self._quant is not None else None

    @property
    def quantized(self) -> bool:
        return self._quant is not None

    @property
    def nbytes(self) -> int:
        """Bytes the tier holds (quantized tables: the packed rows, scales and padding included)."""
        return self.shape[0] * self.row_bytes

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's rows for all layers (L*E*D elements, or L*E quantized rows)."""
        return self._token_bytes

    @property
    def tensor(self):
        """The table over the tier's memory: a ``[V, L, E, D]`` tensor, or for a quantized table the
        :class:`~mole_kernels.QuantizedLUT` (``lut_gather`` and ``dequantize`` take either).

        A disk table has none: its rows stay in the file and are read on demand (use
        :meth:`gather`, :meth:`read`, or :meth:`open` with ``placement="host"``)."""
        self._check_open()
        if self._lut is None:
            raise ValueError("LookupTable.tensor: a disk table's rows stay in its file (they are read with pread, so "
                             "a file changed by another process is an error, not a crash); use gather(), read(), "
                             "or LookupTable.open(path, placement='host') to hold it in memory")
        return self._lut

    @property
    def pinned(self) -> bool:
        return self._store is not None and not self._store.closed() and self._store.pinned()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def faults(self) -> int:
        """Ids outside ``[0, V)`` seen among ids that were on a GPU (reading it synchronises)."""
        return 0 if self._faults is None else int(self._faults.item())

    def paths(self) -> Tuple[str, ...]:
        """The paths gather can take for this table."""
        return _PATHS[self.placement]

    def __repr__(self):
        if self.closed:
            return f"LookupTable(closed, placement={self.placement!r})"
        V, L, E, D = self.shape
        pin = ", pinned" if self.pinned else ""
        quant = f", format={self.format}, block_size={self.block_size}" if self.quantized else ""
        return (f"LookupTable(placement={self.placement!r}{pin}, shape=[V={V}, L={L}, E={E}, D={D}], "
                f"dtype={str(self.dtype).replace('torch.', '')}{quant}, bytes={_human(self.nbytes)}, "
                f"row={_human(self.row_bytes)}, device={self.device})")

    @property
    def stats(self) -> TableStats:
        """The table's :class:`TableStats` (every read so far, or since :meth:`reset_stats`)."""
        steps, ids, read = _C._take_tally(self._tally)
        if steps:
            s = self._stats
            s.calls += steps
            s.rows_requested += ids
            s.bytes_read[self.placement] += read * self.row_bytes
        return self._stats

    def reset_stats(self) -> None:
        _C._take_tally(self._tally)
        self._stats = TableStats()

    # ------------------------------------------------------------ reading whole tokens ------

    def read(self, start: int = 0, stop: Optional[int] = None):
        """A CPU copy of tokens ``[start, stop)``'s rows: ``[n, L, E, D]`` (a quantized table: a
        QuantizedLUT over their packed rows). Every tier; from the disk tier it reads the file."""
        self._check_open()
        V = self.shape[0]
        stop = V if stop is None else stop
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, stop)) or not 0 <= start <= stop <= V:
            raise ValueError(f"LookupTable.read: need ints 0 <= start <= stop <= {V}, got start={start!r}, "
                             f"stop={stop!r}")
        return _like(self._quant, self._read_stored(start, stop))

    def _read_stored(self, a: int, b: int) -> torch.Tensor:
        """Tokens [a, b) as stored, on the CPU (a copy)."""
        if self._lut is not None:
            return _payload(self._lut)[a:b].to("cpu", copy=True)
        chunk = torch.empty((b - a, *self._stored_shape[1:]), dtype=self._stored_dtype)
        with self._lock:
            self._store.read(a * self.row_bytes, (b - a) * self.row_bytes, _bytes(chunk))
        return chunk

    # ------------------------------------------------------------ saving / closing ----------

    def save(self, path) -> None:
        """Writes the table as safetensors: tensor ``"lut"`` [V, L, E, D] plus metadata (a quantized
        table: its packed uint8 rows ``[V, L, E, row_bytes]`` and metadata naming format, block size,
        dtype and layout; :meth:`open` reads either). Rows are written chunk by chunk from the tier (a
        32nd of the table within [4, 64] MiB at a time: never a copy of the table in RAM). The file
        appears whole or not at all, through a unique temporary file in its folder (safe to save over
        the file this table was opened from). A ``path`` that is not a regular file (a FIFO, a
        device such as ``/dev/null``, a folder) is refused before anything is written."""
        self._check_open()
        meta = {**self.metadata, **_metadata(self.shape, self.dtype, self._quant)}
        _write_table(os.fspath(path), self._stored_shape, self._stored_dtype, meta, self._read_stored)

    def close(self) -> None:
        """Releases the table's memory / file and staging now (views still held keep theirs alive;
        pinned memory is unregistered only once the GPU is idle)."""
        with self._lock:
            for store in (self._store, self._staging):
                if store is not None:
                    store.close()
            self._lut = self._store = self._staging = None
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("LookupTable: the table was closed")

    # ------------------------------------------------------------ reading rows --------------

    def gather(self, ids: torch.Tensor, *, layer: Optional[int] = None, path: str = "auto") -> torch.Tensor:
        """Rows ``[*, L, E, D]`` (or ``[*, E, D]`` for one ``layer``) for ``ids`` [*], on :attr:`device`."""
        with self._lock:
            self._check_open()
            ids = self._check_ids(ids, "gather")
            layer = self._check_layer(layer, "gather", required=False)
            path = self._choose_path(ids, path)
            t0 = time.perf_counter()
            if path in ("device", "zero_copy"):
                out = lut_gather(self._lut, self._to_device(ids, "gather"), layer=layer, faults=self._fault_counter())
                self._count_direct(ids.numel(), layer, path)
                self._stats.add_time("gather", t0)
                return out
            rows, inv = self._unique_rows(ids, layer)
            t0 = time.perf_counter()
            out = lut_gather(rows, inv)
            self._stats.add_time("gather", t0)
            return out

    def gather_combine(self, ids: torch.Tensor, weights: torch.Tensor, layer: Optional[int], *,
                       out: Optional[torch.Tensor] = None, accumulate: bool = False,
                       path: str = "auto") -> torch.Tensor:
        """``sum_e weights[..., e] * LUT[ids, layer, e, :]`` of shape ``[*, D]`` on :attr:`device`.

        ``out`` / ``accumulate`` as in :func:`mole_kernels.lut_gather`. ``weights`` ``[*, E]``
        are moved to :attr:`device` if they are elsewhere (they are small).
        """
        with self._lock:
            self._check_open()
            ids = self._check_ids(ids, "gather_combine")
            layer = self._check_layer(layer, "gather_combine", required=True)
            if not isinstance(weights, torch.Tensor):
                raise ValueError(f"LookupTable.gather_combine: weights must be a tensor [*, E], got "
                                 f"{type(weights).__name__}")
            weights = weights.to(self.device, non_blocking=True)
            path = self._choose_path(ids, path)
            t0 = time.perf_counter()
            if path in ("device", "zero_copy"):
                res = lut_gather(self._lut, self._to_device(ids, "gather_combine"), weights, layer=layer, out=out,
                                 accumulate=accumulate, faults=self._fault_counter())
                self._count_direct(ids.numel(), layer, path)
            else:
                rows, inv = self._unique_rows(ids, layer)
                t0 = time.perf_counter()
                res = lut_gather(rows, inv, weights, out=out, accumulate=accumulate)
            self._stats.add_time("gather", t0)
            return res

    def prefetcher(self, max_tokens: int, *, strict: bool = True) -> "Prefetcher":
        """A double-buffered prefetcher of all layers' rows for up to ``max_tokens`` ids."""
        return Prefetcher(self, max_tokens, strict=strict)

    def reader(self) -> "LayerReader":
        """What a model's steps read through: every layer's rows for a step's ids, combined with the
        router weights, residual and shared output in one fused call per layer."""
        return LayerReader(self)

    def drop_cached_rows(self) -> None:
        """Makes every reader of a disk-tier table on a CPU forget the rows it keeps in RAM
        (:attr:`LayerReader.row_cache_bytes`): their next steps read them from the file again. With the
        file's pages dropped from the page cache too (``posix_fadvise(DONTNEED)``), the next steps read
        from storage: what a cold start costs."""
        for reader in list(self._readers):
            reader.drop_cached_rows()

    # ------------------------------------------------------------ internals -----------------

    def _check_ids(self, ids, where) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"LookupTable.{where}: ids must be an int32/int64 tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"LookupTable.{where}: ids must be int32 or int64, got {ids.dtype}")
        if ids.device.type != "cpu" and ids.device != self.device:
            raise ValueError(f"LookupTable.{where}: ids must be on the CPU or on the table's device {self.device}, "
                             f"got {ids.device}")
        return ids

    def _to_device(self, ids: torch.Tensor, where: str) -> torch.Tensor:
        """ids on :attr:`device`; host ids bound for a GPU are checked on the host first (no sync later)."""
        if ids.device == self.device:
            return ids
        raise_on_bad_ids(ids, self.shape[0], f"LookupTable.{where}")
        return ids.to(self.device, non_blocking=True)

    def _fault_counter(self) -> Optional[torch.Tensor]:
        """Kernels on a GPU count bad ids here instead of raising (which would synchronise)."""
        if self.device.type == "cpu":
            return None  # the CPU kernels raise naming the id: nothing to synchronise with
        if self._faults is None:
            self._faults = torch.zeros(1, dtype=torch.int64, device=self.device)
        return self._faults

    def _check_layer(self, layer, where, required):
        L = self.shape[1]
        if layer is None:
            if required and L > 1:
                raise ValueError(f"LookupTable.{where}: layer is required for a table with {L} layers")
            return 0 if required else None
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < L:
            raise ValueError(f"LookupTable.{where}: layer must be an int in [0, {L}), got {layer!r}")
        return layer

    def _choose_path(self, ids: torch.Tensor, path: str) -> str:
        allowed = _PATHS[self.placement]
        if path == "auto":
            if self.placement != "host":
                path = allowed[0]
            else:
                small = ids.numel() <= self.dma_min_tokens
                path = "zero_copy" if ids.is_cuda or small else "dma"
        elif path not in allowed:
            raise ValueError(f"LookupTable: path must be 'auto' or one of {allowed} for placement="
                             f"{self.placement!r}, got {path!r}")
        if path == "zero_copy" and self.device.type == "cuda" and not self.pinned:
            raise RuntimeError("LookupTable: zero_copy needs the host table pinned (it was built for device=cpu)")
        self._stats.last_path = path
        self._stats.paths[path] = self._stats.paths.get(path, 0) + 1
        return path

    def _segment(self, layer: Optional[int]):
        """(byte offset in a token's rows, bytes, shape of one token's piece as stored) of the rows a
        call needs. Quantized tables: pieces of packed rows ``(L, E, row_bytes)`` / ``(E, row_bytes)``."""
        _, L, E, last = self._stored_shape
        seg = self.row_bytes // L if L else 0
        if layer is None:
            return 0, self.row_bytes, (L, E, last)
        return layer * seg, seg, (E, last)

    def _count_direct(self, n: int, layer, path: str):
        s = self._stats
        s.calls += 1
        s.rows_requested += n
        moved = n * self._segment(layer)[1]
        s.bytes_read[self.placement] += moved
        if path == "zero_copy" and self.device.type == "cuda":
            s.bytes_h2d += moved

    def _unique_rows(self, ids: torch.Tensor, layer: Optional[int], out: Optional[torch.Tensor] = None,
                     strict: bool = True):
        """Dedupe ``ids`` on the host and bring each unique row to :attr:`device` once.

        Returns ``(rows [U, *piece], inverse ids [*] on device)``; ``lut_gather(rows, inverse)``
        expands them (a quantized table's rows are a QuantizedLUT over the packed bytes). ``out``: a
        uint8 buffer on :attr:`device` to reuse (at least ``ids.numel()`` segments). An id outside
        ``[0, V)`` raises naming the first one (``strict``), or gets inverse -1 (a gather in
        counted-faults mode then reads zeros for it and counts it).
        """
        seg_off, seg_bytes, piece = self._segment(layer)
        host_ids = ids.cpu()  # synchronises if ids are on the GPU: the price of dedupe
        T = host_ids.numel()
        if out is None:
            out = torch.empty(T * seg_bytes, dtype=torch.uint8, device=self.device)
        elif out.numel() < T * seg_bytes:
            raise ValueError(f"LookupTable: out buffer holds {out.numel()} bytes, needs {T * seg_bytes}")
        with self._lock:
            t0 = time.perf_counter()
            if self.device.type == "cpu":  # one call: dedupe, then memcpy (host) or pread (disk) into `out`
                inv, U = self._store.read_unique(host_ids, self.row_bytes, seg_off, seg_bytes, strict, out)
            else:
                uniq, inv = ops.dedupe_ids(host_ids, self.shape[0], strict)
                U = uniq.numel()
                self._staged_copy(uniq, seg_off, seg_bytes, out)
                inv = inv.to(self.device, non_blocking=True)
            s = self._stats
            s.add_time("read", t0)
            s.calls += 1
            s.rows_requested += T
            s.unique_rows += U
            s.bytes_read[self.placement] += U * seg_bytes
        return _like(self._quant, out[:U * seg_bytes].view(self._stored_dtype).view(U, *piece)), inv

    def _staged_copy(self, uniq: torch.Tensor, seg_off: int, seg_bytes: int, dst: torch.Tensor):
        """GPU dma/disk paths: table -> pinned staging (host threads: memcpy or pread) -> dst, in a few
        large async copies pipelined in C++ (``TableStore.stage_rows``)."""
        s = self._stats
        if self._staging is None:
            self._staging = _store("host", "", 0, self._staging_bytes, True, self.device)
        s.dma_copies += self._store.stage_rows(uniq, self.row_bytes, seg_off, seg_bytes, self._staging, dst)
        s.bytes_h2d += uniq.numel() * seg_bytes


_PRIVATE = object()


def _check_staging(staging_bytes, row_bytes: int, where: str) -> int:
    """Each half of the GPU staging buffer must hold one token's rows (what a step fetches per token)."""
    if not isinstance(staging_bytes, int) or isinstance(staging_bytes, bool) or staging_bytes // 2 < max(1, row_bytes):
        raise ValueError(f"LookupTable.{where}: staging_bytes must be an int of at least 2 x {row_bytes} bytes (two "
                         f"halves, each holding one token's rows), got {staging_bytes!r}")
    return staging_bytes


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return t.view(-1).view(torch.uint8)


def _fill(view: torch.Tensor, fill_tokens, desc: str, step: Optional[int] = None) -> None:
    """Fills a [V, ...] tensor in chunks of ``step`` tokens (``fill_tokens(a, b, view[a:b])``; default
    :func:`_chunk_rows`), with a progress bar for large tables: a table is never copied whole
    through a temporary."""
    token_bytes = view[0].numel() * view.element_size() if view.shape[0] else 1
    total = view.numel() * view.element_size()
    step = step or _chunk_rows(token_bytes, total)
    with _progress(total, desc) as bar:
        for a in range(0, view.shape[0], step):
            b = min(view.shape[0], a + step)
            fill_tokens(a, b, view[a:b])
            bar.update((b - a) * token_bytes)


def _first_and_last_tokens(store, info) -> torch.Tensor:
    """The stored rows of a file's first and last 16 tokens (what a quantized file is checked on)."""
    V = info.shape[0]
    ids = torch.tensor(sorted(set(range(min(V, 16))) | set(range(max(0, V - 16), V))), dtype=torch.int64)
    token_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
    rows = torch.empty((ids.numel(), *info.shape[1:]), dtype=info.dtype)
    if ids.numel() and token_bytes:
        store.copy_rows(ids, token_bytes, 0, token_bytes, _bytes(rows))
    return rows


def _as_4d(lut):
    """[V, E, ...] -> [V, 1, E, ...] (tensor or QuantizedLUT)."""
    if isinstance(lut, QuantizedLUT):
        return lut if lut.data.dim() == 4 else _like(lut, lut.data.unsqueeze(1))
    return lut if lut.dim() == 4 else lut.unsqueeze(1)


def _payload(lut) -> torch.Tensor:
    """The tensor a tier stores: the float table itself, or a QuantizedLUT's packed uint8 rows."""
    return lut.data if isinstance(lut, QuantizedLUT) else lut


def _like(template: Optional[QuantizedLUT], payload: torch.Tensor):
    """``payload`` as the same kind of table as ``template`` (a QuantizedLUT with its format, or as is)."""
    if isinstance(template, QuantizedLUT):
        return QuantizedLUT(payload, template.format, template.dim, template.block_size, template.dtype)
    return payload
