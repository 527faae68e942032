"""Factored tables: each (layer, expert)'s rows as a few quantized coefficients of a shared low-rank basis.

A trained MoLE's LUT is ``FFN_{l,e}(embedding[v])``: every (layer, expert) block ``[V, D]`` is a
function of one D-dimensional embedding, and its rows are close to a low-dimensional subspace (on
the 1,500-step reference model, after removing the column means, 16 of 128 directions hold 92-98 %
of a block's frequency-weighted variance). A :class:`FactoredLUT` stores, per row ``(v, l, e)``,
``rank`` coefficients in ``bits``-bit signed integers with one float16 scale, and per (layer,
expert) a float16 basis ``[rank, D]``::

    row(v, l, e) = (scale[v, l, e] * code[v, l, e, :]) @ basis[l, e]          # [D]
    fused        = sum_e w_e * row(v, l, e) = sum_e (w_e * coef[v, l, e]) @ basis[l, e]

So a gather reads ``rank * bits / 8 + 2`` bytes per row instead of ``2 * D`` and adds one small
matrix product per token and layer (``E * rank`` by ``D``). Row bytes::

    [ ceil(rank * bits / 8) bytes: code j + 2^(bits-1) in bits [bits*j, bits*j + bits) (little-endian) ]
    [ pad to 2 ][ float16 scale ]

Codes lie in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``. The basis is the top right singular vectors of
the block's rows weighted by ``sqrt(counts + 1)`` (frequent rows fit best; rank > V: the extra
directions are 0), rounded to float16; the coefficients are the least-squares fit to that rounded
basis, then quantized (absmax scale).
Use it as a part of a column-normalised :class:`~mole_kernels.mixed.MixedLUT` (the normalisation
removes the column means, which a low-rank fit would otherwise spend a direction on):
``quantize_mixed(lut, counts, [("int8", 64), ("f32x6", None)], normalize=True)`` ("f" rank "x" bits).
"""
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ._progress import progress_bar
from .quant import _pack_bits, _unpack_bits

__all__ = ["FactoredLUT", "factorize", "dequantize_factored", "factored_lut_gather", "factored_lut_gather_reference",
           "parse_factored_format"]

_NAME = re.compile(r"^f(\d+)x(\d+)$")
_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_factored_format(name) -> Optional[Tuple[int, int]]:
    """(rank, bits) of a factored format name ``"f<rank>x<bits>"`` (e.g. ``"f32x6"``); None for another name."""
    m = _NAME.match(name) if isinstance(name, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check(rank, bits, dim) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"factored table: bits must be an int in [2, 8], got {bits!r}")
    if not isinstance(rank, int) or not 1 <= rank <= dim:
        raise ValueError(f"factored table: rank must be an int in [1, D = {dim}], got {rank!r}")


