"""Triton gathers for the compact table formats: the GPU path of the low-bit, factored and mixed tables.

Three entry points, all reading only the rows of the given ids and dequantizing in registers (on a
GPU, or on the CPU under ``TRITON_INTERPRET=1``, which is how the tests run them):

- :func:`lowbit_gather_triton`: a :class:`~mole_kernels.QuantizedLUT` of format q3/q2/q1;
- :func:`factored_gather_triton`: a :class:`~mole_kernels.factored.FactoredLUT`;
- :func:`mixed_gather_triton`: a :class:`~mole_kernels.mixed.MixedLUT` (what ``mixed_lut_gather``
  runs for CUDA tables), column normalisation folded in.

Each returns the rows ``[*, L, E, D]`` (``[*, E, D]`` for one layer, ``[*, n, E, D]`` for a slice of
layers) or the fused ``sum_e w[..., e] * row_e`` ``[*, D]`` of one layer, accumulated in float32.

Two kernels, each one program per (token, block of D columns):

- ``_codebook_kernel`` decodes rows stored as codes and block scales (q3/q2/q1, nf4, int8, fp8: a
  value is ``scale[block] * levels[code]``, its code ``BITS`` bits of the row's little-endian bit
  stream: two byte loads, a shift and a mask; int8 and fp8 through a 256-entry level table) or as
  plain floats (a float part of a mixed table).
- ``_factored_kernel`` reads the token's ``E x rank`` coefficients once (``rank * bits / 8 + 2``
  bytes per row) and multiplies them with the (layer, expert) basis ``[rank, BLOCK_D]``, in chunks of
  ranks so the tile stays in registers. Per token and layer it reads ``E * (ceil(rank * bits / 8) + 2,
  even)`` bytes of the table (f36x5, E = 4: 104 bytes, vs 1,024 for the bf16 rows: 1/10); the basis
  (``E * rank * D`` float16: 37 KB per layer at rank 36, D = 128), offset and col_scale are the same for
  every token and stay in L2.

A mixed table launches each part's kernel once over all tokens: a program reads the token's rank
(``rank[id]``, 4 bytes) and keeps only the tokens whose rank falls in its part (loads and stores
masked off for the others), so the parts are picked on the device, with no host synchronisation
and no per-value branch. Ids outside ``[0, V)`` raise a ValueError naming the id (which synchronises),
or, with ``faults=`` (int64 ``[1]`` on the table's device), read nothing, give zero rows and are
counted into ``faults[0]`` without synchronising (for graph capture).
"""
from typing import Optional

import torch

from ._ops import layer_span, raise_on_bad_ids
from .factored import FactoredLUT
from .quant import _FP8, LOWBIT, NF4_LEVELS, QuantizedLUT, row_layout, scale_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["lowbit_gather_triton", "factored_gather_triton", "mixed_gather_triton"]

_RANK_CHUNK = 16  # basis rows per [_RANK_CHUNK, BLOCK_D] tile of the factored kernel

