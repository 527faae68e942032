"""`router_softmax`, `mole_combine` and `lut_combine`: the per-layer arithmetic around a MoLE lookup.

    router_softmax(logits)                      -> softmax(logits, -1) in float32
    mole_combine(logits, rows, residual, shared) -> residual + shared + sum_e softmax(logits)_e * rows[:, e, :]
    lut_combine(lut, ids, logits, layer=l, residual=, shared=)
                                                -> the same with rows = lut[ids, l]: read in place
                                                   from the table, each byte once (one call per layer)

Read top to bottom: two Triton kernels, the block-size table, the launchers, the
plain-torch fallback, `_backend` (the one place that picks Triton or torch), the
torch op registration (with fake kernels for torch.compile), the public functions.

Semantics shared by every backend (Triton on CUDA, Triton interpreter on CPU,
plain torch):
- accumulation is float32; the softmax is max-subtracted, so logits of any
  magnitude (+-1e4 in fp16) are exact to float32 rounding;
- a ``-inf`` logit gives its expert weight exactly 0;
- a row whose logits are **all** ``-inf`` has no defined softmax: its
  probabilities, and its ``mole_combine`` output row, are **NaN** (as
  ``torch.softmax`` and the official eager chain give). It is not an exception
  because a GPU kernel cannot raise without synchronising (and graph capture
  forbids that); NaN is loud, never mistaken for a real output, and identical
  on every backend. ``+inf``/NaN logits make the row NaN too.
"""
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ._ops import build_info, check_fake_devices, ops, raise_on_bad_ids
from .quant import QuantizedLUT

try:  # Triton is optional: without it only the torch fallback exists.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["router_softmax", "mole_combine", "lut_combine", "MAX_EXPERTS"]

# The kernels hold one token's logits in registers; 4096 covers every MoE/MoLE
# router we know of with room to spare. Checked on every backend alike.
MAX_EXPERTS = 4096
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_LOGIT_DTYPES = _FLOATS + (torch.float64,)


