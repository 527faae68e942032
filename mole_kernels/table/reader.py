"""`LayerReader`: how a model's steps read a LookupTable, one fused call per layer.

A step starts with its ids (``start(ids)``, before layer 0) and then, in each layer, asks for
``residual + shared + sum_e softmax(router logits)_e * LUT[ids, layer, e, :]`` with
``step.combine(l, logits, residual, shared)``: one call, no other per-layer work. How the rows
get there is decided once per step, in :meth:`LayerReader._path`:

- ``direct``: :func:`mole_kernels.lut_combine` reads each token's rows straight from the table,
  each byte once: any table in RAM on a CPU (the C++ kernel), the device tier on a GPU, and the
  host tier on a GPU for batches too large to prefetch (zero-copy over PCIe).
- ``prefetch``: host tier on a GPU with ids on the GPU (decoding): a :class:`Prefetcher` starts
  every layer's rows on a side stream at ``start``, so PCIe latency hides behind attention;
  each layer waits for its own rows only, then :func:`mole_kernels.mole_combine`.
- ``staged``: the unique rows of the step are read once (the disk tier with ``pread``; the
  host tier's DMA path for large batches of host ids) into a buffer on the device, then
  ``direct`` over that buffer with the ids' positions in it.

Ids are checked where they enter the model (on the host); kernels on a GPU then run in
counted-faults mode (:attr:`LayerReader.faults`), so no step synchronises except where the
path itself needs ids on the host (staged). A reader keeps its buffers between steps and
belongs to one thread.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from .._ops import ops
from ..combine import mole_combine
from ..quant import QuantizedLUT
from .lookup_table import LookupTable
from .prefetch import Prefetcher


class LayerReader:
    """Serves a model's steps from one :class:`LookupTable` (see the module docstring)."""

    #: host tier on a GPU, ids on the GPU: steps of at most this many tokens are prefetched into VRAM
    #: (two buffers of this many tokens' rows); larger ones read the table in place.
    prefetch_tokens = 256

    def __init__(self, table: LookupTable):
        table._check_open()
        self.table = table
        self._prefetcher: Optional[Prefetcher] = None
        self._staged: Optional[torch.Tensor] = None  # unique rows of a staged step (bytes, on the device)
        self._faults = torch.zeros(1, dtype=torch.int64, device=table.device)

    @property
    def faults(self) -> int:
        """Ids outside ``[0, V)`` that reached a GPU kernel (they read zero rows; reading this synchronises)."""
        pf = self._prefetcher.faults if self._prefetcher is not None else 0
        return int(self._faults.item()) + pf

    @property
    def static(self) -> bool:
        """Whether every step can run inside a CUDA graph (no host synchronisation, no allocation):
        not for the disk tier, whose rows are read by host threads once the ids are on the host."""
        return self.table.placement != "disk"

    def start(self, ids: torch.Tensor) -> "_Direct | _Prefetched":
        """Begins a step for ``ids`` (any shape, on the table's device); returns what its layers combine with."""
        t = self.table
        path = self._path(ids)
        if path == "prefetch":
            T = ids.numel()
            if self._prefetcher is None or self._prefetcher.max_tokens < T:
                self._prefetcher = Prefetcher(t, max(T, 1), strict=False)
            return _Prefetched(self._prefetcher.start(ids, path="zero_copy"))
        if path == "staged":
            need = ids.numel() * t.row_bytes
            if self._staged is None or self._staged.numel() < need:
                self._staged = torch.empty(max(need, t.row_bytes), dtype=torch.uint8, device=t.device)
            # On a GPU a bad id becomes -1 (counted by the kernel); on a CPU it raises naming it.
            rows, inverse = t._unique_rows(ids, None, out=self._staged, strict=t.device.type == "cpu")
            return _Direct(rows, inverse.view(ids.shape), self._faults)
        if not torch.compiler.is_compiling():  # counters are Python state: a compiled step would recompile on them
            t._count_direct(ids.numel(), None, "zero_copy" if t.placement == "host" else "device")
        return _Direct(t._lut, t._to_device(ids, "reader"), self._faults)

    def _path(self, ids: torch.Tensor) -> str:
        """The one place that decides how a step's rows are read (see the module docstring)."""
        t = self.table
        if t.placement == "disk":
            return "staged"
        if t.device.type == "cpu" or t.placement == "device":
            return "direct"
        if ids.is_cuda:
            return "prefetch" if ids.numel() <= self.prefetch_tokens else "direct"
        return "staged" if ids.numel() > t.dma_min_tokens else "direct"


class _Direct:
    """A step whose layers read rows straight from ``table`` (a table, or a step's unique rows) at ``ids``."""

    __slots__ = ("_combine",)

    def __init__(self, table, ids: torch.Tensor, faults: torch.Tensor):
        if isinstance(table, QuantizedLUT):
            head, op = (table.data, table.format, table.dim, table.block_size, ids), "lut_combine_quant"
        else:
            head, op = (table, ids), "lut_combine"
        if ids.device.type == "cpu":
            # The functional op: one call, its result is the layer's output (a bad id raises naming it).
            self._combine = partial(getattr(ops, op), *head)
        else:
            self._combine = partial(_combine_counting_faults, getattr(ops, op + "_out"), head, faults)

    def combine(self, l: int, logits: torch.Tensor, residual: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """``residual + shared + sum_e softmax(logits)_e * rows[l, e]`` (``[*, D]`` like residual)."""
        return self._combine(logits, l, residual, shared)


def _combine_counting_faults(op_out, head, faults, logits, l, residual, shared):
    out = torch.empty_like(residual)
    op_out(out, *head, logits, l, residual, shared, faults)
    return out


class _Prefetched:
    """A step whose rows were prefetched into VRAM: each layer waits for its own rows, then mole_combine."""

    __slots__ = ("_handle", "_T")

    def __init__(self, handle):
        self._handle, self._T = handle, handle.num_tokens

    def combine(self, l: int, logits: torch.Tensor, residual: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        D = residual.shape[-1]
        out = mole_combine(logits.reshape(self._T, -1), self._handle.layer(l), residual.reshape(self._T, D),
                           shared.reshape(self._T, D))
        return out.view(residual.shape)
