"""`Prefetcher`: all layers' rows for the next ids, fetched ahead of use into a double buffer."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from ..lut_gather import lut_gather
from .._ops import raise_on_bad_ids

if TYPE_CHECKING:  # the table creates its prefetchers (LookupTable.prefetcher); a prefetcher only calls its methods
    from .lookup_table import LookupTable


def layer_groups(L: int) -> List[Tuple[int, int]]:
    """The layers each prefetch launch fills on a GPU: [0, 1), [1, 2), [2, 4), [4, 8), ... [., L).

    One launch per layer costs a launch and an event each (24 per step at 410M); one launch for
    every layer gives no per-layer readiness: layer 0 would wait for all L layers' rows. Groups
    that double in size keep both small: log2(L) + 1 launches (6 at L = 24), and layer l waits at
    most for rows of layers < 2l (+1), which arrive while layers before it compute (a token's rows
    cross PCIe at ~50 GB/s, far faster than a layer consumes them at small batch). A kernel that
    publishes per-layer flags the consumer spins on would need stream memory operations to stay
    off the SMs and capturable; these events are plain, graph-capturable and testable.
    """
    groups, a = [], 0
    while a < L:
        b = min(L, a + max(1, a))  # as many layers as come before the group: 1, 1, 2, 4, 8, ...
        groups.append((a, b))
        a = b
    return groups


class Prefetch:
    """One started prefetch: :meth:`layer` returns its rows (valid until two later ``start`` calls)."""

    def __init__(self, owner: "Prefetcher", slot: int, generation: int, num_tokens: int):
        self._owner, self.slot, self.generation, self.num_tokens = owner, slot, generation, num_tokens

    def layer(self, l: int) -> torch.Tensor:
        """Layer ``l``'s rows ``[T, E, D]`` (the current stream waits for them only)."""
        owner = self._owner
        owner._wait(self, l)
        view = owner._layer_views[self.slot][l]  # [max_tokens, E, D], made once: no slicing per call at full size
        return view if self.num_tokens == owner.max_tokens else view[:self.num_tokens]

    def rows(self, l: int) -> torch.Tensor:
        """The whole ``[T, L, E, D]`` buffer, once the current stream has waited for layer ``l``'s rows
        (contiguous: a table that kernels read at a layer)."""
        self._owner._wait(self, l)
        return self._owner._bufs[self.slot][:self.num_tokens]


class Prefetcher:
    """Issues all layers' rows for the next ids on a side stream into a reusable double buffer.

    ``start(ids)`` returns at once (on CUDA); ``layer(l)`` makes the current stream wait for
    layer ``l``'s rows only and returns them, a ``[T, E, D]`` view of the token-major buffer
    ``[max_tokens, L, E, D]`` (tokens strided; dequantized, in the table's dtype, for a
    quantized table). On a GPU the rows arrive in :func:`layer_groups` launches, each with its
    own event. Two buffers alternate, so the prefetch for step n+1 may be started while step n
    still reads its rows; a third ``start`` reuses the first buffer (its :class:`Prefetch`
    handle then raises instead of returning overwritten rows). Every ``start`` waits (on the
    GPU) for the work already queued on the current stream, so ids produced there are ready and
    earlier readers of the reused buffer are done.

    ``strict=True``: an id outside ``[0, V)`` raises ``ValueError`` naming the first one (ids on
    a GPU are checked with one synchronisation). ``strict=False``: such an id reads zero rows and
    is counted in :attr:`faults`, on every path, without synchronising. Steady state then
    allocates nothing for the device tier and the host tier's zero-copy path, so a decode step
    can be captured in a CUDA graph. The dma and disk paths dedupe ids on the host (a
    synchronisation when they are on the GPU). On the CPU everything runs synchronously with the
    same API.
    """

    def __init__(self, table: LookupTable, max_tokens: int, *, strict: bool = True):
        table._check_open()
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"Prefetcher: max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(strict, bool):
            raise ValueError(f"Prefetcher: strict must be a bool, got {strict!r}")
        V, L, E, D = table.shape
        dev = table.device
        self.table, self.max_tokens, self.strict = table, max_tokens, strict
        # The buffers hold dequantized rows in the table's dtype for a quantized table too: the
        # gather's rows form dequantizes while it writes them, so layer() and mole_combine are the
        # same for every table, and only quantized bytes cross PCIe / come off disk either way.
        self._bufs = [torch.empty((max_tokens, L, E, D), dtype=table.dtype, device=dev) for _ in range(2)]
        self._layer_views = [[buf[:, l] for l in range(L)] for buf in self._bufs]
        self._L = L
        self._ids = [torch.empty(max_tokens, dtype=torch.int64, device=dev) for _ in range(2)]
        self._unique = [None, None]  # dedupe paths: device buffer of unique rows, made on first use
        self._faults = torch.zeros(1, dtype=torch.int64, device=dev)
        self._scratch = torch.zeros(1, dtype=torch.int64, device=dev)
        self._cuda = dev.type == "cuda"
        # The same launches on every device, so the group boundaries are exercised on a CPU too.
        self._groups = layer_groups(L)
        self._group_of = [g for g, (a, b) in enumerate(self._groups) for _ in range(a, b)]
        if self._cuda:
            # High priority: the row reads are small and latency-bound; behind a queue of compute
            # kernels at default priority they would arrive late. (Lower numbers are higher.)
            self._stream = torch.cuda.Stream(dev, priority=torch.cuda.Stream.priority_range()[1])
            self._ready = [[torch.cuda.Event() for _ in self._groups] for _ in range(2)]
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
        return self._current.layer(l)

    def _issue(self, slot: int, ids: torch.Tensor, T: int, path: str):
        t = self.table
        idx = self._ids[slot][:T]
        if path in ("device", "zero_copy"):
            if self.strict and T:
                raise_on_bad_ids(ids, t.shape[0], "Prefetcher.start")  # a synchronisation for ids on a GPU
            idx.copy_(ids, non_blocking=True)
            src = t._lut
            t._count_direct(T, None, path)
        else:
            if self._unique[slot] is None:
                self._unique[slot] = torch.empty(self.max_tokens * t.row_bytes, dtype=torch.uint8, device=t.device)
            src, inv = t._unique_rows(ids, None, out=self._unique[slot], strict=self.strict)
            idx.copy_(inv, non_blocking=True)
        if T == 0:
            return
        t0 = time.perf_counter()
        buf = self._bufs[slot]
        for g, (a, b) in enumerate(self._groups):
            # faults= keeps every launch free of synchronisation (the range was checked above if strict).
            # Bad ids are counted once per start (the first group); later groups count into scratch.
            lut_gather(src, idx, layer=slice(a, b), out=buf[:T, a:b], faults=self._faults if g == 0 else self._scratch)
            if self._cuda:
                self._ready[slot][g].record(self._stream)
        t._stats.add_time("gather", t0)

    def _wait(self, handle: Prefetch, l: int) -> None:
        """Checks that ``handle``'s rows are still there and ``l`` a layer; the current stream then waits for
        layer ``l``'s group (one call per layer of a decode step: kept to a few operations)."""
        if self._generation[handle.slot] != handle.generation:
            raise RuntimeError("Prefetch.layer: these rows were overwritten by a later start() (a Prefetcher keeps "
                               "the two most recent prefetches)")
        if type(l) is not int or not 0 <= l < self._L:  # type(): a bool is no layer
            raise ValueError(f"Prefetcher.layer: l must be an int in [0, {self._L}), got {l!r}")
        if self._cuda:
            torch.cuda.current_stream(self.table.device).wait_event(self._ready[handle.slot][self._group_of[l]])