# ---------------------------------------------------------------------------
# Triton kernels. Triton decides at import time (TRITON_INTERPRET, read when
# triton and these decorators run) whether kernels are compiled or interpreted,
# for tl.sum/tl.max as much as for ours; so the mode is fixed per process and
# `_INTERPRET` records it. Tests that need the interpreter run in a subprocess.
# ---------------------------------------------------------------------------
if triton is not None:  # the decorators and tl.constexpr annotations need triton

    @triton.jit
    def _router_softmax_kernel(
        x_ptr, y_ptr, T, E,
        s_xt, s_xe, s_yt, s_ye,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        # int64 offsets: T * stride can pass 2**31 on prefill-sized inputs.
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        tmask = t < T
        emask = e < E
        mask = tmask[:, None] & emask[None, :]
        x = tl.load(x_ptr + t[:, None] * s_xt + e[None, :] * s_xe, mask=mask, other=0.0).to(tl.float32)
        # Padding experts are -inf (weight 0); padding tokens stay finite (no NaN noise).
        x = tl.where(emask[None, :], x, float("-inf"))
        m = tl.max(x, axis=1)
        p = tl.exp(x - m[:, None])  # all -inf row: exp(nan) -> NaN row, by design
        y = p / tl.sum(p, axis=1)[:, None]
        tl.store(y_ptr + t[:, None] * s_yt + e[None, :] * s_ye, y.to(y_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _mole_combine_kernel(
        logits_ptr, rows_ptr, res_ptr, sh_ptr, out_ptr, ids_ptr, faults_ptr,
        E, D, V,
        s_lt, s_le,
        s_rt, s_re, s_rd,
        s_rest, s_resd,
        s_sht, s_shd,
        s_ot, s_od,
        HAS_RES: tl.constexpr, HAS_SH: tl.constexpr, GATHER: tl.constexpr, COUNT_FAULTS: tl.constexpr,
        BLOCK_E: tl.constexpr, E_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program = one token x one BLOCK_D slice of the hidden dim.
        t = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = d < D
        if GATHER:
            # rows is a table [V, E, D] (one layer's slice of [V, L, E, D], VRAM or the device alias
            # of pinned host memory) read at row ids[t]: each table byte is read once, in place.
            # An id outside [0, V) reads nothing and is counted once (by the token's first program).
            tok = tl.load(ids_ptr + t).to(tl.int64)
            ok = (tok >= 0) & (tok < V)
            if COUNT_FAULTS:
                tl.atomic_add(faults_ptr, 1, mask=(~ok) & (tl.program_id(1) == 0))
            dmask_rows = dmask & ok
            tok = tl.where(ok, tok, 0)
        else:
            tok = t
            dmask_rows = dmask

        # Softmax statistics of this token's E logits, recomputed by every D-slice
        # (E values from L1/L2) so the probabilities never go to memory.
        e_all = tl.arange(0, BLOCK_E)
        x = tl.load(logits_ptr + t * s_lt + e_all * s_le, mask=e_all < E, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        inv_s = 1.0 / tl.sum(tl.exp(x - m), axis=0)  # all -inf row: NaN, propagates to the output

        # Stream rows[t, :, d] in [E_CHUNK, BLOCK_D] tiles: each row byte is read once.
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        row_base = rows_ptr + tok * s_rt
        for e0 in range(0, E, E_CHUNK):
            ec = e0 + tl.arange(0, E_CHUNK)
            emask = ec < E
            xc = tl.load(logits_ptr + t * s_lt + ec * s_le, mask=emask, other=float("-inf")).to(tl.float32)
            w = tl.exp(xc - m) * inv_s  # -inf logit -> weight exactly 0
            r = tl.load(
                row_base + ec[:, None].to(tl.int64) * s_re + d[None, :] * s_rd,
                mask=emask[:, None] & dmask_rows[None, :], other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w[:, None] * r, axis=0)

        if HAS_RES:
            acc += tl.load(res_ptr + t * s_rest + d * s_resd, mask=dmask, other=0.0).to(tl.float32)
        if HAS_SH:
            acc += tl.load(sh_ptr + t * s_sht + d * s_shd, mask=dmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * s_ot + d * s_od, acc.to(out_ptr.dtype.element_ty), mask=dmask)


# ---------------------------------------------------------------------------
# Block sizes: a pure function of the shape (no autotuning), so a CUDA-graph
# replay or a recompile never retunes and a launch costs no benchmarking.
# Decode (T <= 64) splits D finely to put work on many SMs; prefill uses wide
# tiles. Not yet tuned on a GPU: the numbers are first principles (16-byte
# vectors, ~4K-element tiles in flight per program).
# ---------------------------------------------------------------------------
_DECODE_T = 64
_DECODE_MIN_PROGRAMS = 256  # ~2 per SM on an H100/H200


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: that is a JIT callable, whose host-side call costs more than this whole launcher.
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=1024)  # a pure function of the shape, asked once per launch
def _combine_config(T: int, E: int, D: int) -> dict:
    block_e = _next_pow2(E)
    block_d = min(_next_pow2(D), 1024)
    if T <= _DECODE_T:
        while block_d > 128 and T * _cdiv(D, block_d) < _DECODE_MIN_PROGRAMS:
            block_d //= 2
    e_chunk = min(block_e, max(1, 4096 // block_d))
    num_warps = 8 if e_chunk * block_d >= 4096 else 4
    return dict(BLOCK_E=block_e, E_CHUNK=e_chunk, BLOCK_D=block_d, num_warps=num_warps)


@functools.lru_cache(maxsize=1024)
def _softmax_config(T: int, E: int) -> dict:
    block_e = _next_pow2(E)
    block_t = max(1, min(_next_pow2(max(T, 1)), 4096 // block_e))
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4 if block_t * block_e <= 2048 else 8)


# A launch's grid and its constexprs/options as (name, value) pairs (see _launch), asked once per launch.
@functools.lru_cache(maxsize=1024)
def _combine_launch(T: int, E: int, D: int, has_res: bool, has_sh: bool, gather: bool, count_faults: bool):
    cfg = _combine_config(T, E, D)
    meta = dict(HAS_RES=has_res, HAS_SH=has_sh, GATHER=gather, COUNT_FAULTS=count_faults, **cfg)
    return (T, _cdiv(D, cfg["BLOCK_D"])), tuple(meta.items())


@functools.lru_cache(maxsize=1024)
def _softmax_launch(T: int, E: int):
    cfg = _softmax_config(T, E)
    return (_cdiv(T, cfg["BLOCK_T"]),), tuple(cfg.items())


# ---------------------------------------------------------------------------
# Launchers: inputs already validated and flattened to 2-D/3-D.
# ---------------------------------------------------------------------------
def _traced(t: torch.Tensor) -> bool:
    """Whether something traces this launch and must see it as a graph node: torch.compile (dynamo),
    make_fx / export or another dispatch mode, fake or functional tensors."""
    return (type(t) is not torch.Tensor or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0)


_WRAP = getattr(torch.library, "wrap_triton", None)  # torch >= 2.6


def _launch(kernel, grid, like: torch.Tensor, pointers: tuple, scalars: tuple, meta: tuple) -> None:
    """``kernel[grid](*pointers, *scalars, **dict(meta))`` on ``like``'s device and its current stream.

    ``pointers``: the kernel's leading tensor arguments; ``scalars``: the integers after them; ``meta``:
    its constexprs and launch options as ``(name, value)`` pairs (hashable: part of the launch key).

    Eager calls on plain tensors launch through :class:`_Launches` (Triton's launch minus its per-call
    binding). ``torch.library.wrap_triton`` is not free in eager (torch >= 2.6): each call goes through a
    higher-order-op dispatch (~20x a raw launch on the host, issue 23) and leaves a kernel side-table
    entry that is never freed, so it is used only where something traces the launch (:func:`_traced`);
    torch's own ``triton_op`` turns it off in eager for the same reason. Triton launches on the
    *current* device: a tensor on another GPU gets a device guard (else the kernel reads another
    device's addresses, off the caller's stream).
    """
    traced = _traced(like)
    if traced or _INTERPRET:
        run = (_WRAP(kernel) if traced and _WRAP is not None else kernel)[grid]
        dev = like.device
        if dev.type == "cuda" and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                run(*pointers, *scalars, **dict(meta))
        else:
            run(*pointers, *scalars, **dict(meta))
        return
    device = _TRITON_DRIVER.active.get_current_device()  # torch.cuda.current_device() on a GPU
    if like.get_device() != device:
        with torch.cuda.device(like.device):
            kernel[grid](*pointers, *scalars, **dict(meta))
        return
    _LAUNCHES[kernel](device, grid, pointers, scalars, meta)


# The per-call work of Triton's launch that _Launches repeats, as JITFunction.run reads (whitespace
# collapsed). Where an installed Triton's run reads otherwise, every launch goes through it.
_TRITON_RUN_LINES = (
    'kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug',
    'kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode',
    "bound_args, specialization, options = binder(*args, **kwargs)",
    "launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())",
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
    "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())",
)


@functools.lru_cache(maxsize=None)
def _triton_run_mirrored() -> bool:
    """Whether the installed Triton's ``JITFunction.run`` launches as :class:`_Launches` repeats it:
    the lines above, and no option set per call beyond the two it tracks (read once, from its source)."""
    import inspect
    import re

    try:
        from triton import knobs  # noqa: F401  (triton >= 3.4: the knobs the fast path reads)
        from triton.runtime.jit import JITFunction
        src = " ".join(inspect.getsource(JITFunction.run).split())
    except (ImportError, OSError, TypeError):
        return False
    per_call_options = set(re.findall(r'kwargs\["(\w+)"\] =', src))
    return per_call_options <= {"debug", "instrumentation_mode"} and all(s in src for s in _TRITON_RUN_LINES)


def _plain_triton_state() -> bool:
    """No Triton setting that changes its cache key or runs Python per launch (debug, instrumentation,
    a stage-inspection hook): the state a remembered launch assumes."""
    knobs = triton.knobs
    return (not knobs.runtime.debug and not knobs.compilation.instrumentation_mode
            and knobs.runtime.add_stages_inspection_hook is None)


class _Launches:
    """One Triton kernel's eager launches at the cost of the launch itself, once a specialization has run.

    ``JITFunction.run`` redoes per call what a specialization fixes: it binds the arguments, specialises
    each (a pointer's dtype and 16-byte alignment, an integer's width and whether it is 1 or a multiple
    of 16), formats the options into its cache key and looks the compiled kernel up; that is most of a
    raw launch's host time (bench/host_overhead.py). Here a key's first launch goes through Triton, and
    later ones call the ``CompiledKernel`` it returned, with the arguments ``JITFunction.run`` passes.

    The key is finer than Triton's, so one key never stands for two of Triton's compiled kernels: the
    device, each pointer's dtype and address mod 16, each integer's value, every constexpr and option.
    A remembered launch is taken only while Triton's own cache still holds that kernel under Triton's key
    (a cleared or replaced cache falls back), with no pre-run hook and in :func:`_plain_triton_state`;
    it is remembered only for a kernel that reads no global values (Triton re-checks those per launch),
    where Triton's own binding of the call gives the same arguments, and where Triton's ``run`` reads as
    :func:`_triton_run_mirrored` expects. Anything else launches through Triton.
    """

    _MAX_KEYS = 256  # a model needs a handful; past this, start over (never grows without bound)

    __slots__ = ("kernel", "known")

    def __init__(self, kernel):
        self.kernel, self.known = kernel, {}

    def __call__(self, device: int, grid: tuple, pointers: tuple, scalars: tuple, meta: tuple) -> None:
        kernel = self.kernel
        key = (device, tuple([p.dtype for p in pointers]), tuple([p.data_ptr() & 15 for p in pointers]), scalars,
               meta)
        hit = self.known.get(key)
        if hit is not None:
            compiled, caches, triton_key, constants = hit
            if (kernel.device_caches.get(device) is caches and caches[0].get(triton_key) is compiled
                    and not kernel.pre_run_hooks and _plain_triton_state()):
                args = (*pointers, *scalars, *constants)
                stream = _TRITON_DRIVER.active.get_current_stream(device)
                enter, exit_ = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
                if getattr(enter, "calls", True) or getattr(exit_, "calls", True):  # hooks to call: as Triton does
                    metadata = compiled.launch_metadata(grid, stream, *args)
                else:  # empty hook chains: nothing would read the metadata, and the launcher calls no hook
                    metadata = enter = exit_ = None
                compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                             compiled.function, compiled.packed_metadata, metadata, enter, exit_, *args)
                return
        options = dict(meta)
        compiled = kernel[grid](*pointers, *scalars, **options)
        if compiled is not None and _triton_run_mirrored() and not kernel.pre_run_hooks and _plain_triton_state():
            self._remember(key, device, compiled, pointers + scalars, options)

    def _remember(self, key, device, compiled, args: tuple, options: dict) -> None:
        kernel = self.kernel
        caches = kernel.device_caches.get(device)  # (kernel cache, key cache, target, backend, binder)
        if caches is None or kernel.used_global_vals:
            return
        triton_key = next((k for k, v in caches[0].items() if v is compiled), None)
        bound = tuple(caches[4](*args, **options)[0].values())  # what JITFunction.run passes to the kernel
        if triton_key is None or len(bound) < len(args) or any(a is not b for a, b in zip(bound, args)):
            return
        if len(self.known) >= self._MAX_KEYS:
            self.known.clear()
        self.known[key] = (compiled, caches, triton_key, bound[len(args):])  # the constexprs: fixed by the key


def _router_softmax_triton(x2: torch.Tensor, y2: torch.Tensor) -> None:
    T, E = x2.shape
    if T == 0:
        return
    grid, meta = _softmax_launch(T, E)
    _launch(_router_softmax_kernel, grid, y2, (x2, y2), (T, E, *x2.stride(), *y2.stride()), meta)


def _token_rows(t: torch.Tensor, X: int):
    """[*, X] ``t`` as the kernels read it, T rows of X: ``(tensor, row stride, element stride)``. A
    contiguous ``t`` is read as is (a view costs host time per layer call, as much as a third of the
    launch's); any other is viewed as [T, X] (``reshape``: a copy where no view exists, so an ``out``
    must come contiguous or as a [T, X] view, as every caller's does)."""
    if t.is_contiguous():
        return t, X, 1
    t = t.reshape(-1, X)
    return (t, *t.stride())


def _mole_combine_triton(logits, rows3, res, sh, out, ids=None, faults=None) -> None:
    """out = res + sh + sum_e softmax(logits)_e * rows, token by token: logits [*, E] and res/sh/out [*, D]
    (res/sh may be None) hold T token rows each; rows3 is [T, E, D], or with ``ids`` (T ids, any shape)
    a table [V, E, D] read at row ids[t] (an id outside [0, V) reads zeros; counted into ``faults``)."""
    V, E, D = rows3.shape
    T = V if ids is None else ids.numel()
    if T == 0 or D == 0:
        return
    grid, meta = _combine_launch(T, E, D, res is not None, sh is not None, ids is not None, faults is not None)
    logits, s_lt, s_le = _token_rows(logits, E)
    out, s_ot, s_od = _token_rows(out, D)
    # Absent operands: a valid pointer (never read: HAS_*, GATHER, COUNT_FAULTS are constexprs).
    res, s_rest, s_resd = (out, s_ot, s_od) if res is None else _token_rows(res, D)
    sh, s_sht, s_shd = (out, s_ot, s_od) if sh is None else _token_rows(sh, D)
    if ids is None:
        ids = out
    elif ids.dim() != 1 or not ids.is_contiguous():  # the kernel reads ids[t] at ids_ptr + t
        ids = ids.reshape(-1).contiguous()
    _launch(_mole_combine_kernel, grid, out,
            (logits, rows3, res, sh, out, ids, faults if faults is not None else out),
            (E, D, V, s_lt, s_le, *rows3.stride(), s_rest, s_resd, s_sht, s_shd, s_ot, s_od), meta)


if triton is not None:
    _TRITON_DRIVER = triton.runtime.driver  # its `active` driver is looked up per launch (tests swap it)
    _LAUNCHES = {k: _Launches(k) for k in (_router_softmax_kernel, _mole_combine_kernel)}


# ---------------------------------------------------------------------------
# Plain-torch fallback (what runs on CPU). Same semantics as the kernels.
# ---------------------------------------------------------------------------
def _router_softmax_torch(x2: torch.Tensor, y2: torch.Tensor) -> None:
    # torch.softmax subtracts the max, gives -inf weight 0 and an all -inf row NaN.
    y2.copy_(torch.softmax(x2, dim=-1, dtype=torch.float32))


# Half rows are widened to float32 this many elements at a time (1 MB: stays in
# cache), never as a whole [T, E, D] float32 copy; then one batched GEMV per chunk.
_FALLBACK_CHUNK = 1 << 18


def _mole_combine_torch(logits2, rows3, res2, sh2, out2) -> None:
    T, E, D = rows3.shape
    w = torch.softmax(logits2, dim=-1, dtype=torch.float32).unsqueeze(1)  # [T, 1, E]
    # Accumulate straight into a float32 `out`, else into a fresh buffer (never
    # `residual.float()`, which aliases a float32 residual). `out` may be `residual`:
    # copy_ onto itself is a no-op, and each element is read before it is written.
    acc = out2 if out2.dtype == torch.float32 else torch.empty((T, D), dtype=torch.float32, device=out2.device)
    if res2 is not None:
        acc.copy_(res2)
        if sh2 is not None:
            acc.add_(sh2)
    elif sh2 is not None:
        acc.copy_(sh2)
    else:
        acc.zero_()
    acc3 = acc.unsqueeze(1)  # [T, 1, D]
    if rows3.dtype == torch.float32:
        acc3.baddbmm_(w, rows3)  # fp32 throughout, rows read in place
    else:
        step = max(1, _FALLBACK_CHUNK // max(1, E * D))
        for t0 in range(0, T, step):
            acc3[t0 : t0 + step].baddbmm_(w[t0 : t0 + step], rows3[t0 : t0 + step].float())
    if acc is not out2:
        out2.copy_(acc)


# ---------------------------------------------------------------------------
# The one place that picks the backend.
# ---------------------------------------------------------------------------
def _interpreter_active() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Fixed at import, like the kernels themselves (see above).
_INTERPRET = triton is not None and _interpreter_active()


def _backend(t: torch.Tensor) -> str:
    """'triton' (CUDA), 'interpret' (CPU under TRITON_INTERPRET=1) or 'torch'."""
    if triton is None:
        return "torch"
    if t.device.type == "cuda":
        return "triton"
    # The interpreter runs on real CPU memory only: fake/functional tensors
    # (torch.compile tracing) take the torch path, which traces into aten ops.
    if t.device.type == "cpu" and type(t) is torch.Tensor and _INTERPRET:
        return "interpret"
    return "torch"


# ---------------------------------------------------------------------------
# Input checks (shared by the public functions and the ops) and flattening.
# ---------------------------------------------------------------------------
def _fail(fn: str, msg: str):
    raise ValueError(f"{fn}: {msg}")


def _check_logits(fn: str, logits) -> int:
    if not isinstance(logits, torch.Tensor):
        _fail(fn, f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() < 1:
        _fail(fn, "logits must be [*, E] (at least 1-D), got a 0-d tensor")
    if logits.dtype not in _LOGIT_DTYPES:
        _fail(fn, f"logits must be float32/float16/bfloat16/float64, got {logits.dtype}")
    E = logits.shape[-1]
    if not 1 <= E <= MAX_EXPERTS:
        _fail(fn, f"logits' last dim (E experts) must be in [1, {MAX_EXPERTS}], got {E}")
    return E


def _check_softmax(logits, out_dtype):
    _check_logits("router_softmax", logits)
    if out_dtype not in _FLOATS:
        _fail("router_softmax", f"out_dtype must be float32/float16/bfloat16, got {out_dtype}")


def _extent(t: torch.Tensor):
    """The byte range ``[lo, hi)`` a tensor's elements span."""
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride
        if reach < 0:
            lo += reach
        else:
            hi += reach
    base, item = t.data_ptr(), t.element_size()
    return base + lo * item, base + (hi + 1) * item


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory (conservative: interleaved views count as overlapping)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded, stride-0 view; conservative)."""
    reach = 0  # the furthest offset the smaller-stride dims span
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _check_out_memory(fn: str, out, inputs) -> None:
    """``out`` may be exactly ``residual`` (the in-place update) but share no other memory."""
    if _has_internal_overlap(out):
        _fail(fn, f"out has overlapping elements (strides {out.stride()}, e.g. an expanded view); "
                  "pass a tensor with one element per position")
    for name, t in inputs:
        if t is None or not _may_overlap(out, t):
            continue
        same = (name == "residual" and t.data_ptr() == out.data_ptr() and t.dtype == out.dtype
                and t.stride() == out.stride())
        if not same:
            _fail(fn, f"out shares memory with {name}" + (" (it may be residual itself, but not a part or "
                  "another view of it)" if name == "residual" else "") + "; pass a separate tensor")


def _check_combine(logits, rows, residual, shared, out):
    fn = "mole_combine"
    E = _check_logits(fn, logits)
    lead = tuple(logits.shape[:-1])
    if not isinstance(rows, torch.Tensor) or rows.dim() != logits.dim() + 1:
        _fail(fn, f"rows must be [*, E, D] with * = logits' leading dims {lead}, got "
                  f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__}")
    D = rows.shape[-1]
    if tuple(rows.shape[:-1]) != lead + (E,):
        _fail(fn, f"rows must have shape {lead + (E,)} + (D,) to match logits {tuple(logits.shape)}, "
                  f"got {tuple(rows.shape)}")
    if rows.dtype not in _FLOATS:
        _fail(fn, f"rows must be float32/float16/bfloat16, got {rows.dtype}")
    if rows.device != logits.device:
        _fail(fn, f"rows is on {rows.device} but logits is on {logits.device}: all operands must share a device")
    for name, t in (("residual", residual), ("shared", shared), ("out", out)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            _fail(fn, f"{name} must be a tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != lead + (D,):
            _fail(fn, f"{name} must have shape {lead + (D,)} (logits' leading dims + rows' D), got {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            _fail(fn, f"{name} must be float32/float16/bfloat16, got {t.dtype}")
        if t.device != logits.device:
            _fail(fn, f"{name} is on {t.device} but logits is on {logits.device}: all operands must share a device")
    # Addresses exist only for real tensors: traced (fake) and meta calls are checked when they run.
    if out is not None and not torch.compiler.is_compiling() and type(out) is torch.Tensor and out.device.type != "meta":
        _check_out_memory(fn, out, (("logits", logits), ("rows", rows), ("shared", shared), ("residual", residual)))
    return E, D


def _flat_rows(rows: torch.Tensor, E: int, D: int) -> torch.Tensor:
    if rows.dim() == 3:
        return rows  # the common [T, E, D] (possibly strided) case: used as is
    try:
        return rows.view(-1, E, D)
    except RuntimeError:
        _fail("mole_combine", "rows' leading dims cannot be flattened without a copy "
                              f"(strides {rows.stride()}); pass a [T, E, D] view instead")


def _flat_out(out: torch.Tensor, D: int) -> torch.Tensor:
    try:
        return out.view(-1, D)
    except RuntimeError:
        _fail("mole_combine", f"out's leading dims cannot be flattened in place (strides {out.stride()})")


def _combine_impl(logits, rows, residual, shared, out) -> None:
    if out.numel() == 0:  # no tokens or D = 0: nothing to write (and -1 cannot be inferred below)
        return
    E, D = rows.shape[-2], rows.shape[-1]
    if rows.dim() == 3:  # [T, ...]: the common case, nothing to flatten (cheap at decode)
        logits2, rows3, res2, sh2, out2 = logits, rows, residual, shared, out
    else:
        logits2 = logits.reshape(-1, E)  # [T, E]: tiny, a copy here is harmless
        rows3 = _flat_rows(rows, E, D)
        res2 = None if residual is None else residual.reshape(-1, D)
        sh2 = None if shared is None else shared.reshape(-1, D)
        out2 = _flat_out(out, D)
    backend = _backend(rows)
    if backend == "torch":
        _mole_combine_torch(logits2, rows3, res2, sh2, out2)
    else:
        _mole_combine_triton(logits2, rows3, res2, sh2, out2)


def _softmax_impl(logits, out) -> None:
    E = logits.shape[-1]
    x2 = logits.reshape(-1, E)
    y2 = out.view(-1, E)
    backend = _backend(logits)
    if backend == "torch":
        _router_softmax_torch(x2, y2)
    else:
        _router_softmax_triton(x2, y2)


def _direct_call_ok(*tensors) -> bool:
    """True when the op dispatcher would add nothing: eager, plain tensors, no grad,
    no dispatch mode or functorch transform. Then the public functions call the
    implementation directly, saving ~8 us of Python per call (decode is
    latency-bound); anything else (torch.compile, fake/functional tensors,
    TorchDispatchModes, vmap, autograd) goes through torch.ops.mole_kernels.*."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or (type(t) is torch.Tensor and not t.requires_grad) for t in tensors)


def _combine_dtype(rows, residual):
    return residual.dtype if residual is not None else rows.dtype


def _new_combine_out(rows, residual):
    return torch.empty((*rows.shape[:-2], rows.shape[-1]), dtype=_combine_dtype(rows, residual), device=rows.device)


# ---------------------------------------------------------------------------
# Torch ops: torch.ops.mole_kernels.{router_softmax, mole_combine, mole_combine_out}.
# triton_op (torch >= 2.6 with triton) lets torch.compile see the kernels;
# otherwise custom_op keeps them opaque. Both get the explicit fakes below.
# ---------------------------------------------------------------------------
_define = (torch.library.triton_op if triton is not None and hasattr(torch.library, "triton_op")
           else torch.library.custom_op)


@_define("mole_kernels::router_softmax", mutates_args=())
def _router_softmax_op(logits: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    _check_softmax(logits, out_dtype)  # the ops are public too: never launch on bad input
    out = torch.empty(logits.shape, dtype=out_dtype, device=logits.device)
    _softmax_impl(logits, out)
    return out


@_define("mole_kernels::mole_combine", mutates_args=())
def _mole_combine_op(
    logits: torch.Tensor, rows: torch.Tensor, residual: Optional[torch.Tensor], shared: Optional[torch.Tensor]
) -> torch.Tensor:
    _check_combine(logits, rows, residual, shared, None)
    out = _new_combine_out(rows, residual)
    _combine_impl(logits, rows, residual, shared, out)
    return out


@_define("mole_kernels::mole_combine_out", mutates_args=("out",))
def _mole_combine_out_op(
    logits: torch.Tensor, rows: torch.Tensor, residual: Optional[torch.Tensor], shared: Optional[torch.Tensor],
    out: torch.Tensor,
) -> None:
    _check_combine(logits, rows, residual, shared, out)
    _combine_impl(logits, rows, residual, shared, out)


@_router_softmax_op.register_fake
def _router_softmax_fake(logits, out_dtype):
    torch._check(logits.dim() >= 1, lambda: "router_softmax: logits must be [*, E]")
    return logits.new_empty(logits.shape, dtype=out_dtype)


def _combine_fake_checks(logits, rows, residual, shared, out=None):
    E, D = rows.shape[-2], rows.shape[-1]
    torch._check(rows.dim() == logits.dim() + 1, lambda: "mole_combine: rows must be [*, E, D]")
    torch._check(logits.shape[-1] == E, lambda: "mole_combine: logits' E must match rows'")
    for t in (residual, shared, out):
        if t is not None:
            torch._check(t.shape[-1] == D, lambda: "mole_combine: residual/shared/out must be [*, D]")


@_mole_combine_op.register_fake
def _mole_combine_fake(logits, rows, residual, shared):
    _combine_fake_checks(logits, rows, residual, shared)
    return rows.new_empty(rows.shape[:-2] + rows.shape[-1:], dtype=_combine_dtype(rows, residual))


@_mole_combine_out_op.register_fake
def _mole_combine_out_fake(logits, rows, residual, shared, out):
    _combine_fake_checks(logits, rows, residual, shared, out)


# ---------------------------------------------------------------------------
# lut_combine on CUDA (the schemas, checks and CPU kernels are C++: csrc/lut_combine.cpp).
# Float tables: the Triton kernel above in its GATHER form, reading the table in VRAM or, for a
# pinned host table, through its device alias (zero-copy: each byte crosses PCIe once). Quantized
# tables (and float ones without Triton): softmax, then the CUDA fused gather accumulating onto
# residual + shared in a float32 buffer (so the result is rounded once, as on the CPU).
# ---------------------------------------------------------------------------
def _cuda_combine_checks(op, table_shape, ids, logits, layer, residual, shared, out):
    """Shapes, dtypes and devices, as the C++ CPU implementation checks them. Returns (E, D, layer)."""
    if ids.dtype not in (torch.int32, torch.int64):
        _fail(op, f"ids must be int32 or int64, got {ids.dtype}")
    E, D = table_shape[-2], table_shape[-1]
    L = table_shape[1] if len(table_shape) == 4 else 1
    if layer is None:
        if L > 1:
            _fail(op, f"the table has {L} layers, so `layer` must say which layer to combine")
        layer = 0
    elif not 0 <= layer < L:
        _fail(op, f"layer must be in [0, {L}) for a table with {L} layers, got {layer}")
    lead = tuple(ids.shape)
    if tuple(logits.shape) != lead + (E,) or logits.dtype not in _FLOATS or logits.device != ids.device:
        _fail(op, f"logits must be a float32/float16/bfloat16 tensor of shape ids.shape + [E] = {lead + (E,)} on "
                  f"{ids.device}, got {logits.dtype} {tuple(logits.shape)} on {logits.device}")
    for name, t in (("residual", residual), ("shared", shared), ("out", out)):
        if t is not None and (tuple(t.shape) != lead + (D,) or t.dtype not in _FLOATS or t.device != ids.device):
            _fail(op, f"{name} must be a float32/float16/bfloat16 tensor of shape ids.shape + [D] = {lead + (D,)} "
                      f"on {ids.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if out is not None and not out.is_contiguous():
        _fail(op, "out must be contiguous")
    return E, D, layer


def _float32_addends(residual, shared, like):
    """residual + shared in float32 ([*, D] zeros when neither is given): the start of a fused sum."""
    if residual is None:
        acc = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    else:
        acc = residual.to(torch.float32, copy=True)
    if shared is not None:
        acc += shared
    return acc


def _combine_by_gather(gather, ids, logits, residual, shared, out, faults):
    """out = residual + shared + gather(weights=softmax(logits)): the unfused CUDA form."""
    acc = _float32_addends(residual, shared, out)
    gather(torch.softmax(logits, dim=-1, dtype=torch.float32), acc, faults)
    out.copy_(acc)


def _lut_combine_out_cuda(out, lut, ids, logits, layer=None, residual=None, shared=None, faults=None):
    if lut.dtype not in _FLOATS or lut.dim() not in (3, 4) or not lut.is_contiguous():
        _fail("lut_combine", f"lut must be a contiguous float32/float16/bfloat16 [V, L, E, D] or [V, E, D] table, got "
                             f"{lut.dtype} {tuple(lut.shape)}")
    E, D, layer = _cuda_combine_checks("lut_combine", lut.shape, ids, logits, layer, residual, shared, out)
    table = ops.device_view(lut, ids.device)  # VRAM as is; pinned host memory through its device alias
    if faults is None:
        raise_on_bad_ids(ids, lut.shape[0], "lut_combine")
    if triton is None:
        def gather(w, acc, f):
            ops.lut_gather_out(acc, table, ids, w, layer, True, f)
        return _combine_by_gather(gather, ids, logits, residual, shared, out, faults)
    rows = table[:, layer] if table.dim() == 4 else table  # [V, E, D], token stride L*E*D
    _mole_combine_triton(logits, rows, residual, shared, out, ids=ids, faults=faults)


def _lut_combine_step_cuda(layers, ids: torch.Tensor, faults: torch.Tensor):
    """The layer call of an eager GPU step whose rows are read in place from a float table:
    ``combine(l, x, residual, shared, router_weight=None)`` = ``lut_combine(table, ids, logits, layer=l,
    residual=, shared=, faults=)`` with the logits ``x`` or ``linear(x, router_weight)``.

    ``layers``: the table's ``[V, E, D]`` view of each layer on ids' device (VRAM, or a pinned table's
    device alias), made once per table by its reader, so a layer call costs no ``device_view`` (a probe
    allocation, a ``cudaPointerGetAttributes``, a ``from_blob``), no dispatcher and no per-step
    slicing: only the checks a model's own tensors can fail, the launch, and its output. Ids out of
    range read zeros and count into ``faults`` (no synchronisation). Callers make sure the step is
    eager on plain tensors (a traced step takes the op, which torch.compile can see).
    """
    flat = ids.reshape(-1).contiguous()  # once per step (the kernel reads ids[t] at ids_ptr + t)
    T, L = flat.numel(), len(layers)
    V, E, D = layers[0].shape if L else (0, 0, 0)
    lead = tuple(ids.shape)

    def combine(l: int, x: torch.Tensor, residual: torch.Tensor, shared: torch.Tensor,
                router_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not 0 <= l < L:
            _fail("lut_combine", f"layer must be in [0, {L}), got {l!r}")
        logits = x if router_weight is None else F.linear(x, router_weight)
        if logits.numel() != T * E or residual.shape != shared.shape or residual.numel() != T * D:
            _fail("lut_combine", f"a step of ids {lead} needs logits {lead + (E,)} and residual/shared {lead + (D,)}, "
                                 f"got {tuple(logits.shape)}, {tuple(residual.shape)}, {tuple(shared.shape)}")
        out = torch.empty_like(residual, memory_format=torch.contiguous_format)
        _mole_combine_triton(logits, layers[l], residual, shared, out, ids=flat, faults=faults)
        return out

    return combine


def _lut_combine_cuda(lut, ids, logits, layer=None, residual=None, shared=None):
    out = _new_lut_combine_out(ids, lut.shape[-1], residual, shared, lut.dtype)
    _lut_combine_out_cuda(out, lut, ids, logits, layer, residual, shared)
    return out


def _lut_combine_quant_out_cuda(out, data, format, dim, block_size, ids, logits, layer=None, residual=None,
                                shared=None, faults=None):
    E, D, layer = _cuda_combine_checks("lut_combine_quant", (*data.shape[:-1], dim), ids, logits, layer, residual,
                                       shared, out)
    if faults is None:
        raise_on_bad_ids(ids, data.shape[0], "lut_combine_quant")

    def gather(w, acc, f):
        ops.lut_gather_quant_out(acc, data, format, dim, block_size, ids, w, layer, True, f)
    _combine_by_gather(gather, ids, logits, residual, shared, out, faults)


def _lut_combine_quant_cuda(data, format, dim, block_size, ids, logits, layer=None, residual=None, shared=None,
                            dtype=None):
    out = _new_lut_combine_out(ids, dim, residual, shared, dtype or torch.float32)
    _lut_combine_quant_out_cuda(out, data, format, dim, block_size, ids, logits, layer, residual, shared)
    return out


def _new_lut_combine_out(ids, D, residual, shared, fallback):
    dtype = residual.dtype if residual is not None else shared.dtype if shared is not None else fallback
    return torch.empty((*ids.shape, D), dtype=dtype, device=ids.device)


if build_info()["cuda"]:
    _cuda_impls = torch.library.Library("mole_kernels", "IMPL")
    _cuda_impls.impl("lut_combine", _lut_combine_cuda, "CUDA")
    _cuda_impls.impl("lut_combine_out", _lut_combine_out_cuda, "CUDA")
    _cuda_impls.impl("lut_combine_quant", _lut_combine_quant_cuda, "CUDA")
    _cuda_impls.impl("lut_combine_quant_out", _lut_combine_quant_out_cuda, "CUDA")


@torch.library.register_fake("mole_kernels::lut_combine")
def _lut_combine_fake(lut, ids, logits, layer=None, residual=None, shared=None):
    check_fake_devices("lut_combine", lut, ids, logits=logits, residual=residual, shared=shared)
    return _new_lut_combine_out(ids, lut.shape[-1], residual, shared, lut.dtype)


@torch.library.register_fake("mole_kernels::lut_combine_out")
def _lut_combine_out_fake(out, lut, ids, logits, layer=None, residual=None, shared=None, faults=None):
    check_fake_devices("lut_combine", lut, ids, logits=logits, residual=residual, shared=shared, out=out, faults=faults)
    return None


@torch.library.register_fake("mole_kernels::lut_combine_quant")
def _lut_combine_quant_fake(data, format, dim, block_size, ids, logits, layer=None, residual=None, shared=None,
                            dtype=None):
    check_fake_devices("lut_combine_quant", data, ids, logits=logits, residual=residual, shared=shared)
    return _new_lut_combine_out(ids, dim, residual, shared, dtype or torch.float32)


@torch.library.register_fake("mole_kernels::lut_combine_quant_out")
def _lut_combine_quant_out_fake(out, data, format, dim, block_size, ids, logits, layer=None, residual=None,
                                shared=None, faults=None):
    check_fake_devices("lut_combine_quant", data, ids, logits=logits, residual=residual, shared=shared, out=out,
                       faults=faults)
    return None


# ---------------------------------------------------------------------------
# lut_combine inside compiled code (CPU). Inductor's generated wrapper calls a custom op through the
# dispatcher, ~25 us a call inside a decode step whose other work has evicted that call path (MoLE
# was 1.3x compiled dense at the demo shape). Decomposed into indexing, softmax and a sum over the
# experts, a layer's lookup becomes part of inductor's own generated loops instead: no call, the
# softmax, the rows and both adds in one fused pass. Only the usual case is decomposed (anything
# else keeps the op, whose checks name what is wrong). Registered on first use, not at import
# (importing torch._inductor takes seconds): generate(compile_step=True) does it, and a caller that
# compiles a model itself calls enable_inductor_decomposition() first.
# Inductor copies its decomposition table once per process, at the first compile (functools.cache on
# fast_random_decomps): a registration after any compile would silently not apply (the op stayed a
# dispatcher call, 3 more torch.ops lines per layer in the code) unless that copy is dropped.
# ---------------------------------------------------------------------------
_inductor_decomposition = False


def enable_inductor_decomposition() -> None:
    """Lets torch.compile (inductor) generate ``lut_combine``'s CPU code itself, fused with its
    neighbours, rather than call the op (idempotent; applies to every compile after the call, also
    when something was compiled before it). Code that inductor's on-disk AOTAutograd cache holds for the
    same graph compiled *without* it is still replayed (that cache keys on dynamo's graph, not on the
    decompositions); ``TORCHINDUCTOR_AUTOGRAD_CACHE=0`` rules that out."""
    global _inductor_decomposition
    if not _inductor_decomposition:
        from torch._inductor import decomposition

        decomposition.register_decomposition(torch.ops.mole_kernels.lut_combine.default)(_lut_combine_decomposed)
        decomposition.register_decomposition(torch.ops.mole_kernels.lut_combine_quant.default)(
            _lut_combine_quant_decomposed)
        decomposition.fast_random_decomps.cache_clear()  # inductor's per-process copy of the table (see above)
        _inductor_decomposition = True


def _lut_combine_decomposed(lut, ids, logits, layer=None, residual=None, shared=None):
    """``lut_combine`` in aten ops for inductor (CPU tensors, well-formed arguments; else NotImplemented:
    the op itself runs). The rows ``lut[ids, layer]`` are never materialised: inductor reads them
    inside the sum."""
    tensors = [t for t in (lut, ids, logits, residual, shared) if t is not None]
    lead, L = tuple(ids.shape), (lut.shape[1] if lut.dim() == 4 else 1)
    E, D = lut.shape[-2], lut.shape[-1]
    if (any(t.device.type != "cpu" for t in tensors) or lut.dim() not in (3, 4) or lut.dtype not in _FLOATS
            or ids.dtype not in (torch.int32, torch.int64) or logits.dtype not in _FLOATS
            or tuple(logits.shape) != lead + (E,) or (lut.dim() == 4 and (layer is None or not 0 <= layer < L))
            or (lut.dim() == 3 and layer not in (None, 0))
            or any(t is not None and (t.dtype not in _FLOATS or tuple(t.shape) != lead + (D,))
                   for t in (residual, shared))):
        return NotImplemented
    # An id outside [0, V) becomes V, which inductor's bounds check refuses (a RuntimeError); plain
    # indexing would wrap a negative id around to a real row.
    V = lut.shape[0]
    safe = torch.where((ids >= 0) & (ids < V), ids, V)
    rows = lut[safe, layer] if lut.dim() == 4 else lut[safe]
    return _combined(rows.float(), logits, residual, shared, lut.dtype)


def _combined(rows, logits, residual, shared, fallback_dtype):
    """``residual + shared + sum_e softmax(logits)_e * rows[..., e, :]`` in float32, rounded once."""
    out = (torch.softmax(logits.float(), -1).unsqueeze(-1) * rows).sum(-2)
    for t in (residual, shared):
        if t is not None:
            out = out + t.float()
    return out.to(next((t.dtype for t in (residual, shared) if t is not None), fallback_dtype))


def _lut_combine_quant_decomposed(data, format, dim, block_size, ids, logits, layer=None, residual=None,
                                  shared=None, dtype=None):
    """``lut_combine_quant`` in aten ops for inductor, as ``_lut_combine_decomposed`` (else NotImplemented):
    each token's codes and scales are read from the table's bytes and dequantized inside the fused sum
    (quant._dequant, the formats' one aten form). The scales are read through a view of the whole table
    and assembled from their little-endian bytes with integer ops, then reinterpreted at the same width: a
    view of the table's bytes as float32 would be a call of its own in inductor's code (a size-changing
    bitcast), and an unaligned buffer."""
    from .quant import FORMATS, _dequant, row_layout, scale_dtype

    tensors = [t for t in (data, ids, logits, residual, shared) if t is not None]
    lead = tuple(ids.shape)
    if (format not in FORMATS or not isinstance(dim, int) or not isinstance(block_size, int) or block_size <= 0
            or dim <= 0 or dim % block_size or any(t.device.type != "cpu" for t in tensors)
            or data.dtype != torch.uint8 or data.dim() not in (3, 4) or not data.is_contiguous()):
        return NotImplemented
    payload, off, row_bytes = row_layout(format, dim, block_size)
    sd, nb = scale_dtype(format), dim // block_size
    L, E = (data.shape[1] if data.dim() == 4 else 1), data.shape[-2]
    if (data.shape[-1] != row_bytes or ids.dtype not in (torch.int32, torch.int64) or logits.dtype not in _FLOATS
            or tuple(logits.shape) != lead + (E,) or (dtype is not None and dtype not in _FLOATS)
            or (data.dim() == 4 and (layer is None or not 0 <= layer < L))
            or (data.dim() == 3 and layer not in (None, 0))
            or any(t is not None and (t.dtype not in _FLOATS or tuple(t.shape) != lead + (dim,))
                   for t in (residual, shared))):
        return NotImplemented
    V = data.shape[0]
    safe = torch.where((ids >= 0) & (ids < V), ids, V)  # out of range: inductor's bounds check raises
    at = (safe, layer) if data.dim() == 4 else (safe,)
    rows = data[at]
    width = sd.itemsize  # float32 or float16 scales
    sbytes = rows[..., off:off + width * nb].unflatten(-1, (nb, width)).to(torch.int32)
    bits = sum(sbytes[..., k] << (8 * k) for k in range(width))
    scales = (bits.view(torch.float32) if width == 4 else bits.to(torch.int16).view(torch.float16)).float()
    rows = _dequant(rows[..., :payload], scales, format, dim, block_size)
    return _combined(rows, logits, residual, shared, dtype or torch.float32)


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------
def router_softmax(logits: torch.Tensor, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Softmax over the last (expert) dim, computed in float32.

    Args:
        logits: ``[*, E]``, float32/float16/bfloat16/float64, ``1 <= E <= MAX_EXPERTS``,
            any strides.
        out_dtype: dtype of the result (float32/float16/bfloat16).

    Returns ``[*, E]`` probabilities. Stable for logits of any magnitude; a ``-inf``
    logit gets probability 0; a row of all ``-inf`` (or with ``+inf``/NaN) is all
    NaN on every backend. Runs Triton on CUDA tensors (and on CPU tensors under
    ``TRITON_INTERPRET=1``), plain torch otherwise.
    """
    _check_softmax(logits, out_dtype)
    if _direct_call_ok(logits):
        out = torch.empty(logits.shape, dtype=out_dtype, device=logits.device)
        _softmax_impl(logits, out)
        return out
    return torch.ops.mole_kernels.router_softmax(logits, out_dtype)


def mole_combine(
    logits: torch.Tensor,
    rows: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    shared: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``residual + shared + sum_e softmax(logits)_e * rows[..., e, :]`` in one pass.

    Args:
        logits: ``[*, E]`` router logits, float32/float16/bfloat16/float64. The softmax
            is recomputed inside the kernel and never written out.
        rows: ``[*, E, D]`` looked-up expert rows, float32/float16/bfloat16. Any
            strides (e.g. ``buf[:, l]`` of a ``[T, L, E, D]`` prefetch buffer); a
            ``[T, E, D]`` view is never copied. With more leading dims they must be
            flattenable as a view.
        residual, shared: optional ``[*, D]`` addends (float32/float16/bfloat16).
        out: optional ``[*, D]`` destination (float32/float16/bfloat16; may be
            ``residual`` itself for an in-place update). Returned.

    All arithmetic is float32; the result is rounded once, to ``out``'s dtype, else
    ``residual``'s, else ``rows'``. ``-inf`` logits give weight 0; a token whose
    logits are all ``-inf`` gets an all-NaN output row (every backend; see the
    module docstring). Shape, dtype or device mismatches raise ``ValueError``
    naming the argument.
    """
    _check_combine(logits, rows, residual, shared, out)
    if _direct_call_ok(logits, rows, residual, shared, out):
        if out is None:
            out = _new_combine_out(rows, residual)
        _combine_impl(logits, rows, residual, shared, out)
        return out
    if out is None:
        return torch.ops.mole_kernels.mole_combine(logits, rows, residual, shared)
    torch.ops.mole_kernels.mole_combine_out(logits, rows, residual, shared, out)
    return out


def lut_combine(
    lut,
    ids: torch.Tensor,
    logits: torch.Tensor,
    *,
    layer: Optional[int] = None,
    residual: Optional[torch.Tensor] = None,
    shared: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    faults: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One MoLE layer's lookup branch in one call, reading the rows straight from the table:
    ``residual + shared + sum_e softmax(logits)_e * lut[ids, layer, e, :]``.

    Args:
        lut: ``[V, L, E, D]`` (or ``[V, E, D]``) contiguous float table, or a
            :class:`mole_kernels.QuantizedLUT`. On the CPU (C++ kernel), in VRAM, or pinned in
            host memory with ``ids`` on a GPU (read in place over PCIe: zero-copy).
        ids: int32/int64 token ids ``[*]``; the result is ``[*, D]`` on their device.
        logits: ``[*, E]`` router logits (float32/float16/bfloat16); the softmax is float32,
            max-subtracted, computed inside and never written out.
        layer: which layer's rows (required when ``L > 1``).
        residual, shared: optional ``[*, D]`` addends.
        out: optional contiguous ``[*, D]`` destination; it may be ``residual`` itself (an
            in-place update of the residual stream) but must not overlap anything else.
        faults: int64 tensor on ids' device: an id outside ``[0, V)`` then adds nothing and is
            counted into ``faults[0]`` without synchronising (CUDA-graph safe). Without it such
            an id raises ``ValueError`` naming it (on CUDA this synchronises).

    The result has ``out``'s dtype, else ``residual``'s, else ``shared``'s, else the table's
    (a quantized table's: the dtype it was quantized from); all arithmetic is float32, rounded
    once. A token whose logits are all ``-inf`` (or hold ``+inf``/NaN) gets a NaN row, as in
    :func:`mole_combine`.
    """
    if isinstance(lut, QuantizedLUT):
        prefix, op, op_out = (lut.data, lut.format, lut.dim, lut.block_size), ops.lut_combine_quant, ops.lut_combine_quant_out
        dtype = lut.dtype
    elif isinstance(lut, torch.Tensor):
        prefix, op, op_out, dtype = (lut,), ops.lut_combine, ops.lut_combine_out, lut.dtype
    else:
        raise ValueError(f"lut_combine: lut must be a tensor or a QuantizedLUT, got {type(lut).__name__}")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
        raise ValueError(f"lut_combine: layer must be an int or None, got {layer!r}")
    if out is None and faults is None:
        if isinstance(lut, QuantizedLUT):
            return op(*prefix, ids, logits, layer, residual, shared, dtype)
        return op(*prefix, ids, logits, layer, residual, shared)
    if out is None:
        D = lut.dim if isinstance(lut, QuantizedLUT) else lut.shape[-1]
        out = _new_lut_combine_out(ids, D, residual, shared, dtype)
    op_out(out, *prefix, ids, logits, layer, residual, shared, faults)
    return out
