"""A Triton gather for the low-bit formats (q3, q2, q1): the GPU path of the new formats.

:func:`lowbit_gather_triton` reads a :class:`~mole_kernels.QuantizedLUT` of format q3/q2/q1 (on a
GPU, or on the CPU under ``TRITON_INTERPRET=1``, which is how the tests run it) and returns either
the dequantized rows of one layer ``[*, E, D]`` or the fused sum ``sum_e w[..., e] * row_e``
``[*, D]`` accumulated in float32. Each program decodes one token's E rows over a ``BLOCK_D``
slice: a value's code is ``bits`` bits of the row's little-endian bit stream (two byte loads, a
shift and a mask), its scale a float16 read as two bytes, its level one load from a 16-entry
table. The bytes read per token and layer are ``E * row_bytes``: ~bits/16 of the bf16 row's.
"""
from typing import Optional

import torch

from .quant import LOWBIT, QuantizedLUT

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["lowbit_gather_triton"]

if triton is not None:

    @triton.jit
    def _lowbit_kernel(data_ptr, ids_ptr, w_ptr, levels_ptr, out_ptr,
                       token_bytes, seg_off, row_bytes, scale_off, E, D, s_ot, s_oe,
                       BITS: tl.constexpr, BLOCK: tl.constexpr, FUSED: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        jm = j < D
        tok = tl.load(ids_ptr + t).to(tl.int64)  # checked in range by the caller
        bit = j * BITS
        byte = bit >> 3
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for e in range(0, E):
            row = data_ptr + tok * token_bytes + seg_off + e * row_bytes
            word = tl.load(row + byte, mask=jm, other=0).to(tl.int32)
            if BITS == 3:  # a 3-bit code may straddle two bytes; the next byte is still in the row
                word = word | (tl.load(row + byte + 1, mask=jm, other=0).to(tl.int32) << 8)
            code = (word >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)
            soff = scale_off + 2 * (j // BLOCK)
            h = tl.load(row + soff, mask=jm, other=0).to(tl.int32) | (tl.load(row + soff + 1, mask=jm, other=0).to(tl.int32) << 8)
            s = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x = s * tl.load(levels_ptr + code, mask=jm, other=0.0)
            if FUSED:
                acc += tl.load(w_ptr + t * E + e).to(tl.float32) * x
            else:
                tl.store(out_ptr + t * s_ot + e * s_oe + j, x.to(out_ptr.dtype.element_ty), mask=jm)
        if FUSED:
            tl.store(out_ptr + t * s_ot + j, acc.to(out_ptr.dtype.element_ty), mask=jm)


def lowbit_gather_triton(q: QuantizedLUT, ids: torch.Tensor, weights: Optional[torch.Tensor] = None, *,
                         layer: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rows ``[*, E, D]`` of ``layer`` (fused: ``[*, D]`` with ``weights`` ``[*, E]``) of a low-bit table.

    ``layer`` may be None only for a single-layer table ``[V, E, row_bytes]``. ``dtype``: the result
    dtype (default ``q.dtype``). Ids must lie in ``[0, V)`` (ValueError naming the first that does not).
    """
    if triton is None:
        raise RuntimeError("lowbit_gather_triton: Triton is not installed")
    if not isinstance(q, QuantizedLUT) or q.format not in LOWBIT:
        raise ValueError(f"lowbit_gather_triton: q must be a QuantizedLUT of format {tuple(LOWBIT)}, got "
                         f"{getattr(q, 'format', type(q).__name__)!r}")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lowbit_gather_triton: ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
    if ids.device != q.device:
        raise ValueError(f"lowbit_gather_triton: ids ({ids.device}) must be on the table's device ({q.device})")
    L, E, D = q.num_layers, q.num_experts, q.dim
    if layer is None:
        if q.data.dim() == 4 and L != 1:
            raise ValueError(f"lowbit_gather_triton: the table has L = {L} layers; name one with layer=")
        layer = 0
    if not isinstance(layer, int) or not 0 <= layer < L:
        raise ValueError(f"lowbit_gather_triton: layer must be an int in [0, {L}), got {layer!r}")
    flat = ids.reshape(-1).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= q.vocab_size):
        bad = flat[(flat < 0) | (flat >= q.vocab_size)][0].item()
        raise ValueError(f"lowbit_gather_triton: id {bad} is outside the table [0, {q.vocab_size})")
    dtype = q.dtype if dtype is None else dtype
    T = flat.numel()
    fused = weights is not None
    if fused:
        if tuple(weights.shape) != (*ids.shape, E):
            raise ValueError(f"lowbit_gather_triton: weights must have shape {[*ids.shape, E]}, got {list(weights.shape)}")
        w = weights.reshape(T, E).float().contiguous()
        out = torch.empty((T, D), dtype=dtype, device=ids.device)
    else:
        w = flat  # unused
        out = torch.empty((T, E, D), dtype=dtype, device=ids.device)
    if T == 0 or E == 0:  # nothing to read (a fused sum over no experts is zero)
        return (out.zero_() if fused else out).reshape(*ids.shape, *out.shape[1:])
    if not q.data.is_cuda and not _interpreting():
        raise RuntimeError("lowbit_gather_triton: a CPU table needs TRITON_INTERPRET=1 (use quantized_lut_gather on the CPU)")
    bits, levels, _ = LOWBIT[q.format]
    lv = torch.tensor(levels + (0.0,) * (16 - len(levels)), dtype=torch.float32, device=ids.device)
    row_bytes = q.row_bytes
    block_d = min(256, triton.next_power_of_2(D))
    grid = (T, triton.cdiv(D, block_d))
    _lowbit_kernel[grid](q.data, flat, w, lv, out, L * E * row_bytes, layer * E * row_bytes, row_bytes,
                         row_bytes - 2 * (D // q.block_size), E, D, out.stride(0), out.stride(1) if not fused else 0,
                         BITS=bits, BLOCK=q.block_size, FUSED=fused, BLOCK_D=block_d)
    return out.reshape(*ids.shape, *out.shape[1:])


def _interpreting() -> bool:
    import os

    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
