"""`Prefetcher`: all layers' rows for the next ids, fetched ahead of use into a double buffer."""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..lut_gather import lut_gather
from .lookup_table import LookupTable

class Prefetch:
    """One started prefetch: :meth:`layer` returns its rows (valid until two later ``start`` calls)."""

    def __init__(self, owner: "Prefetcher", slot: int, generation: int, num_tokens: int):
        self._owner, self.slot, self.generation, self.num_tokens = owner, slot, generation, num_tokens

    def layer(self, l: int) -> torch.Tensor:
        return self._owner._layer(self, l)


class Prefetcher:
    """Issues all layers' rows for the next ids on a side stream into a reusable double buffer.

    ``start(ids)`` returns at once (on CUDA); ``layer(l)`` makes the current stream wait for
    layer ``l``'s rows only and returns them, a ``[T, E, D]`` view (contiguous: the buffer is
    layer-major ``[L, max_tokens, E, D]``; dequantized, in the table's dtype, for a quantized
    table). Two buffers alternate, so the prefetch for step n+1
    may be started while step n still reads its rows; a third ``start`` reuses the first
    buffer (its :class:`Prefetch` handle then raises instead of returning overwritten rows).
    Every ``start`` waits (on the GPU) for the work already queued on the current stream, so
    ids produced there are ready and earlier readers of the reused buffer are done.

    Steady state allocates nothing for the device tier and the host tier's zero-copy path,
    so a decode step can be captured in a CUDA graph with ``strict=False`` (out-of-range ids
    then read zeros and are counted in :attr:`faults` instead of raising, which would
    synchronise). The dma and disk paths dedupe on the host and synchronise.
    On the CPU everything runs synchronously with the same API.
    """

    def __init__(self, table: LookupTable, max_tokens: int, *, strict: bool = True):
        table._check_open()
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"Prefetcher: max_tokens must be a positive int, got {max_tokens!r}")
        V, L, E, D = table.shape
        dev = table.device
        self.table, self.max_tokens, self.strict = table, max_tokens, strict
        # The buffers hold dequantized rows in the table's dtype for a quantized table too: the
        # gather's rows form dequantizes while it writes them, so layer() and mole_combine are the
        # same for every table, and only quantized bytes cross PCIe / come off disk either way.
        # The alternative (keep quantized rows here, dequantize inside mole_combine) would save
        # device-buffer bandwidth; it was not measured because no GPU was available, so the
        # simpler form stands until a benchmark says otherwise.
        self._bufs = [torch.empty((L, max_tokens, E, D), dtype=table.dtype, device=dev) for _ in range(2)]
        self._ids = [torch.empty(max_tokens, dtype=torch.int64, device=dev) for _ in range(2)]
        self._unique = [None, None]  # dedupe paths: device buffer of unique rows, made on first use
        self._faults = torch.zeros(1, dtype=torch.int64, device=dev)
        self._scratch = torch.zeros(1, dtype=torch.int64, device=dev)
        self._cuda = dev.type == "cuda"
        if self._cuda:
            self._stream = torch.cuda.Stream(dev)
            self._ready = [[torch.cuda.Event() for _ in range(L)] for _ in range(2)]
        self._generation = [0, 0]
        self._current: Optional[Prefetch] = None

    @property
    def faults(self) -> int:
        """Ids outside [0, V) seen with strict=False (reading it synchronises)."""
        return int(self._faults.item())

    @property
    def faults_tensor(self) -> torch.Tensor:
        return self._faults

    def start(self, ids: torch.Tensor, *, path: str = "auto") -> Prefetch:
        """Starts fetching all layers' rows for ``ids`` [T] (T <= max_tokens); returns a handle."""
        t = self.table
        t._check_open()
        ids = t._check_ids(ids, "Prefetcher.start").reshape(-1)
        T = ids.numel()
        if T > self.max_tokens:
            raise ValueError(f"Prefetcher.start: {T} ids, more than max_tokens={self.max_tokens}")
        slot = 0 if self._current is None else 1 - self._current.slot
        self._generation[slot] += 1
        path = t._choose_path(ids, path)
        if self._cuda:
            self._stream.wait_stream(torch.cuda.current_stream(t.device))
            if ids.is_cuda and not torch.cuda.is_current_stream_capturing():
                ids.record_stream(self._stream)  # the caller may free ids before the side stream reads them
            with torch.cuda.stream(self._stream):
                self._issue(slot, ids, T, path)
        else:
            self._issue(slot, ids, T, path)
        self._current = Prefetch(self, slot, self._generation[slot], T)
        return self._current

    def layer(self, l: int) -> torch.Tensor:
        """Rows ``[T, E, D]`` of layer ``l`` for the ids of the latest :meth:`start`."""
        if self._current is None:
            raise RuntimeError("Prefetcher.layer: call start(ids) first")
        return self._layer(self._current, l)

    def _issue(self, slot: int, ids: torch.Tensor, T: int, path: str):
        t = self.table
        V, L, E, D = t.shape
        idx = self._ids[slot][:T]
        if path in ("device", "zero_copy"):
            if self.strict and T:
                self._check_range(ids, V)
            idx.copy_(ids, non_blocking=True)
            src = t._lut
            t._count_direct(T, None, path)
        else:
            if self._unique[slot] is None:
                self._unique[slot] = torch.empty(self.max_tokens * t.row_bytes, dtype=torch.uint8, device=t.device)
            src, inv = t._unique_rows(ids, None, path, out=self._unique[slot])  # validates the range itself
            idx.copy_(inv, non_blocking=True)
        t0 = time.perf_counter()
        buf = self._bufs[slot]
        for l in range(L):
            # faults= keeps every launch free of synchronisation (the range was checked above if strict).
            # Bad ids are counted once per start (layer 0); later layers count into scratch.
            lut_gather(src, idx, layer=l, out=buf[l, :T], faults=self._faults if l == 0 else self._scratch)
            if self._cuda:
                self._ready[slot][l].record(self._stream)
        t.stats.add_time("gather", t0)

    @staticmethod
    def _check_range(ids: torch.Tensor, V: int):
        bad = (ids < 0) | (ids >= V)
        if bool(bad.any()):  # one synchronisation when ids are on the GPU (strict mode only)
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(f"Prefetcher.start: ids contains {int(ids[pos])} (at flat position {pos}), outside the "
                             f"table's vocabulary [0, {V})")

    def _layer(self, handle: Prefetch, l: int) -> torch.Tensor:
        if self._generation[handle.slot] != handle.generation:
            raise RuntimeError("Prefetch.layer: these rows were overwritten by a later start() (a Prefetcher keeps "
                               "the two most recent prefetches)")
        L = self.table.shape[1]
        if not isinstance(l, int) or not 0 <= l < L:
            raise ValueError(f"Prefetcher.layer: l must be an int in [0, {L}), got {l!r}")
        if self._cuda:
            torch.cuda.current_stream(self.table.device).wait_event(self._ready[handle.slot][l])
        return self._bufs[handle.slot][l, :handle.num_tokens]
