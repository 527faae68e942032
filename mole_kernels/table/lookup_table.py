"""`LookupTable`: one object that owns where a LUT lives and gets its rows to where they are used.

Tiers (``placement``):

- ``"device"``: the table is a CUDA tensor; rows are read in place (path ``"device"``).
- ``"host"``: page-aligned host memory of exactly the table's size, registered with CUDA
  (pinned) when CUDA is available. Two paths to the GPU:
  ``"zero_copy"`` (the CUDA kernel reads the rows over PCIe in place; no synchronisation,
  best for small decode batches whose ids are on the GPU) and ``"dma"`` (ids on the host are
  deduplicated, each unique row crosses PCIe once by async copy into a device buffer, then a
  device-side gather expands them; best for large prefill batches). On a machine without
  CUDA the host tier is ordinary memory and both paths run on the CPU (same results).
- ``"disk"``: a safetensors file, memory-mapped; nothing is read up front (a file larger
  than RAM works). Path ``"staged"``: host threads in the extension copy the unique rows
  out of the mapping into a small pinned staging buffer (in chunks when they do not fit,
  double-buffered so a chunk's DMA overlaps the next chunk's copy), then the device gather.

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

The C++ side (exact-size allocation and its release, the file mapping, the row copy
threads, the DMA submission) is ``torch.classes.mole_kernels.TableStore``
(csrc/lookup_table.cpp); this module is a thin owner of it.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch

from .._ops import ops
from ..lut_gather import lut_gather
from ..quant import QuantizedLUT, canonical_format, quantize
from .file_format import (_CHUNK, _ST_DTYPES, TENSOR_NAME, _check_quantized_rows, _metadata_of, _progress,
                          _read_header, _save_tensor)

if TYPE_CHECKING:
    from .prefetch import Prefetcher

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
    (``dedupe``, ``host_copy``, ``dma``, ``gather``); on CUDA it is submission time unless the
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


def _store(kind: str, path: str = "", offset: int = 0, nbytes: int = 0, pin: bool = False):
    return torch.classes.mole_kernels.TableStore(kind, path, offset, nbytes, pin)


class LookupTable:
    """A ``[V, L, E, D]`` lookup table in VRAM, pinned host memory or a memory-mapped file.

    Build with :meth:`from_tensor` or :meth:`open`; read rows with :meth:`gather` /
    :meth:`gather_combine` (results on :attr:`device`); :meth:`prefetcher` for decoding.
    The table may be quantized (:attr:`format` is then ``"int8"``, ``"fp8_e4m3"`` or ``"nf4"``);
    results are then dequantized rows in :attr:`dtype`. See the module docstring for tiers and paths.
    """

    #: host tier, ``path="auto"``: batches of at most this many ids use zero-copy even when on the host.
    dma_min_tokens = 32

    def __init__(self, *, lut: torch.Tensor, placement: str, device: torch.device, store=None,
                 staging_bytes: int = 0, metadata: Optional[Dict[str, str]] = None, _token=None):
        if _token is not _PRIVATE:
            raise TypeError("use LookupTable.from_tensor(...) or LookupTable.open(...)")
        self._lut = lut  # [V, L, E, D] view over the tier's storage, or a QuantizedLUT whose data is one
        self._store = store
        self.placement = placement
        self.device = device
        self.shape = tuple(lut.shape)
        self.dtype = lut.dtype
        quant = isinstance(lut, QuantizedLUT)
        self._format = lut.format if quant else None
        self._block_size = lut.block_size if quant else None
        self._token_bytes = lut.bytes_per_token if quant else math.prod(self.shape[1:]) * self.dtype.itemsize
        self.metadata = dict(metadata or {})
        self.stats = TableStats()
        self._staging_bytes = staging_bytes
        self._staging = None  # disk tier: pinned staging, two halves (created on first use)
        self._staging_events = None

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
            staging_bytes: disk tier: size of the pinned staging buffer rows pass through.
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
        elif format is not None:
            lut = quantize(lut, format, block_size)
        elif block_size is not None:
            raise ValueError("LookupTable.from_tensor: block_size needs format= (a float table has no blocks)")
        placement, device = cls._check_placement(placement, device, "from_tensor")
        lut = _as_4d(lut)
        payload = _payload(lut)  # what the tier stores: the float tensor or the packed uint8 rows
        meta = _metadata_of(lut)
        if placement == "disk":
            if path is not None:
                _save_tensor(payload, path, meta)
                return cls.open(path, "disk", device, staging_bytes=staging_bytes)
            fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="mole_lut_")
            os.close(fd)
            try:
                _save_tensor(payload, tmp, meta)
                return cls.open(tmp, "disk", device, staging_bytes=staging_bytes)
            finally:
                os.unlink(tmp)  # the mapping keeps the data; nothing is left behind on disk
        if placement == "device":
            data = payload.to(device, copy=True).contiguous()
            return cls(lut=_like(lut, data), placement=placement, device=device, metadata=meta, _token=_PRIVATE)
        store, view = cls._host_store(payload.shape, payload.dtype, device)
        bar = _progress(view.numel() * view.element_size(), "pinning LUT")
        step = max(1, _CHUNK // max(1, view[0].numel() * view.element_size()))
        for a in range(0, payload.shape[0], step):
            view[a:a + step].copy_(payload[a:a + step])
            bar.update(view[a:a + step].numel() * view.element_size())
        bar.close()
        return cls(lut=_like(lut, view), placement=placement, device=device, store=store, metadata=meta,
                   _token=_PRIVATE)

    @classmethod
    def open(cls, path: str, placement: str = "disk", device=None, *, tensor: str = TENSOR_NAME,
             staging_bytes: int = 64 << 20) -> "LookupTable":
        """Opens a safetensors table (header validated now: truncation, dtype, shape vs metadata).

        ``placement="disk"`` maps the file and reads nothing up front; ``"host"``/``"device"``
        load it (in chunks, never a second full copy in memory). A quantized file (U8 tensor with
        ``mole_kernels.format`` metadata) is checked against its metadata now: row size from
        format/dim/block size, and the first and last tokens' rows (zero padding, finite scales).
        """
        path = os.fspath(path)
        placement, device = cls._check_placement(placement, device, "open")
        info = _read_header(path, tensor)
        mapped = _store("file", path, info.data_offset, info.nbytes)
        try:
            src = mapped.tensor().view(info.dtype).view(info.shape)
            template = _check_quantized_rows(src, info, path)  # None for a float table
        except BaseException:
            mapped.close()
            raise
        if placement == "disk":
            return cls(lut=_like(template, src), placement="disk", device=device, store=mapped,
                       staging_bytes=staging_bytes, metadata=info.metadata, _token=_PRIVATE)
        if placement == "host":
            store, view = cls._host_store(info.shape, info.dtype, device)
        else:
            store, view = None, torch.empty(info.shape, dtype=info.dtype, device=device)
        bar = _progress(info.nbytes, f"loading {os.path.basename(path)}")
        step = max(1, _CHUNK // max(1, src[0].numel() * src.element_size()))
        for a in range(0, info.shape[0], step):
            view[a:a + step].copy_(src[a:a + step])
            bar.update(src[a:a + step].numel() * src.element_size())
        bar.close()
        del src
        mapped.close()
        return cls(lut=_like(template, view), placement=placement, device=device, store=store,
                   metadata=info.metadata, _token=_PRIVATE)

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
        store = _store("host", "", 0, nbytes, device.type == "cuda")
        return store, store.tensor().view(dtype).view(shape)

    # ------------------------------------------------------------ properties ---------------

    @property
    def format(self) -> Optional[str]:
        """The quantization format (``"int8"``, ``"fp8_e4m3"``, ``"nf4"``), or None for a float table."""
        return self._format

    @property
    def block_size(self) -> Optional[int]:
        """Values per quantization scale, or None for a float table."""
        return self._block_size

    @property
    def quantized(self) -> bool:
        return self._format is not None

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
        """The table over the tier's storage (read-only for the disk tier): a ``[V, L, E, D]`` tensor,
        or for a quantized table the :class:`~mole_kernels.QuantizedLUT` (``lut_gather`` and
        ``dequantize`` take either)."""
        self._check_open()
        return self._lut

    @property
    def pinned(self) -> bool:
        return self._store is not None and not self._store.closed() and self._store.pinned()

    @property
    def closed(self) -> bool:
        return self._lut is None

    def paths(self) -> Tuple[str, ...]:
        """The paths gather can take for this table."""
        return _PATHS[self.placement]

    def __repr__(self):
        if self.closed:
            return f"LookupTable(closed, placement={self.placement!r})"
        V, L, E, D = self.shape
        pin = ", pinned" if self.pinned else ""
        quant = f", format={self._format}, block_size={self._block_size}" if self.quantized else ""
        return (f"LookupTable(placement={self.placement!r}{pin}, shape=[V={V}, L={L}, E={E}, D={D}], "
                f"dtype={str(self.dtype).replace('torch.', '')}{quant}, bytes={_human(self.nbytes)}, "
                f"row={_human(self.row_bytes)}, device={self.device})")

    def reset_stats(self) -> None:
        self.stats = TableStats()

    # ------------------------------------------------------------ saving / closing ----------

    def save(self, path) -> None:
        """Writes the table as safetensors: tensor ``"lut"`` [V, L, E, D] plus metadata (a quantized
        table: its packed uint8 rows ``[V, L, E, row_bytes]`` and metadata naming format, block size,
        dtype and layout; :meth:`open` reads either)."""
        self._check_open()
        _save_tensor(_payload(self._lut), os.fspath(path), {**self.metadata, **_metadata_of(self._lut)})

    def close(self) -> None:
        """Releases the table's memory / mapping and staging now (views still held keep theirs alive)."""
        if self._store is not None:
            self._store.close()
        if self._staging is not None:
            self._staging.close()
        self._lut = self._store = self._staging = self._staging_events = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._lut is None:
            raise RuntimeError("LookupTable: the table was closed")

    # ------------------------------------------------------------ reading rows --------------

    def gather(self, ids: torch.Tensor, *, layer: Optional[int] = None, path: str = "auto") -> torch.Tensor:
        """Rows ``[*, L, E, D]`` (or ``[*, E, D]`` for one ``layer``) for ``ids`` [*], on :attr:`device`."""
        self._check_open()
        ids = self._check_ids(ids, "gather")
        layer = self._check_layer(layer, "gather", required=False)
        path = self._choose_path(ids, path)
        t0 = time.perf_counter()
        if path in ("device", "zero_copy"):
            out = lut_gather(self._lut, ids.to(self.device, non_blocking=True), layer=layer)
            self._count_direct(ids.numel(), layer, path)
            self.stats.add_time("gather", t0)
            return out
        rows, inv = self._unique_rows(ids, layer, path)
        t0 = time.perf_counter()
        out = lut_gather(rows, inv)
        self.stats.add_time("gather", t0)
        return out

    def gather_combine(self, ids: torch.Tensor, weights: torch.Tensor, layer: Optional[int], *,
                       out: Optional[torch.Tensor] = None, accumulate: bool = False,
                       path: str = "auto") -> torch.Tensor:
        """``sum_e weights[..., e] * LUT[ids, layer, e, :]`` of shape ``[*, D]`` on :attr:`device`.

        ``out`` / ``accumulate`` as in :func:`mole_kernels.lut_gather`. ``weights`` ``[*, E]``
        are moved to :attr:`device` if they are elsewhere (they are small).
        """
        self._check_open()
        ids = self._check_ids(ids, "gather_combine")
        layer = self._check_layer(layer, "gather_combine", required=True)
        if not isinstance(weights, torch.Tensor):
            raise ValueError(f"LookupTable.gather_combine: weights must be a tensor [*, E], got {type(weights).__name__}")
        weights = weights.to(self.device, non_blocking=True)
        path = self._choose_path(ids, path)
        t0 = time.perf_counter()
        if path in ("device", "zero_copy"):
            res = lut_gather(self._lut, ids.to(self.device, non_blocking=True), weights, layer=layer, out=out,
                             accumulate=accumulate)
            self._count_direct(ids.numel(), layer, path)
        else:
            rows, inv = self._unique_rows(ids, layer, path)
            t0 = time.perf_counter()
            res = lut_gather(rows, inv, weights, out=out, accumulate=accumulate)
        self.stats.add_time("gather", t0)
        return res

    def prefetcher(self, max_tokens: int, *, strict: bool = True) -> "Prefetcher":
        """A double-buffered prefetcher of all layers' rows for up to ``max_tokens`` ids."""
        from .prefetch import Prefetcher

        return Prefetcher(self, max_tokens, strict=strict)

    # ------------------------------------------------------------ internals -----------------

    def _check_ids(self, ids, where) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"LookupTable.{where}: ids must be an int32/int64 tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"LookupTable.{where}: ids must be int32 or int64, got {ids.dtype}")
        return ids

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
        self.stats.last_path = path
        self.stats.paths[path] = self.stats.paths.get(path, 0) + 1
        return path

    def _segment(self, layer: Optional[int]):
        """(byte offset in a token's rows, bytes, shape of one token's piece as stored) of the rows a
        call needs. Quantized tables: pieces of packed rows ``(L, E, row_bytes)`` / ``(E, row_bytes)``."""
        _, L, E, D = self.shape
        last = self._lut.row_bytes if self.quantized else D
        seg = self.row_bytes // L if L else 0
        if layer is None:
            return 0, self.row_bytes, (L, E, last)
        return layer * seg, seg, (E, last)

    def _count_direct(self, n: int, layer, path: str):
        s = self.stats
        s.calls += 1
        s.rows_requested += n
        moved = n * self._segment(layer)[1]
        s.bytes_read[self.placement] += moved
        if path == "zero_copy" and self.device.type == "cuda":
            s.bytes_h2d += moved

    def _unique_rows(self, ids: torch.Tensor, layer: Optional[int], path: str, out: Optional[torch.Tensor] = None):
        """Dedupe ``ids`` on the host and bring each unique row to :attr:`device` once.

        Returns ``(rows [U, *piece], inverse ids [*] on device)``; ``lut_gather(rows, inverse)``
        expands them (a quantized table's rows are a QuantizedLUT over the packed bytes). ``out``: a uint8 device buffer to reuse (at least U * segment bytes).
        """
        s = self.stats
        t0 = time.perf_counter()
        V = self.shape[0]
        host_ids = ids.reshape(-1).cpu()  # synchronises if ids are on the GPU: the price of dedupe
        if host_ids.numel():
            lo, hi = int(host_ids.min()), int(host_ids.max())
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                pos = int((host_ids == bad).nonzero()[0])
                raise ValueError(f"LookupTable: ids contains {bad} (at flat position {pos}), outside the table's "
                                 f"vocabulary [0, {V})")
        uniq, inv = torch.unique(host_ids, sorted=True, return_inverse=True)
        U = uniq.numel()
        seg_off, seg_bytes, piece = self._segment(layer)
        t0 = s.add_time("dedupe", t0)
        s.calls += 1
        s.rows_requested += host_ids.numel()
        s.unique_rows += U
        s.bytes_read[self.placement] += U * seg_bytes
        if out is None:
            out = torch.empty(U * seg_bytes, dtype=torch.uint8, device=self.device)
        elif out.numel() < U * seg_bytes:
            raise ValueError(f"LookupTable: out buffer holds {out.numel()} bytes, needs {U * seg_bytes}")
        dst = out[:U * seg_bytes]
        cuda = self.device.type == "cuda"
        if path == "dma":
            if cuda:
                s.dma_copies += self._store.dma_rows(uniq, self.row_bytes, seg_off, seg_bytes, dst)
                s.bytes_h2d += U * seg_bytes
                s.add_time("dma", t0)
            else:
                self._store.copy_rows(uniq, self.row_bytes, seg_off, seg_bytes, dst)
                s.add_time("host_copy", t0)
        else:
            self._staged_copy(uniq, seg_off, seg_bytes, dst)
        inv = inv.to(self.device, non_blocking=True).view(ids.shape)
        if self.quantized:  # packed rows; the gather that expands them dequantizes
            return _like(self._lut, dst.view(U, *piece)), inv
        return dst.view(self.dtype).view(U, *piece), inv

    def _staged_copy(self, uniq: torch.Tensor, seg_off: int, seg_bytes: int, dst: torch.Tensor):
        """Disk tier: mapping -> staging (host threads) -> dst (DMA on CUDA), in chunks.

        Two staging halves alternate so chunk k+1 is copied while chunk k's DMA runs; a half is
        refilled only after the event of its previous DMA has completed.
        """
        s = self.stats
        cuda = self.device.type == "cuda"
        if self._staging is None:
            self._staging = _store("host", "", 0, self._staging_bytes, cuda)
            self._staging_events = [torch.cuda.Event() for _ in range(2)] if cuda else [None, None]
        half = self._staging_bytes // 2
        rows_per_chunk = half // seg_bytes
        if rows_per_chunk < 1:
            raise ValueError(f"LookupTable: staging_bytes={self._staging_bytes} is too small: each half must hold "
                             f"one row piece of {seg_bytes} bytes")
        staging = self._staging.tensor()
        U = uniq.numel()
        for k, a in enumerate(range(0, U, rows_per_chunk)):
            b = min(U, a + rows_per_chunk)
            h = k % 2
            buf = staging[h * half:h * half + (b - a) * seg_bytes]
            t0 = time.perf_counter()
            if cuda:
                self._staging_events[h].synchronize()  # its previous DMA has finished reading this half
            self._store.copy_rows(uniq[a:b], self.row_bytes, seg_off, seg_bytes, buf)
            t0 = s.add_time("host_copy", t0)
            dst[a * seg_bytes:b * seg_bytes].copy_(buf, non_blocking=True)
            if cuda:
                self._staging_events[h].record(torch.cuda.current_stream(self.device))
                s.bytes_h2d += buf.numel()
                s.dma_copies += 1
            s.add_time("dma", t0)


_PRIVATE = object()


def _as_4d(lut):
    """[V, E, ...] -> [V, 1, E, ...] (tensor or QuantizedLUT)."""
    if isinstance(lut, QuantizedLUT):
        return lut if lut.data.dim() == 4 else _like(lut, lut.data.unsqueeze(1))
    return lut if lut.dim() == 4 else lut.unsqueeze(1)


def _payload(lut) -> torch.Tensor:
    """The tensor a tier stores: the float table itself, or a QuantizedLUT's packed uint8 rows."""
    return lut.data if isinstance(lut, QuantizedLUT) else lut


def _like(template, payload: torch.Tensor):
    """``payload`` as the same kind of table as ``template`` (a QuantizedLUT with its format, or as is)."""
    if isinstance(template, QuantizedLUT):
        return QuantizedLUT(payload, template.format, template.dim, template.block_size, template.dtype)
    return payload
