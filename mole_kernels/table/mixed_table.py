"""`MixedLookupTable`: a mixed-precision table (:class:`~mole_kernels.mixed.MixedLUT`) as a model's table.

Host tier on a CPU: the parts stay in RAM as they are (packed bytes, factored rows and bases) and a
decode step calls one C++ function per layer (``mole_kernels._C._lut_combine_mixed``: router logits,
softmax, each token's rows decoded by its part's format, the expert sum, residual and shared), the
same arithmetic as ``torch.ops.mole_kernels.lut_combine_mixed``, which torch.compile and dispatch
modes see instead. A model takes it like a :class:`~mole_kernels.table.LookupTable`::

    m = quantize_mixed(lut, counts, [("int8", 64), ("f36x5", None)], normalize=True)
    model.set_lut(MixedLookupTable(m))          # or MixedLookupTable.open("lut.safetensors") (save_mixed's file)

Disk tier (``MixedLookupTable.open(path, "disk")``): the rank map, the factored parts' bases and the
offsets and column scales are read into RAM (small); each part's rows stay in the file. Each part keeps the
rows of recent steps in a row cache over its staging buffer (as :class:`~mole_kernels.table.LayerReader`
does, up to its ``row_cache_bytes`` for all parts together); a step reads with ``pread`` only the rows of its
ids no slot holds, with one C++ call (``_C._mixed_read_step``), and its layers then run the same C++ call as
the host tier over the staging buffers, whose rank map is the step's own (token t -> its row's slot in its
part's staging).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import json
import os
import struct
import weakref

import torch

from .. import _C
from .._ops import ops
from ..mixed import MixedLUT, load_mixed, mixed_lut_gather, mixed_op_args
from .lookup_table import _store
from .reader import LayerReader, _plain_eager, _router_logits

__all__ = ["MixedLookupTable"]


class MixedLookupTable:
    """A :class:`MixedLUT` ``[V, L, E, D]`` on a CPU, in RAM (``placement="host"``) or read from its file
    (``"disk"``, :meth:`open`), read by one fused call per layer."""

    def __init__(self, m: MixedLUT, *, _files=None):
        if not isinstance(m, MixedLUT):
            raise ValueError(f"MixedLookupTable: expected a MixedLUT, got {type(m).__name__}")
        if len(m.shape) != 4:
            raise ValueError(f"MixedLookupTable: the table must be [V, L, E, D], got {list(m.shape)}")
        parts = [getattr(p, "data", p) for p in m.parts]
        want = "meta" if _files is not None else "cpu"
        if m.rank.device.type != "cpu" or any(t.device.type != want for t in parts):
            raise ValueError("MixedLookupTable: the mixed table must be on the CPU (the host tier of a CPU)")
        self.lut = m
        self.placement = "host" if _files is None else "disk"
        self._head, self._norm = mixed_op_args(m)
        self._stores = _files  # disk: one file store per part (its rows in the table file)
        self._readers = weakref.WeakSet()  # disk: the readers over it (drop_cached_rows reaches their row caches)
        # host: the arguments checked once; the step's call takes the handle as is
        self._handle = _C._mixed_table(*self._head, *self._norm) if _files is None else None

    @classmethod
    def open(cls, path, placement: str = "host") -> "MixedLookupTable":
        """A table file written by :func:`mole_kernels.mixed.save_mixed`: loaded into RAM (``"host"``), or
        its parts' rows left in the file and read per step (``"disk"``)."""
        if placement == "host":
            return cls(load_mixed(path))
        if placement != "disk":
            raise ValueError(f"MixedLookupTable.open: placement must be 'host' or 'disk', got {placement!r}")
        path = os.fspath(path)
        m = load_mixed(path, parts_in_file=True)
        with open(path, "rb") as f:  # where each part's bytes are (the safetensors header)
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        stores = []
        for k, p in enumerate(m.parts):
            t = getattr(p, "data", p)
            begin, end = header[f"part{k}"]["data_offsets"]
            if end - begin != t.numel() * t.element_size():
                raise ValueError(f"MixedLookupTable.open: part {k} of {path} holds {end - begin} bytes, its shape "
                                 f"{list(t.shape)} needs {t.numel() * t.element_size()}: the file is corrupt")
            stores.append(_store("file", path, 8 + n + begin, end - begin))
        return cls(m, _files=stores)

    def close(self) -> None:
        for s in self._stores or ():
            s.close()

    @property
    def shape(self):
        return self.lut.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.lut.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def format(self) -> str:
        return "mixed"

    @property
    def nbytes(self) -> int:
        return self.lut.nbytes

    @property
    def bits_per_value(self) -> float:
        return self.lut.bits_per_value

    def __repr__(self):
        return (f"MixedLookupTable({self.lut.describe()}, {self.placement}, shape={list(self.shape)}, "
                f"{self.bits_per_value:.3f} bits/value)")

    def gather(self, ids: torch.Tensor, *, layer: Optional[int] = None) -> torch.Tensor:
        """Rows ``[*, L, E, D]`` (``[*, E, D]`` for one layer) in the table's dtype."""
        return mixed_lut_gather(self._lut_for(ids), ids, layer=layer)

    def gather_combine(self, ids: torch.Tensor, weights: torch.Tensor, layer: int) -> torch.Tensor:
        """``sum_e weights[..., e] * row[..., layer, e, :]`` (float32 accumulation, the table's dtype)."""
        return mixed_lut_gather(self._lut_for(ids), ids, weights, layer=layer)

    def _lut_for(self, ids: torch.Tensor) -> MixedLUT:
        """The table in RAM (host), or (disk) one with each part's whole rows read (a test and tool path)."""
        if self.placement == "host":
            return self.lut
        parts = []
        for p, store in zip(self.lut.parts, self._stores):
            t = getattr(p, "data", p)
            raw = torch.empty(store.nbytes(), dtype=torch.uint8)
            store.read(0, raw.numel(), raw)
            rows = raw.view(t.dtype).view(t.shape)
            if isinstance(p, torch.Tensor):
                parts.append(rows)
            else:
                fields = {k: v for k, v in p.__dict__.items() if not k.startswith("_")}
                parts.append(type(p)(**{**fields, "data": rows}))
        return MixedLUT(self.lut.rank, parts, self.lut.offset, self.lut.col_scale)

    def reader(self):
        if self.placement == "host":
            return MixedReader(self)
        reader = MixedDiskReader(self)
        self._readers.add(reader)
        return reader

    def drop_cached_rows(self) -> None:
        """As :meth:`LookupTable.drop_cached_rows`: the disk tier's readers forget the rows they keep in RAM."""
        for reader in list(self._readers):
            reader.drop_cached_rows()