if triton is not None:

    @triton.jit
    def _own(ids_ptr, rank_ptr, faults_ptr, t, first_d_block, V, start, n,
             MIXED: tl.constexpr, ZERO_BAD: tl.constexpr, HAS_FAULTS: tl.constexpr):
        """(row in the part, whether this launch owns the token, whether it writes it): an id outside
        [0, V) reads row 0 of nothing (owned by nobody) and is written as zeros by the ZERO_BAD launch."""
        tok = tl.load(ids_ptr + t).to(tl.int64)
        good = (tok >= 0) & (tok < V)
        bad = (tok < 0) | (tok >= V)
        tok = tl.where(good, tok, 0)
        if MIXED:
            row = tl.load(rank_ptr + tok).to(tl.int64) - start
            own = (row >= 0) & (row < n) & good
            row = tl.where(own, row, 0)
        else:
            row = tok
            own = good
        write = own
        if ZERO_BAD:
            write = own | bad
            if HAS_FAULTS:
                tl.atomic_add(faults_ptr, (bad & first_d_block).to(tl.int64))
        return row, own, write

    @triton.jit
    def _emit(x, acc, t, l, e, j, jm, sm, l0, E, D, w_ptr, off_ptr, cs_ptr, out_ptr, s_ot, s_ol, s_oe,
              NORM: tl.constexpr, FUSED: tl.constexpr):
        """One (layer, expert) row's decoded values ``x``: denormalised, then added into the fused sum
        (returned) or stored as rows."""
        if NORM:  # the part holds (lut - offset) / col_scale
            c = ((l0 + l) * E + e) * D + j
            x = tl.where(jm, x * tl.load(cs_ptr + c, mask=jm, other=0.0) + tl.load(off_ptr + c, mask=jm, other=0.0),
                         0.0)
        if FUSED:
            acc += tl.load(w_ptr + t * E + e).to(tl.float32) * x
        else:
            tl.store(out_ptr + t * s_ot + l * s_ol + e * s_oe + j, x.to(out_ptr.dtype.element_ty), mask=sm)
        return acc

    @triton.jit
    def _codebook_kernel(data_ptr, ids_ptr, rank_ptr, w_ptr, levels_ptr, off_ptr, cs_ptr, out_ptr, faults_ptr,
                         V, start, n, s_dt, s_dl, s_de, scale_off, l0, NL, E, D, s_ot, s_ol, s_oe,
                         BITS: tl.constexpr, BLOCK: tl.constexpr, SCALE_BYTES: tl.constexpr, FLOAT: tl.constexpr,
                         MIXED: tl.constexpr, ZERO_BAD: tl.constexpr, HAS_FAULTS: tl.constexpr, NORM: tl.constexpr,
                         FUSED: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        jb = tl.program_id(1)
        j = jb.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        row, own, write = _own(ids_ptr, rank_ptr, faults_ptr, t, jb == 0, V, start, n, MIXED, ZERO_BAD, HAS_FAULTS)
        jm = (j < D) & own
        sm = (j < D) & write
        bit = j * BITS
        byte = bit >> 3
        soff = scale_off + SCALE_BYTES * (j // BLOCK)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for l in range(0, NL):
            for e in range(0, E):
                base = data_ptr + row * s_dt + (l0 + l) * s_dl + e * s_de
                if FLOAT:
                    x = tl.load(base + j, mask=jm, other=0.0).to(tl.float32)
                else:
                    word = tl.load(base + byte, mask=jm, other=0).to(tl.int32)
                    if BITS == 3:  # a 3-bit code may straddle two bytes; the next byte is still in the row
                        word = word | (tl.load(base + byte + 1, mask=jm, other=0).to(tl.int32) << 8)
                    code = (word >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)
                    h = tl.load(base + soff, mask=jm, other=0).to(tl.int32) | \
                        (tl.load(base + soff + 1, mask=jm, other=0).to(tl.int32) << 8)
                    if SCALE_BYTES == 2:
                        s = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                    else:
                        h = h | (tl.load(base + soff + 2, mask=jm, other=0).to(tl.int32) << 16) | \
                            (tl.load(base + soff + 3, mask=jm, other=0).to(tl.int32) << 24)
                        s = h.to(tl.float32, bitcast=True)
                    x = s * tl.load(levels_ptr + code, mask=jm, other=0.0)
                acc = _emit(x, acc, t, l, e, j, jm, sm, l0, E, D, w_ptr, off_ptr, cs_ptr, out_ptr, s_ot, s_ol, s_oe,
                            NORM, FUSED)
        if FUSED:
            tl.store(out_ptr + t * s_ot + j, acc.to(out_ptr.dtype.element_ty), mask=sm)

    @triton.jit
    def _factored_kernel(data_ptr, basis_ptr, ids_ptr, rank_ptr, w_ptr, off_ptr, cs_ptr, out_ptr, faults_ptr,
                         V, start, n, s_dt, s_dl, s_de, R, l0, NL, E, D, s_ot, s_ol, s_oe,
                         BITS: tl.constexpr, ROW_BYTES: tl.constexpr, MIXED: tl.constexpr, ZERO_BAD: tl.constexpr,
                         HAS_FAULTS: tl.constexpr, NORM: tl.constexpr, FUSED: tl.constexpr,
                         R_BLK: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        jb = tl.program_id(1)
        j = jb.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        row, own, write = _own(ids_ptr, rank_ptr, faults_ptr, t, jb == 0, V, start, n, MIXED, ZERO_BAD, HAS_FAULTS)
        jm = (j < D) & own
        sm = (j < D) & write
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for l in range(0, NL):
            for e in range(0, E):
                base = data_ptr + row * s_dt + (l0 + l) * s_dl + e * s_de
                h = tl.load(base + ROW_BYTES - 2, mask=own, other=0).to(tl.int32) | \
                    (tl.load(base + ROW_BYTES - 1, mask=own, other=0).to(tl.int32) << 8)
                scale = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                basis = basis_ptr + ((l0 + l) * E + e) * R * D
                x = tl.zeros((BLOCK_D,), dtype=tl.float32)
                for r0 in range(0, R, R_BLK):
                    r = r0 + tl.arange(0, R_BLK).to(tl.int64)
                    rm = (r < R) & own
                    bit = r * BITS
                    word = tl.load(base + (bit >> 3), mask=rm, other=0).to(tl.int32)
                    if BITS % 2 == 1 or BITS == 6:  # the code may straddle two bytes; the next is still in the row
                        word = word | (tl.load(base + (bit >> 3) + 1, mask=rm, other=0).to(tl.int32) << 8)
                    code = ((word >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
                    coef = tl.where(rm, code.to(tl.float32) * scale, 0.0)
                    b = tl.load(basis + r[:, None] * D + j[None, :], mask=rm[:, None] & jm[None, :], other=0.0)
                    x += tl.sum(coef[:, None] * b.to(tl.float32), axis=0)
                acc = _emit(x, acc, t, l, e, j, jm, sm, l0, E, D, w_ptr, off_ptr, cs_ptr, out_ptr, s_ot, s_ol, s_oe,
                            NORM, FUSED)
        if FUSED:
            tl.store(out_ptr + t * s_ot + j, acc.to(out_ptr.dtype.element_ty), mask=sm)


def _empty(shape, dtype, device) -> torch.Tensor:
    """The result buffer (every element is written by the kernels; tests replace this to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


class _Plan:
    """What every launch of one gather shares: flat ids, the layer span, the weights and the result."""

    def __init__(self, where, data, shape, ids, weights, layer, dtype, faults, V):
        if triton is None:
            raise RuntimeError(f"{where}: Triton is not installed")
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
        if ids.device != data.device:
            raise ValueError(f"{where}: ids ({ids.device}) must be on the table's device ({data.device})")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{where}: dtype must be float32, float16 or bfloat16 (or None), got {dtype!r}")
        four = len(shape) == 4
        L, E, D = (shape[1] if four else 1), shape[-2], shape[-1]
        first, end = layer_span(layer, L, where)
        if first is not None and not four:
            raise ValueError(f"{where}: the table [V, E, D] has no layers; leave layer=None")
        if first is not None and not (end is not None or -L <= first < L):
            raise ValueError(f"{where}: layer {first} is outside the table's {L} layers")
        first = 0 if first is None else first % L
        self.l0, self.nl = first, (end - first if end is not None else (L if layer is None else 1))
        self.flat = ids.reshape(-1).contiguous()
        T = self.flat.numel()
        self.fused = weights is not None
        if self.fused:
            if four and not isinstance(layer, int) and L != 1:
                raise ValueError(f"{where}: the fused form (weights=) reads one layer: pass layer=<int> (the table "
                                 f"has {L})")
            if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (*ids.shape, E):
                raise ValueError(f"{where}: weights must have shape {[*ids.shape, E]}, got "
                                 f"{list(getattr(weights, 'shape', [type(weights).__name__]))}")
            if weights.device != data.device:
                raise ValueError(f"{where}: weights ({weights.device}) must be on the table's device ({data.device})")
            self.w = weights.reshape(T, E).float().contiguous()
            self.out = _empty((T, D), dtype, data.device)
            self.strides = (self.out.stride(0), 0, 0)
            self.shape = (*ids.shape, D)
        else:
            self.w = self.flat  # unused
            many = layer is None and four or end is not None
            self.out = _empty((T, self.nl, E, D), dtype, data.device)
            self.strides = (self.out.stride(0), self.out.stride(1), self.out.stride(2))
            self.shape = (*ids.shape, self.nl, E, D) if many else (*ids.shape, E, D)
        if faults is None:
            raise_on_bad_ids(self.flat, V, where)
            self.faults, self.has_faults = self.flat, False  # unused
        else:
            if not isinstance(faults, torch.Tensor) or faults.dtype != torch.int64 or faults.numel() < 1 \
                    or faults.device != data.device:
                raise ValueError(f"{where}: faults must be an int64 tensor on the table's device ({data.device})")
            self.faults, self.has_faults = faults, True
        self.V, self.E, self.D = V, E, D
        self.block_d = min(128, triton.next_power_of_2(max(D, 1)))
        self.empty = T == 0 or E == 0 or D == 0
        if not self.empty and not data.is_cuda and not _interpreting():
            raise RuntimeError(f"{where}: a CPU table needs TRITON_INTERPRET=1 (the CPU gathers are "
                               f"quantized_lut_gather / factored_lut_gather / mixed_lut_gather)")

    def result(self) -> torch.Tensor:
        if self.empty and self.out.numel():  # no expert: a fused sum over none is zero
            self.out.zero_()
        return self.out.reshape(self.shape)

    def launch(self, part, norm=None, *, rank=None, start=0, n=None, zero_bad=True) -> None:
        """One part's kernel over every token (with ``rank``: only the tokens whose rank is in [start, start + n))."""
        if self.empty:
            return
        off, cs = norm if norm is not None else (self.w, self.w)
        common = dict(MIXED=rank is not None, ZERO_BAD=zero_bad, HAS_FAULTS=self.has_faults,
                      NORM=norm is not None, FUSED=self.fused, BLOCK_D=self.block_d)
        grid = (self.flat.numel(), triton.cdiv(self.D, self.block_d))
        rank = self.flat if rank is None else rank
        n = self.V if n is None else n
        if isinstance(part, FactoredLUT):
            data, st = _strided(part.data)
            basis = part.basis.contiguous()
            _factored_kernel[grid](data, basis, self.flat, rank, self.w, off, cs, self.out, self.faults,
                                   self.V, start, n, *st, part.rank, self.l0, self.nl, self.E, self.D, *self.strides,
                                   BITS=part.bits, ROW_BYTES=data.shape[-1], R_BLK=min(_RANK_CHUNK,
                                   triton.next_power_of_2(part.rank)), **common)
            return
        if isinstance(part, QuantizedLUT):
            data, st = _strided(part.data)
            bits, levels = _codebook(part.format, data.device)
            scale_off, block, sbytes = row_layout(part.format, part.dim, part.block_size)[1], part.block_size, \
                scale_dtype(part.format).itemsize
        else:  # a float part [n, L, E, D]
            data, st = _strided(part)
            levels, bits, scale_off, block, sbytes = self.w, 8, 0, 1, 2
        _codebook_kernel[grid](data, self.flat, rank, self.w, levels, off, cs, self.out, self.faults,
                               self.V, start, n, *st, scale_off, self.l0, self.nl, self.E, self.D, *self.strides,
                               BITS=bits, BLOCK=block, SCALE_BYTES=sbytes, FLOAT=not isinstance(part, QuantizedLUT),
                               **common)


def _strided(data: torch.Tensor):
    """``data`` with unit stride along its last axis, and its (token, layer, expert) strides in elements."""
    if data.stride(-1) != 1:
        data = data.contiguous()
    return data, (data.stride(0), data.stride(1) if data.dim() == 4 else 0, data.stride(-2))


_LEVELS = {}


def _codebook(fmt: str, device) -> tuple:
    """(bits per code, float32 level table on ``device``) of a QuantizedLUT format (cached per device)."""
    key = (fmt, str(device))
    if key not in _LEVELS:
        if fmt in LOWBIT:
            bits, levels = LOWBIT[fmt][0], torch.tensor(LOWBIT[fmt][1], dtype=torch.float32)
        elif fmt == "nf4":
            bits, levels = 4, torch.tensor(NF4_LEVELS, dtype=torch.float32)
        elif fmt == "int8":
            bits, levels = 8, torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).float()
        else:  # fp8_e4m3
            bits, levels = 8, torch.arange(256, dtype=torch.int32).to(torch.uint8).view(_FP8).float()
        _LEVELS[key] = bits, levels.to(device)
    return _LEVELS[key]


def lowbit_gather_triton(q: QuantizedLUT, ids: torch.Tensor, weights: Optional[torch.Tensor] = None, *,
                         layer=None, dtype: Optional[torch.dtype] = None,
                         faults: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows (``[*, L, E, D]``, ``[*, E, D]`` for ``layer=<int>``) or the fused ``[*, D]`` (``weights``
    ``[*, E]``, one layer) of a low-bit table (q3/q2/q1). ``dtype``: the result dtype (default
    ``q.dtype``). ``faults``: see the module docstring."""
    if not isinstance(q, QuantizedLUT) or q.format not in LOWBIT:
        raise ValueError(f"lowbit_gather_triton: q must be a QuantizedLUT of format {tuple(LOWBIT)}, got "
                         f"{getattr(q, 'format', type(q).__name__)!r}")
    plan = _Plan("lowbit_gather_triton", q.data, q.shape, ids, weights, layer, q.dtype if dtype is None else dtype,
                 faults, q.vocab_size)
    plan.launch(q)
    return plan.result()


def factored_gather_triton(q: FactoredLUT, ids: torch.Tensor, weights: Optional[torch.Tensor] = None, *,
                           layer=None, dtype: Optional[torch.dtype] = None,
                           faults: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`mole_kernels.factored.factored_lut_gather` in one Triton kernel (same forms and results up
    to float32 summation order); ``faults``: see the module docstring."""
    if not isinstance(q, FactoredLUT):
        raise ValueError(f"factored_gather_triton: q must be a FactoredLUT, got {type(q).__name__}")
    plan = _Plan("factored_gather_triton", q.data, q.shape, ids, weights, layer, q.dtype if dtype is None else dtype,
                 faults, q.vocab_size)
    plan.launch(q)
    return plan.result()


def mixed_gather_triton(m, ids: torch.Tensor, weights: Optional[torch.Tensor] = None, *, layer=None,
                        dtype: Optional[torch.dtype] = None, faults: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`mole_kernels.mixed.mixed_lut_gather` with one kernel launch per part, each keeping the
    tokens whose rank falls in its part (see the module docstring); parts of any format (low-bit,
    nf4, int8, fp8, factored, float)."""
    from .mixed import MixedLUT, _rows_of

    if not isinstance(m, MixedLUT):
        raise ValueError(f"mixed_gather_triton: m must be a MixedLUT, got {type(m).__name__}")
    plan = _Plan("mixed_gather_triton", m.rank, m.shape, ids, weights, layer, m.dtype if dtype is None else dtype,
                 faults, m.vocab_size)
    norm = (m.offset.contiguous(), m.col_scale.contiguous()) if m.normalized else None
    for k, (s, p) in enumerate(zip(m.starts, m.parts)):
        if (p.data if isinstance(p, (QuantizedLUT, FactoredLUT)) else p).device != m.rank.device:
            raise ValueError(f"mixed_gather_triton: part {k} is not on the rank map's device ({m.rank.device})")
        plan.launch(p, norm, rank=m.rank, start=s, n=_rows_of(p), zero_bad=k == 0)
    return plan.result()


def _interpreting() -> bool:
    import os

    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