def row_bytes(rank: int, bits: int) -> int:
    payload = -(-rank * bits // 8)
    return payload + payload % 2 + 2


@dataclass(frozen=True, eq=False)
class FactoredLUT:
    """Rows ``data`` (uint8 ``[V, L, E, row_bytes]`` or ``[V, E, row_bytes]``, see the module docstring)
    and ``basis`` (float16 ``[L, E, rank, D]`` or ``[E, rank, D]``); ``dtype``: the table's float dtype."""

    data: torch.Tensor
    basis: torch.Tensor
    bits: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        d, b = self.data, self.basis
        if not isinstance(b, torch.Tensor) or b.dtype != torch.float16 or b.dim() not in (3, 4):
            raise ValueError(f"FactoredLUT: basis must be a float16 tensor [L, E, rank, D] or [E, rank, D], got "
                             f"{getattr(b, 'dtype', type(b))} {list(getattr(b, 'shape', ()))}")
        _check(b.shape[-2], self.bits, b.shape[-1])
        if not isinstance(d, torch.Tensor) or d.dtype != torch.uint8 or d.dim() != b.dim():
            raise ValueError(f"FactoredLUT: data must be a uint8 tensor with {b.dim()} dims, got "
                             f"{getattr(d, 'dtype', type(d))} {list(getattr(d, 'shape', ()))}")
        want = (*b.shape[:-2], row_bytes(self.rank, self.bits))
        if tuple(d.shape[1:]) != want:
            raise ValueError(f"FactoredLUT: data rows are {list(d.shape[1:])}, but rank {self.rank} at {self.bits} bits "
                             f"with basis {list(b.shape)} needs {list(want)} (do the metadata and the payload disagree?)")
        if not bool(torch.isfinite(b).all()):
            raise ValueError("FactoredLUT: basis has non-finite values")
        if self.dtype not in _FLOAT.values():
            raise ValueError(f"FactoredLUT: dtype must be float32, float16 or bfloat16, got {self.dtype}")

    @property
    def rank(self) -> int:
        return self.basis.shape[-2]

    @property
    def dim(self) -> int:
        return self.basis.shape[-1]

    @property
    def shape(self) -> Tuple[int, ...]:
        return (*self.data.shape[:-1], self.dim)

    @property
    def vocab_size(self) -> int:
        return self.data.shape[0]

    @property
    def format(self) -> str:
        return f"f{self.rank}x{self.bits}"

    @property
    def nbytes(self) -> int:
        """Rows and basis."""
        return self.data.numel() + 2 * self.basis.numel()

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / max(1, self.data[..., 0].numel() * self.dim)

    def coefficients(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 coefficients ``[..., rank]`` (scale * code) of ``rows`` (default: all of ``data``)."""
        rows = self.data if rows is None else rows
        payload = -(-self.rank * self.bits // 8)
        codes = _unpack_bits(rows[..., :payload], self.bits, self.rank) - (1 << (self.bits - 1))
        scale = rows[..., -2:].contiguous().view(torch.float16).float()
        return codes.float() * scale

    def metadata(self) -> Dict[str, str]:
        return {"factored_bits": str(self.bits), "dtype": str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_metadata(cls, data: torch.Tensor, basis: torch.Tensor, metadata: Dict[str, str]) -> "FactoredLUT":
        try:
            bits, dtype = int(metadata["factored_bits"]), _FLOAT[metadata["dtype"]]
        except (KeyError, ValueError) as e:
            raise ValueError(f"FactoredLUT: broken metadata {metadata!r} ({e!r})") from None
        q = cls(data, basis, bits, dtype)
        n = min(q.vocab_size, 16)
        for rows in (data[:n], data[-n:]):
            s = rows[..., -2:].contiguous().view(torch.float16)
            payload = -(-q.rank * bits // 8)
            used = _unpack_bits(rows[..., :payload], bits, q.rank)
            if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or bool((used == 0).any()) \
                    or bool((rows[..., payload:-2] != 0).any()):
                raise ValueError("FactoredLUT: the first/last rows hold a negative or non-finite scale, a code "
                                 "outside the symmetric range or non-zero padding: the file is corrupt")
        return q

    def __repr__(self):
        return (f"FactoredLUT({self.format}, shape={list(self.shape)}, {self.bits_per_value:.3f} bits/value, "
                f"dtype={self.dtype})")


def _top_directions(a: torch.Tensor, k: int) -> torch.Tensor:
    """The top ``k`` right singular vectors ``[k, D]`` of ``a`` ``[V, D]`` (float64), from the
    eigenvectors of the D x D Gram matrix (a few ms, vs ~40 ms for the SVD of a 4,096 x 128 block),
    each signed so that its largest component is positive."""
    _, vecs = torch.linalg.eigh(a.T @ a)  # ascending eigenvalues
    top = vecs[:, -k:].flip(1).T if k else vecs[:, :0].T
    big = top.gather(1, top.abs().argmax(1, keepdim=True))
    return top * torch.where(big < 0, -1.0, 1.0)


def factorize(lut: torch.Tensor, rank: int, bits: int, *, counts: Optional[torch.Tensor] = None,
              progress: Optional[bool] = None) -> FactoredLUT:
    """Fits a :class:`FactoredLUT` to ``lut`` ``[V, L, E, D]`` (or ``[V, E, D]``); ``counts`` ``[V]`` weights
    the rows (default: all equal). Non-finite values are refused."""
    if not isinstance(lut, torch.Tensor) or lut.dim() not in (3, 4) or lut.dtype not in _FLOAT.values():
        raise ValueError(f"factorize: lut must be a float tensor [V, L, E, D] or [V, E, D], got "
                         f"{getattr(lut, 'dtype', type(lut))} {list(getattr(lut, 'shape', ()))}")
    V, D = lut.shape[0], lut.shape[-1]
    _check(rank, bits, D)
    if not bool(torch.isfinite(lut).all()):
        raise ValueError("factorize: lut has non-finite values")
    w = torch.ones(V, dtype=torch.float64) if counts is None else torch.as_tensor(counts).double().cpu() + 1.0
    if w.shape != (V,):
        raise ValueError(f"factorize: counts must have shape [V] = [{V}], got {list(w.shape)}")
    x = lut.float().reshape(V, -1, D).cpu()
    blocks = x.shape[1]
    qmax = (1 << (bits - 1)) - 1
    data = torch.zeros(V, blocks, row_bytes(rank, bits), dtype=torch.uint8)
    basis = torch.zeros(blocks, rank, D, dtype=torch.float16)
    sw = (w / w.sum()).sqrt()
    with progress_bar(blocks, f"factorize f{rank}x{bits}", enabled=bool(progress)) as bar:
        for k in range(blocks):
            m = x[:, k].double()
            if V:
                basis[k, :min(rank, V)] = _top_directions(m * sw[:, None], min(rank, V)).to(torch.float16)
            b = basis[k].double()
            coef = m @ torch.linalg.pinv(b)  # least squares for the float16 basis as stored
            scale = (coef.abs().amax(1, keepdim=True) / qmax).to(torch.float16)
            if torch.isinf(scale).any():
                raise ValueError("factorize: a row's coefficient scale exceeds float16's range")
            s = scale.double()
            codes = torch.where(s > 0, coef / torch.where(s > 0, s, 1.0), 0.0).round().clamp(-qmax, qmax)
            payload = _pack_bits((codes + (qmax + 1)).long(), bits)
            data[:, k, :payload.shape[-1]] = payload
            data[:, k, -2:] = scale.view(torch.uint8)
            bar.update(1)
    return FactoredLUT(data.reshape(*lut.shape[:-1], -1).to(lut.device),
                       basis.reshape(*lut.shape[1:-1], rank, D).to(lut.device), bits, lut.dtype)


def dequantize_factored(q: FactoredLUT, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float table ``[V, L, E, D]`` (float32 products, then ``dtype``; default ``q.dtype``)."""
    return torch.einsum("...r,...rd->...d", q.coefficients(), q.basis.float()).to(q.dtype if dtype is None else dtype)


def factored_lut_gather(q: FactoredLUT, ids: torch.Tensor, weights: Optional[torch.Tensor] = None, *, layer=None,
                        dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rows ``[*, L, E, D]`` (``[*, E, D]`` for one layer) of ``ids``, or the fused
    ``sum_e weights[..., e] * row[..., layer, e, :]`` ``[*, D]`` (float32 accumulation). ``layer``: an
    int, a slice of layers (rows form) or None. Only the rows of ``ids`` are read and decoded: on a CPU
    by the fused C++ gather of mixed tables (a one-part table), on a GPU by the Triton kernel
    (:func:`mole_kernels.lowbit_triton.factored_gather_triton`), elsewhere by
    :func:`factored_lut_gather_reference`."""
    if q.data.is_cuda:  # the GPU path: one Triton kernel, coefficients decoded and multiplied in registers
        from .lowbit_triton import factored_gather_triton

        return factored_gather_triton(q, ids, weights, layer=layer, dtype=dtype)
    devices = {t.device.type for t in (q.data, ids, weights) if t is not None}
    if devices == {"cpu"} and isinstance(ids, torch.Tensor) and ids.dtype in (torch.int32, torch.int64):
        from .mixed import MixedLUT, mixed_lut_gather
        m = q.__dict__.get("_as_mixed")
        if m is None:
            m = MixedLUT(torch.arange(q.vocab_size, dtype=torch.int32), (q,))
            object.__setattr__(q, "_as_mixed", m)  # frozen dataclass: a cache, not a field
        return mixed_lut_gather(m, ids, weights, layer=layer, dtype=q.dtype if dtype is None else dtype)
    return factored_lut_gather_reference(q, ids, weights, layer=layer, dtype=dtype)


def factored_lut_gather_reference(q: FactoredLUT, ids: torch.Tensor, weights: Optional[torch.Tensor] = None, *,
                                  layer=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`factored_lut_gather` in torch (any device): the coefficients of the ids' rows, then their
    products with the bases."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"factored_lut_gather: ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= q.vocab_size):
        raise ValueError(f"factored_lut_gather: ids must lie in [0, {q.vocab_size})")
    dtype = q.dtype if dtype is None else dtype
    rows, basis = q.data[flat], q.basis
    if layer is not None:
        if q.data.dim() != 4:
            raise ValueError("factored_lut_gather: layer= needs a table [V, L, E, D]")
        rows, basis = rows[:, layer], basis[layer]
    coef = q.coefficients(rows)  # [n, (L,) E, rank]
    if weights is None:
        return torch.einsum("n...r,...rd->n...d", coef, basis.float()).to(dtype).reshape(*ids.shape, *coef.shape[1:-1],
                                                                                       q.dim)
    if coef.dim() != 3:
        raise ValueError("factored_lut_gather: the fused form (weights=) needs one layer (layer=<int> for [V, L, E, D])")
    E = coef.shape[1]
    if tuple(weights.shape) != (*ids.shape, E):
        raise ValueError(f"factored_lut_gather: weights must have shape {[*ids.shape, E]}, got {list(weights.shape)}")
    wc = (weights.reshape(-1, E, 1).float() * coef).flatten(1)  # [n, E * rank]
    return (wc @ basis.float().flatten(0, 1)).to(dtype).reshape(*ids.shape, q.dim)