class MixedReader:
    """A model's steps over a :class:`MixedLookupTable` (as :class:`~mole_kernels.table.LayerReader`)."""

    faults = 0  # ids are checked by every call (a bad id raises, naming it)

    def __init__(self, table: MixedLookupTable):
        self.table = table

    def start(self, ids: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The step's layers' call ``combine(l, x, residual, shared, router_weight=None)``."""
        if _plain_eager(ids):  # eager inference: the C++ function itself, per layer
            return partial(_C._lut_combine_mixed, self.table._handle, ids)
        return partial(_op_combine_mixed, self.table, ids)  # torch.compile, dispatch modes, autograd: the op


class MixedDiskReader:
    """A model's steps over a disk-tier :class:`MixedLookupTable`: per step, each part's rows of the ids through
    its row cache (one C++ call: the rows no slot holds are read from the file), then the host tier's call per
    layer over the staging."""

    faults = 0

    def __init__(self, table: MixedLookupTable):
        self.table = table
        m = table.lut
        self._starts = list(m.starts)
        self._token_bytes = [getattr(p, "data", p)[0].numel() * getattr(p, "data", p).element_size() for p in m.parts]
        self._cap = 0

    def _grow(self, tokens: int) -> None:
        """Row caches with a slot per part for every token of a step of `tokens` ids, and up to
        LayerReader.row_cache_bytes of them in all (never more slots than the largest part's rows), with the
        staged table's arguments and handle over them."""
        m, t = self.table.lut, self.table
        most = max(getattr(p, "data", p).shape[0] for p in m.parts)
        cap = max(tokens, min(most, max(16, LayerReader.row_cache_bytes // sum(self._token_bytes))))
        self._staging = [torch.empty((cap, *getattr(p, "data", p).shape[1:]), dtype=getattr(p, "data", p).dtype)
                         for p in m.parts]
        self._caches = [_C._row_cache(store.handle(), staging.view(-1).view(torch.uint8), row)
                        for store, staging, row in zip(t._stores, self._staging, self._token_bytes)]
        self._step_rank = torch.zeros(len(m.parts) * cap, dtype=torch.int32)
        rank, _, formats, blocks, bases, dim = t._head
        self._head, self._norm = (self._step_rank, self._staging, formats, blocks, bases, dim), t._norm
        self._handle = _C._mixed_table(*self._head, *t._norm)
        self._positions = torch.arange(cap)
        self._views = {}  # ids.shape -> the step's positions, [0, T) in that shape (views of _positions)
        self._cap = cap

    def start(self, ids: torch.Tensor) -> Callable[..., torch.Tensor]:
        T = ids.numel()
        if T > self._cap:
            self._grow(T)
        args = (self.table.lut.rank, self._starts, self._caches, self._step_rank, ids)
        if _plain_eager(ids):  # the usual step: the C++ calls themselves, the positions viewed once per shape
            _C._mixed_read_step(*args)
            positions = self._views.get(ids.shape)
            if positions is None:
                positions = self._views[ids.shape] = self._positions[:T].view(ids.shape)
            return partial(_C._lut_combine_mixed, self._handle, positions)
        _read_step(*args)
        return partial(_op_combine_mixed, self, self._positions[:T].view(ids.shape))

    def drop_cached_rows(self) -> None:
        """Forgets the rows the row caches hold: the next step reads its rows from the files."""
        for c in getattr(self, "_caches", ()):
            _C._drop_cached_rows(c)


@torch.compiler.disable
def _read_step(*args) -> None:
    """_C._mixed_read_step, outside any compiled graph (one opaque file read per step; dynamo cannot trace it)."""
    _C._mixed_read_step(*args)


def _op_combine_mixed(table, ids, l, x, residual, shared, router_weight=None):
    """The op form of a step's layer call (``table``: a MixedLookupTable, or a disk reader's staged table)."""
    logits = x if router_weight is None else _router_logits(x, router_weight)
    return ops.lut_combine_mixed(*table._head, ids, logits, l, *table._norm, residual, shared)
