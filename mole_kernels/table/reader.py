"""`LayerReader`: how a model's steps read a LookupTable, one fused call per layer.

A step starts with its ids (``combine = start(ids)``, before layer 0) and then, in each layer, asks
for ``residual + shared + sum_e softmax(router logits)_e * LUT[ids, layer, e, :]`` with
``combine(l, logits, residual, shared)``, or ``combine(l, x, residual, shared, W)`` with the logits
``linear(x, W)`` computed in the same call: one call, no other per-layer work (on a CPU, ``combine``
is the C++ function itself). How the rows get there is decided once per
step, in :meth:`LayerReader._path`:

- ``direct`` (``cpu`` on a CPU): :func:`mole_kernels.lut_combine` reads each token's rows
  straight from the table, each byte once: any table in RAM on a CPU (the C++ kernel), the device
  tier on a GPU, and the host tier on a GPU for small batches of host ids (zero-copy over PCIe).
  An eager GPU step over a float table calls the Triton launch per layer with nothing else
  (``combine._lut_combine_step_cuda``: no dispatcher, no device_view per call).
- ``prefetch``: host tier on a GPU with ids on the GPU (decoding): a :class:`Prefetcher` starts
  every layer's rows on a side stream at ``start``, so PCIe latency hides behind attention;
  each layer waits for its own rows only, then :func:`mole_kernels.mole_combine`.
- ``bulk``: the same for steps of more than :attr:`LayerReader.prefetch_tokens` ids on the GPU
  (prefill): ids deduplicated on the GPU, each unique row prefetched once, each layer combined at
  the tokens' positions among them (:meth:`LayerReader._start_bulk`).
- ``staged`` (``staged-cpu`` on a CPU): the unique rows of the step are read once (the disk
  tier with ``pread``; the host tier's DMA path for large batches of host ids) into a buffer on
  the device, then ``direct`` over that buffer with the ids' positions in it. On a CPU that buffer
  is a row cache (:attr:`LayerReader.row_cache_bytes`): the rows of recent steps stay in its slots and
  a step reads only the rows none holds; the rows not in the page cache are read in the background,
  overlapping the step's work up to its first LUT term (:meth:`LayerReader._after_reads`).

Ids are checked where they enter the model (on the host); kernels on a GPU then run in
counted-faults mode (:attr:`LayerReader.faults`), so no step synchronises except where the
path itself needs ids on the host (staged). A reader keeps its buffers between steps and
belongs to one thread.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

from .. import _C
from .._ops import ops
from .. import combine as _combine
from ..combine import _lut_combine_step_cuda, _mole_combine_triton, mole_combine, triton
from ..quant import QuantizedLUT
from .prefetch import Prefetcher

if TYPE_CHECKING:  # the table creates its readers (LookupTable.reader); a reader only calls its methods
    from .lookup_table import LookupTable


class LayerReader:
    """Serves a model's steps from one :class:`LookupTable` (see the module docstring)."""

    #: host tier on a GPU, ids on the GPU: steps of at most this many tokens are prefetched into VRAM
    #: as they are; larger ones (prefill) prefetch their unique rows only (the ``bulk`` path).
    prefetch_tokens = 256

    #: disk tier on a CPU: the rows of recent steps are kept in RAM, up to this many bytes (at least one step's
    #: rows), and a step reads from the file only the rows none holds (RowCache in csrc/lookup_table.cpp says
    #: why). :meth:`LookupTable.drop_cached_rows` forgets them.
    row_cache_bytes = 64 << 20

    def __init__(self, table: LookupTable):
        table._check_open()
        self.table = table
        table._readers.add(self)
        # The usual CPU step (the "cpu" path) is kept to a handful of Python operations: at the demo's
        # shape a few microseconds per step are a percent of the step.
        self._in_ram = table.device.type == "cpu" and table.placement != "disk"
        # The in-RAM step's layer call but for its ids (partial(call, ids) is one flat partial), and where the
        # step counts itself (the table's stats read it).
        self._direct_call = None
        if self._in_ram:
            fn, head = _direct_fn(table._lut)
            self._direct_call = partial(fn, *head)
        self._tally = table._tally
        self._direct = None  # CPU disk tier: (C++ function, the row cache's slots as a table), made with the cache
        self._file_cpu = table.device.type == "cpu" and table.placement == "disk"
        # What the counters of every step need, looked up once (the table's tier never changes).
        self._placement, self._row_bytes = table.placement, table.row_bytes
        self._h2d = table.placement == "host" and table.device.type == "cuda"
        self._prefetcher: Optional[Prefetcher] = None
        self._staged: Optional[torch.Tensor] = None  # unique rows of a staged step (bytes, on the device)
        self._staged_table = None  # CPU, disk tier: the row cache's slots as a table of rows (float or QuantizedLUT)
        self._cache = None  # ... the cache itself (a _C._row_cache handle)
        self._cache_rows = 0  # ... holding this many rows
        self._pending = 0  # CPU, disk tier: the ticket of the step's storage reads still running (0: none)
        self._faults = torch.zeros(1, dtype=torch.int64, device=table.device)
        self._layers = None  # GPU, float table read in place: its [V, E, D] device view per layer (made once)
        self._scratch = None  # GPU bulk steps: where their already-counted bad ids are counted again

    @property
    def faults(self) -> int:
        """Ids outside ``[0, V)`` that reached a GPU kernel (they read zero rows; reading this synchronises)."""
        pf = self._prefetcher.faults if self._prefetcher is not None else 0
        return int(self._faults.item()) + pf

    def start(self, ids: torch.Tensor) -> Callable[..., torch.Tensor]:
        """Begins a step for ``ids`` (any shape, on the table's device); returns its layers' call,
        ``combine(l, x, residual, shared, router_weight=None)`` (see the module docstring)."""
        # The usual CPU step, first: the table in RAM, read in place; the check counts the step in the table's tally.
        # _plain_eager written out: a step starts with this code cold, where each Python frame costs a microsecond.
        if self._in_ram and not _dynamo_tracing() and _C._plain_eager(ids, self._tally):
            return partial(self._direct_call, ids)
        if self._file_cpu and _plain_eager(ids):  # the same over the step's unique rows, read with one call
            inverse = self._read_rows_cpu(ids, background=True)[1]
            fn, head = self._direct
            combine = partial(fn, *head, inverse)
            return combine if not self._pending else self._after_reads(combine)
        t = self.table
        path = self._path(ids)
        if path == "staged-cpu":  # a file on a CPU: the step's unique rows read once, with one C++ call
            return _direct_combine(*_read_rows_outside_graph(self, ids), None)
        if path == "prefetch":
            return _Prefetched(self._prefetch(ids.numel()).start(ids, path="zero_copy")).combine
        if path == "bulk":
            return self._start_bulk(ids)
        if path == "staged":  # a GPU: a bad id becomes -1 (counted by the kernel, no synchronisation)
            need = ids.numel() * t.row_bytes
            if self._staged is None or self._staged.numel() < need:
                self._staged = torch.empty(max(need, t.row_bytes), dtype=torch.uint8, device=t.device)
            rows, inverse = t._unique_rows(ids, None, out=self._staged, strict=False)
            return _direct_combine(rows, inverse.view(ids.shape), self._faults)
        self._count(ids.numel(), ids.numel())
        ids = t._to_device(ids, "reader")
        if t.device.type == "cuda" and triton is not None and t._quant is None and _plain_eager(ids):
            # Eager GPU step over a float table read in place: the launch itself, per layer (see
            # _lut_combine_step_cuda); the table's per-layer device views are made once per reader.
            if self._layers is None:
                alias = ops.device_view(t._lut, t.device)  # VRAM as is; the pinned table's device alias
                self._layers = [alias[:, l] for l in range(t.shape[1])]
            return _lut_combine_step_cuda(self._layers, ids, self._faults)
        return _direct_combine(t._lut, ids, self._faults)

    def _prefetch(self, tokens: int) -> Prefetcher:
        """The reader's prefetcher, for at least ``tokens`` tokens (one buffer pair, grown on demand)."""
        if self._prefetcher is None or self._prefetcher.max_tokens < tokens:
            self._prefetcher = Prefetcher(self.table, max(tokens, 1), strict=False)
        return self._prefetcher

    def _start_bulk(self, ids: torch.Tensor) -> Callable[..., torch.Tensor]:
        """Host tier, many ids on the GPU (prefill): each unique row crosses PCIe once, in bulk.

        The ids are deduplicated on the GPU (``torch.unique``: one synchronisation for the count, a
        few microseconds against milliseconds of prefill), the prefetcher reads the unique rows into
        VRAM on its side stream (layer groups with their own events, so the first layers compute
        while later rows arrive), and each layer combines at the tokens' positions among them. A
        batch of 8 x 512 Zipf-distributed tokens holds far fewer unique ids than tokens, and no row
        crosses PCIe in the layer loop (the direct path would read every token's rows in every layer).
        An id outside ``[0, V)`` is counted once in :attr:`faults` and reads zero rows.
        """
        t = self.table
        flat = ids.reshape(-1)
        bad = (flat < 0) | (flat >= t.shape[0])
        self._faults += bad.sum()  # exact, once per token, without synchronising
        uniq, inverse = torch.unique(torch.where(bad, 0, flat), return_inverse=True)
        inverse = torch.where(bad, -1, inverse)  # reads zeros; counted into scratch, not again into faults
        if self._scratch is None:
            self._scratch = torch.zeros(1, dtype=torch.int64, device=t.device)
        # The prefetcher counts the rows it reads (each unique row once) into the table's stats.
        handle = self._prefetch(uniq.numel()).start(uniq, path="zero_copy")
        return _Prefetched(handle, inverse.view(ids.shape), self._scratch).combine

    def _read_rows_cpu(self, ids: torch.Tensor, background: bool = False):
        """(the row cache's slots as a table of rows, each id's slot) for a step on a CPU: the rows no slot
        holds are read from the file (one C++ call, which counts the step in the table's tally); the slots keep
        their typed view between steps, so a step costs the read and nothing per layer. ``background``: rows
        that must come from storage may still be arriving on return (``self._pending``; see
        :meth:`_after_reads`)."""
        if self._pending:  # an earlier step that never reached its first layer: its reads end first
            self._wait_reads()
        if self._cache_rows < min(ids.numel(), self.table.shape[0]):
            self._new_cache(ids.numel())
        # One direct call into C++ (csrc/direct_calls.h says why not a TorchScript method), thread-safe; an id
        # outside [0, V) raises here, naming the first one.
        slots, self._pending = _C._read_cached(self._cache, ids, background, self._tally)
        return self._staged_table, slots

    def _new_cache(self, tokens: int) -> None:
        """A row cache with a slot for every row of a step of ``tokens`` ids, and up to
        :attr:`row_cache_bytes` of them (the rows of an older cache are read again as needed)."""
        t = self.table
        rows = min(t.shape[0], max(tokens, 16, self.row_cache_bytes // t.row_bytes))
        slots = torch.empty(rows * t.row_bytes, dtype=torch.uint8)
        table = slots.view(t._stored_dtype).view(rows, *t._stored_shape[1:])
        self._staged_table = table if t._quant is None else QuantizedLUT(
            table, t._quant.format, t._quant.dim, t._quant.block_size, t._quant.dtype)
        self._direct = _direct_fn(self._staged_table)
        self._cache = _C._row_cache(t._store.handle(), slots, t.row_bytes)
        self._cache_rows = rows

    def drop_cached_rows(self) -> None:
        """Forgets the rows the row cache holds (disk tier on a CPU): the next step reads its rows from the file."""
        if self._cache is not None:
            _C._drop_cached_rows(self._cache)

    def _after_reads(self, combine: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``combine`` for a step whose storage reads are still running (rows not in the page cache).

        Why: at B = 32 a cold step reads ~2 MB from storage, ~6 % of a 160M-4E step when the step
        waits for it; in the background the reads overlap everything before the first layer's LUT
        call (the embedding, layer 0's attention and shared MLP). The first call waits for them (and
        raises a failed read's error, or a file changed meanwhile); a step whose rows were all cached
        gets ``combine`` itself (no wrapper).
        """
        def combine_after_reads(*args):
            if self._pending:
                self._wait_reads()
            return combine(*args)
        return combine_after_reads

    def _wait_reads(self) -> None:
        ticket, self._pending = self._pending, 0
        _C._wait_reads(ticket)

    def _count(self, rows: int, read: int):
        """The table's counters for a step that reads `read` tokens' rows for `rows` ids, on the paths whose
        reads do not count themselves in C++ (the table's tally: the CPU's eager and file steps)."""
        if torch.compiler.is_compiling():  # Python state: a compiled step would recompile on every change
            return
        s = self.table._stats
        s.calls += 1
        s.rows_requested += rows
        s.bytes_read[self._placement] += read * self._row_bytes
        if self._h2d:
            s.bytes_h2d += read * self._row_bytes

    def _path(self, ids: torch.Tensor) -> str:
        """The one place that decides how a step's rows are read (see the module docstring)."""
        t = self.table
        if t.device.type == "cpu":
            return "staged-cpu" if t.placement == "disk" else "cpu"
        if t.placement == "disk":
            return "staged"
        if t.placement == "device":
            return "direct"
        if ids.is_cuda:
            return "prefetch" if ids.numel() <= self.prefetch_tokens else "bulk"
        return "staged" if ids.numel() > t.dma_min_tokens else "direct"


@torch.compiler.disable
def _read_rows_outside_graph(reader: LayerReader, ids: torch.Tensor):
    """reader._read_rows_cpu(ids), outside any compiled graph (one opaque file read per step; dynamo cannot trace
    it). The eager step calls it directly."""
    return reader._read_rows_cpu(ids)


def _direct_combine(table, ids: torch.Tensor, faults: Optional[torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The layers' call of a step that reads rows straight from a table (the table, or a step's unique
    rows) at ids: ``combine(l, x, residual, shared, router_weight=None)`` = ``residual + shared + sum_e
    softmax(logits)_e * rows[l, e]`` (``[*, D]`` like residual), the logits ``x`` or, with a router
    weight, ``linear(x, router_weight)``."""
    if ids.device.type == "cpu" and _plain_eager(ids):
        # Eager inference on plain tensors: the op's own CPU function, called directly, the router
        # matmul in the same call (a bad id raises naming it).
        fn, head = _direct_fn(table)
        return partial(fn, *head, ids)
    # torch.compile, dispatch modes, autograd and GPUs take the op, which they can see.
    if isinstance(table, QuantizedLUT):
        head, op = (table.data, table.format, table.dim, table.block_size, ids), "lut_combine_quant"
    else:
        head, op = (table, ids), "lut_combine"
    if ids.device.type != "cpu":
        return partial(_op_combine, partial(_combine_counting_faults, getattr(ops, op + "_out"), head, faults))
    return partial(_op_combine, partial(getattr(ops, op), *head))


def _direct_fn(table):
    """(the C++ function of mole_kernels._C, the table's leading arguments) for a CPU table."""
    if isinstance(table, QuantizedLUT):
        return _C._lut_combine_quant, (table.data, table.format, table.dim, table.block_size)
    return _C._lut_combine, (table,)


# Whether dynamo is tracing the caller (dynamo answers it as a constant True): one Python frame, where
# torch.compiler.is_compiling runs two and looks up five module attributes. A decode step starts with all of
# that cold: timed inside the bench's loop (demo, B = 8), start() took 11-16 us with is_compiling, 7-10 us with
# this. Export's non-strict tracing, which is_compiling also covers, passes FakeTensors, which _C._plain_eager
# refuses. Every supported torch (2.4+) has it; its docs call it internal, so is_compiling stands in should it go.
_dynamo_tracing = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)


def _plain_eager(ids: torch.Tensor, tally: Optional[torch.Tensor] = None) -> bool:
    """Whether nothing needs to see the op: eager (no torch.compile, dispatch mode or functorch
    transform), no autograd, plain ids (the tables are plain tensors that never require grad).
    torch.compile is asked first, in Python, where dynamo answers it; the rest in one C++ call, which
    counts a plain step reading ids' rows in place into ``tally`` (a table's, when given)."""
    return not _dynamo_tracing() and _C._plain_eager(ids, tally)


def _op_combine(op, l, x, residual, shared, router_weight=None):
    """``op(logits, l, residual, shared)``, the logits computed from ``x`` when a router weight is given."""
    return op(x if router_weight is None else _router_logits(x, router_weight), l, residual, shared)


# Router matmuls up to this many multiply-adds are a product and a sum inside compiled CPU code (as
# kHandLoop in csrc/lut_combine.cpp: below it a GEMM call's fixed cost dwarfs the E x D work).
_COMPILED_ROUTER_MACS = 1 << 16


def _router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``linear(x, weight)``. Inside torch.compile on a CPU, for decode-sized inputs, as a product and a
    sum: inductor then fuses the router into the layer's lookup loop (lut_combine's decomposition,
    mole_kernels.combine) instead of calling a GEMM for E x D multiply-adds."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() * weight.shape[0] <= _COMPILED_ROUTER_MACS:
        return (x.unsqueeze(-2) * weight).sum(-1)
    return F.linear(x, weight)


def _combine_counting_faults(op_out, head, faults, logits, l, residual, shared):
    out = torch.empty_like(residual)
    op_out(out, *head, logits, l, residual, shared, faults)
    return out


class _Prefetched:
    """A step whose rows were prefetched into VRAM: each layer waits for its own rows, then combines
    them: token t's rows are row t of the prefetch, or with ``positions`` (a bulk step over unique
    rows) row ``positions[t]``, read by the combine kernel at that position."""

    __slots__ = ("_handle", "_T", "_positions", "_faults")

    def __init__(self, handle, positions: Optional[torch.Tensor] = None, faults: Optional[torch.Tensor] = None):
        self._handle, self._positions, self._faults = handle, positions, faults
        self._T = handle.num_tokens if positions is None else positions.numel()

    def combine(self, l: int, x: torch.Tensor, residual: torch.Tensor, shared: torch.Tensor,
                router_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = x if router_weight is None else F.linear(x, router_weight)
        D = residual.shape[-1]
        if self._positions is None:
            T = self._T
            rows = self._handle.layer(l)  # [T, E, D]: the current stream waits for this layer's rows only
            if _combine._backend(rows) == "triton" and _plain_eager(logits):
                # Eager decode: the launch and its output, nothing else (the rows are the prefetcher's own
                # buffer; the model's tensors get the checks they can fail).
                _, E, D = rows.shape  # the rows' D: the model's tensors must match it (not their own last dim)
                if logits.numel() != T * E or residual.shape != shared.shape or residual.numel() != T * D:
                    raise ValueError(f"LayerReader: a step of {T} tokens needs logits [.., {E}] and residual/shared "
                                     f"[.., {D}], got {tuple(logits.shape)}, {tuple(residual.shape)}, "
                                     f"{tuple(shared.shape)}")
                out = torch.empty_like(residual, memory_format=torch.contiguous_format)
                _mole_combine_triton(logits, rows, residual, shared, out)
                return out
            out = mole_combine(logits.reshape(T, -1), rows, residual.reshape(T, D), shared.reshape(T, D))
            return out.view(residual.shape)
        out = torch.empty_like(residual, memory_format=torch.contiguous_format)
        ops.lut_combine_out(out, self._handle.rows(l), self._positions, logits, l, residual, shared, self._faults)
        return out
