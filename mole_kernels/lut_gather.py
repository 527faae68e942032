"""`lut_gather`: fetch LUT rows for token ids, optionally fused with the router-weighted sum."""
from typing import Optional, Union

import torch

from ._ops import _C, check_gather_args, gather_shape, layer_span, ops
from .quant import QuantizedLUT, quantized_lut_gather

__all__ = ["lut_gather"]


def lut_gather(
    lut: torch.Tensor,
    ids: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    layer: Union[int, slice, None] = None,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    faults: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rows of a lookup table for `ids`, or their router-weighted sum.

    Args:
        lut: ``[V, L, E, D]`` (or ``[V, E, D]``) contiguous table, float32/float16/bfloat16.
            On a CUDA device, pinned in host memory (read in place by the CUDA kernel
            when ``ids`` are on the GPU: zero-copy), or an ordinary CPU tensor (CPU kernel).
        ids: int32/int64 token ids of any shape ``[*]``; the result is on their device.
        weights: ``[*, E]`` router weights. When given, returns
            ``sum_e weights[..., e] * lut[ids, layer, e, :]`` of shape ``[*, D]``,
            accumulated in float32.
        layer: which layer to read (required with ``weights`` when ``L > 1``). Without
            weights, selects ``[*, E, D]`` rows of one layer instead of ``[*, L, E, D]``, or
            with a slice of consecutive layers ``[*, n, E, D]``.
        out: write the result here (shape as above; rows keep the table's dtype, the
            fused form may be float32/float16/bfloat16). Contiguous, or for rows with 1-D
            ``ids`` a view whose tokens are strided (e.g. ``buf[:T, 2:5]`` of a larger buffer).
            Returned.
        accumulate: with ``out`` and ``weights``: ``out += result`` (add straight into
            the residual stream).
        faults: int64 tensor on ids' device. When given, an id outside ``[0, V)`` reads
            nothing (zero rows) and is counted into ``faults[0]`` without synchronising
            (safe under CUDA-graph capture). When absent, such an id raises
            ``ValueError`` naming it (on CUDA this synchronises).

    ``out`` and ``faults`` may not share memory with any input (nor with each other): a
    ``ValueError`` says which. Tables, ids and results live on the CPU or a CUDA device; with
    ``meta`` tensors throughout, the call gives a ``meta`` result (shape and dtype only).

    No kernel ever reads outside the table. ``lut`` may also be a
    :class:`mole_kernels.QuantizedLUT` (int8 / fp8 / nf4 rows, dequantized in registers).
    """
    if isinstance(lut, QuantizedLUT):
        return quantized_lut_gather(lut, ids, weights, layer=layer, out=out, accumulate=accumulate, faults=faults)
    check_gather_args("lut_gather", lut, ids, weights, out, accumulate, faults)
    if accumulate and out is None:
        raise ValueError("lut_gather: accumulate=True needs out= (the tensor to add into)")
    layer, layer_end = layer_span(layer, lut.shape[1] if lut.dim() == 4 else 1, "lut_gather")
    if out is None:
        if faults is None:
            if not torch.compiler.is_compiling():  # plain CPU eager: the op's own CPU function, past the dispatcher
                result = _C._lut_gather(lut, ids, weights, layer, layer_end)
                if result is not NotImplemented:
                    return result
            return ops.lut_gather(lut, ids, weights, layer, layer_end)
        out = ids.new_empty(gather_shape(lut, ids, weights, layer, layer_end=layer_end), dtype=lut.dtype)
    ops.lut_gather_out(out, lut, ids, weights, layer, accumulate, faults, layer_end)
    return out
