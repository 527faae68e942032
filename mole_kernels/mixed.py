"""Mixed precision by token frequency: a table whose rows use different formats by token id.

Almost all of a low-bit table's quality loss comes from the rows of the most frequent tokens (they
are read at most positions), so a :class:`MixedLUT` keeps the rows of the ``n`` most frequent ids
in a wide format (e.g. nf4 or int8) and the rest in a narrow one (e.g. q2 or q1). Its parts are
ordinary tables (:class:`~mole_kernels.QuantizedLUT`, :class:`~mole_kernels.factored.FactoredLUT`
(format ``"f<rank>x<bits>"``) or float tensors ``[n_k, L, E, D]``) keyed
by **rank**: ``rank[id]`` is the id's position in the frequency order (0: most frequent), part
``k`` holds ranks ``[starts[k], starts[k] + n_k)`` in rank order. So the format of a row follows
from its id by one lookup and two comparisons; each part's gather runs its own format's
branch-free inner loop.

    m = quantize_mixed(lut, counts, [("nf4", 512), ("q1", None)])   # None: all remaining ids
    rows = mixed_lut_gather(m, ids)                 # == dequantize_mixed(m)[ids]
    save_mixed("lut.safetensors", m); m2 = load_mixed("lut.safetensors")

Frequencies: any per-id count ``[V]`` (e.g. :func:`token_counts` of a tokenized corpus); ties
keep id order.

Column normalisation (``quantize_mixed(..., normalize=True)``): a trained table's columns have very
different offsets and scales per (layer, expert), and a block scale shared by a row's columns wastes
the narrow formats' few levels on the widest column. So the parts may store the normalised table
``(lut - offset) / col_scale``, with ``offset`` and ``col_scale`` float32 ``[L, E, D]`` (the
frequency-weighted mean over the vocabulary and the rms about it) kept once per table (2 x 4 bytes
per (layer, expert, column): ~0.016 bits per value at V = 4,096) and folded back in the gather::

    row(v, l, e) = part_row(v, l, e) * col_scale[l, e] + offset[l, e]
    fused        = sum_e w_e * (part_row(v, l, e) * col_scale[l, e] + offset[l, e])

On the 1,500-step reference model this cuts q3's perplexity cost ~4x (bench/QUANT_QUALITY.md).
"""
import json
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from .factored import FactoredLUT, dequantize_factored, factored_lut_gather_reference, factorize, parse_factored_format
from .quant import QuantizedLUT, canonical_format, dequantize, quantize, quantized_lut_gather

__all__ = ["MixedLUT", "token_counts", "column_normalisation", "quantize_mixed", "dequantize_mixed", "mixed_lut_gather",
           "mixed_lut_gather_reference", "save_mixed", "load_mixed"]

_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_META = "mole_kernels.mixed"
_SAFETENSORS_DTYPES = {"U8": torch.uint8, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_VERSION = "mixed-v1"

Part = Union[QuantizedLUT, FactoredLUT, torch.Tensor]
_PACKED = (QuantizedLUT, FactoredLUT)


def _rows_of(part: Part) -> int:
    return part.vocab_size if isinstance(part, _PACKED) else part.shape[0]


def _shape_of(part: Part) -> Tuple[int, ...]:
    return tuple(part.shape[1:])


def _bytes_of(part: Part) -> int:
    return part.nbytes if isinstance(part, _PACKED) else part.numel() * part.element_size()


@dataclass(frozen=True, eq=False)
class MixedLUT:
    """Parts keyed by frequency rank (see the module docstring).

    ``rank``: int32 ``[V]``, a permutation of ``[0, V)``. ``parts``: tables whose first dimensions
    add up to V, all with the same trailing shape ``[L, E, D]`` (or ``[E, D]``).
    """

    rank: torch.Tensor
    parts: Tuple[Part, ...]
    offset: Optional[torch.Tensor] = None
    col_scale: Optional[torch.Tensor] = None

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        self._check_normalisation()
        r = self.rank
        if not isinstance(r, torch.Tensor) or r.dtype != torch.int32 or r.dim() != 1:
            raise ValueError(f"MixedLUT: rank must be a 1-D int32 tensor [V], got "
                             f"{getattr(r, 'dtype', type(r))} {tuple(getattr(r, 'shape', ()))}")
        if not self.parts:
            raise ValueError("MixedLUT: parts must hold at least one table")
        for k, p in enumerate(self.parts):
            if isinstance(p, torch.Tensor):
                if p.dtype not in _FLOAT.values() or p.dim() not in (3, 4):
                    raise ValueError(f"MixedLUT: part {k} must be a QuantizedLUT or a float tensor [n, L, E, D] / "
                                     f"[n, E, D], got {p.dtype} {tuple(p.shape)}")
            elif not isinstance(p, _PACKED):
                raise ValueError(f"MixedLUT: part {k} must be a QuantizedLUT, a FactoredLUT or a float tensor, got "
                                 f"{type(p).__name__}")
            if _shape_of(p) != _shape_of(self.parts[0]):
                raise ValueError(f"MixedLUT: part {k} has row shape {list(_shape_of(p))}, part 0 "
                                 f"{list(_shape_of(self.parts[0]))}: every part must have the same [L, E, D]")
        V = sum(_rows_of(p) for p in self.parts)
        if r.shape[0] != V:
            raise ValueError(f"MixedLUT: rank has {r.shape[0]} ids but the parts hold {V} rows")
        seen = torch.zeros(V, dtype=torch.bool)
        rc = r.cpu().long()
        if V and (rc.min() < 0 or rc.max() >= V):
            raise ValueError(f"MixedLUT: rank must be a permutation of [0, {V}), got values in [{rc.min()}, {rc.max()}]")
        seen[rc] = True
        if not bool(seen.all()):
            raise ValueError(f"MixedLUT: rank must be a permutation of [0, {V}) (a rank appears twice)")

    def _check_normalisation(self) -> None:
        if (self.offset is None) != (self.col_scale is None):
            raise ValueError("MixedLUT: offset and col_scale go together (both float32 [L, E, D]) or not at all")
        want = _shape_of(self.parts[0]) if self.parts else None
        for name in ("offset", "col_scale"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != want:
                raise ValueError(f"MixedLUT: {name} must be a float32 tensor of the row shape {list(want or ())}, got "
                                 f"{getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', ()))}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"MixedLUT: {name} has non-finite values")
            if t.device != self.rank.device:
                raise ValueError(f"MixedLUT: {name} is on {t.device} but rank on {self.rank.device}")
        if self.col_scale is not None and bool((self.col_scale < 0).any()):
            raise ValueError("MixedLUT: col_scale must be >= 0")

    @property
    def normalized(self) -> bool:
        """True when the parts hold ``(lut - offset) / col_scale`` (see the module docstring)."""
        return self.offset is not None

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.rank.shape[0], *_shape_of(self.parts[0]))

    @property
    def vocab_size(self) -> int:
        return self.rank.shape[0]

    @property
    def starts(self) -> Tuple[int, ...]:
        """The first rank each part holds."""
        out, n = [], 0
        for p in self.parts:
            out.append(n)
            n += _rows_of(p)
        return tuple(out)

    @property
    def nbytes(self) -> int:
        """Bytes of every part plus the rank map (4 bytes per id) and any offset and col_scale."""
        norm = 0 if self.offset is None else 4 * (self.offset.numel() + self.col_scale.numel())
        return sum(_bytes_of(p) for p in self.parts) + 4 * self.vocab_size + norm

    @property
    def bits_per_value(self) -> float:
        """Stored bits per table value, scales, padding and the rank map included."""
        values = self.vocab_size * int(torch.tensor(self.shape[1:]).prod())
        return 8.0 * self.nbytes / max(1, values)

    @property
    def dtype(self) -> torch.dtype:
        p = self.parts[0]
        return p.dtype

    def describe(self) -> str:
        """e.g. ``nf4/64 x 512 + q1/64 x 3584``."""
        def name(p):
            if isinstance(p, FactoredLUT):
                return p.format
            return f"{p.format}/{p.block_size}" if isinstance(p, QuantizedLUT) else str(p.dtype).replace("torch.", "")
        text = " + ".join(f"{name(p)} x {_rows_of(p)}" for p in self.parts)
        return f"norm({text})" if self.normalized else text

    def __repr__(self):
        return f"MixedLUT({self.describe()}, shape={list(self.shape)}, {self.bits_per_value:.3f} bits/value)"


def token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each id in ``[0, vocab_size)`` occurs in ``ids`` (any shape): int64 ``[vocab_size]``."""
    flat = ids.reshape(-1).long().cpu()
    if flat.numel() and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"token_counts: ids must lie in [0, {vocab_size}), got values in [{flat.min()}, {flat.max()}]")
    return torch.bincount(flat, minlength=vocab_size)


def column_normalisation(lut: torch.Tensor, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(offset, col_scale), float32 ``[L, E, D]``: each column's mean over the vocabulary and its rms about
    that mean, both weighted by ``counts + 1`` (frequent rows matter more; an unseen id still counts once).
    A constant column gets col_scale 1."""
    w = counts.to(lut.device, torch.float64) + 1.0
    w = w / w.sum()
    x = lut.double()
    offset = torch.einsum("v,v...->...", w, x)
    rms = torch.einsum("v,v...->...", w, (x - offset) ** 2).sqrt()
    scale = torch.where(rms > 0, rms, 1.0)
    return offset.float(), scale.float()


def quantize_mixed(lut: torch.Tensor, counts: torch.Tensor, plan: Sequence[Tuple[Optional[str], Optional[int]]], *,
                   block_sizes: Optional[Sequence[Optional[int]]] = None, normalize: bool = False,
                   progress: Optional[bool] = None) -> MixedLUT:
    """Splits ``lut`` ``[V, L, E, D]`` by the frequency ``counts`` ``[V]`` into parts of the given formats.

    ``plan``: ``(format, n)`` pairs, most frequent first: the next ``n`` ids by frequency go to
    ``format`` (a quantization format, or None to keep them in ``lut``'s dtype). ``n = None`` (last
    entry only): all remaining ids. ``block_sizes``: one per entry (None: the format's default).
    ``normalize``: quantize ``(lut - offset) / col_scale`` (see :func:`column_normalisation` and the
    module docstring); a float part then holds the normalised rows in ``lut``'s dtype.
    """
    if not isinstance(lut, torch.Tensor) or lut.dim() not in (3, 4):
        raise ValueError(f"quantize_mixed: lut must be a tensor [V, L, E, D] or [V, E, D], got "
                         f"{tuple(lut.shape) if isinstance(lut, torch.Tensor) else type(lut)}")
    V = lut.shape[0]
    counts = torch.as_tensor(counts)
    if counts.shape != (V,):
        raise ValueError(f"quantize_mixed: counts must have shape [V] = [{V}], got {list(counts.shape)}")
    if not plan:
        raise ValueError("quantize_mixed: plan must name at least one (format, n) part")
    block_sizes = list(block_sizes) if block_sizes is not None else [None] * len(plan)
    if len(block_sizes) != len(plan):
        raise ValueError(f"quantize_mixed: block_sizes needs one entry per plan entry ({len(plan)}), got {len(block_sizes)}")
    if not isinstance(normalize, bool):
        raise ValueError(f"quantize_mixed: normalize must be True or False, got {normalize!r}")
    offset = col_scale = None
    if normalize:
        if not bool(torch.isfinite(lut).all()):
            raise ValueError("quantize_mixed: lut has non-finite values (normalize=True needs finite columns)")
        offset, col_scale = column_normalisation(lut, counts)
    order = torch.sort(counts.cpu().double(), descending=True, stable=True).indices  # rank -> id
    rank = torch.empty(V, dtype=torch.int32)
    rank[order] = torch.arange(V, dtype=torch.int32)
    parts, start = [], 0
    for k, (fmt, n) in enumerate(plan):
        if n is None:
            if k != len(plan) - 1:
                raise ValueError("quantize_mixed: only the last plan entry may take all remaining ids (n=None)")
            n = V - start
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or start + n > V:
            raise ValueError(f"quantize_mixed: plan entry {k} asks for {n!r} ids but {V - start} remain")
        rows = lut[order[start:start + n].to(lut.device)]
        if normalize:
            rows = ((rows.float() - offset) / col_scale).to(lut.dtype)
        if fmt is None:
            parts.append(rows.contiguous())
        elif parse_factored_format(fmt):
            if block_sizes[k] is not None:
                raise ValueError(f"quantize_mixed: a factored part ({fmt!r}) has no block size, got {block_sizes[k]!r}")
            parts.append(factorize(rows, *parse_factored_format(fmt), counts=counts[order[start:start + n]],
                                   progress=progress))
        else:
            parts.append(quantize(rows, canonical_format(fmt), block_sizes[k], progress=progress))
        start += n
    if start != V:
        raise ValueError(f"quantize_mixed: the plan covers {start} ids of {V}; end it with (format, None)")
    return MixedLUT(rank.to(lut.device), parts, offset, col_scale)


def dequantize_mixed(m: MixedLUT, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float table ``[V, L, E, D]`` the mixed table stands for (default dtype: part 0's)."""
    dtype = m.dtype if dtype is None else dtype
    out = torch.empty(m.shape, dtype=dtype, device=m.rank.device)
    rank = m.rank.long()
    order = torch.empty_like(rank)
    order[rank] = torch.arange(m.vocab_size, device=rank.device)
    for s, p in zip(m.starts, m.parts):
        n = _rows_of(p)
        if m.normalized:  # float32, the same operations as the gather's: a product, then a sum (two roundings)
            out[order[s:s + n]] = (_dequantize_part(p, torch.float32) * m.col_scale + m.offset).to(dtype)
        else:
            out[order[s:s + n]] = _dequantize_part(p, dtype)
    return out


def _dequantize_part(p: Part, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(p, QuantizedLUT):
        return dequantize(p, dtype)
    return dequantize_factored(p, dtype) if isinstance(p, FactoredLUT) else p.to(dtype)


def mixed_op_args(m: MixedLUT) -> tuple:
    """The table's leading arguments of ``torch.ops.mole_kernels.lut_gather_mixed`` (CPU tables):
    ``(rank, parts, formats, block_sizes, bases, dim)`` and, after the ids and weights, ``offset`` and
    ``col_scale`` as the last two. Made once per table: a factored part's basis becomes float32 with the
    column scale folded in (``basis * col_scale``), so the kernel scales nothing per row."""
    got = m.__dict__.get("_op_args")
    if got is not None:
        return got
    parts, formats, blocks, bases = [], [], [], []
    for p in m.parts:
        if isinstance(p, QuantizedLUT):
            parts.append(p.data)
            formats.append(p.format)
            blocks.append(p.block_size)
        elif isinstance(p, FactoredLUT):
            parts.append(p.data)
            formats.append("factored")
            blocks.append(p.bits)
            b = p.basis.float()
            bases.append((b * m.col_scale.unsqueeze(-2) if m.normalized else b).contiguous())
        else:
            parts.append(p)
            formats.append("float")
            blocks.append(0)
    got = ((m.rank, parts, ",".join(formats), blocks, bases, m.shape[-1]), (m.offset, m.col_scale))
    object.__setattr__(m, "_op_args", got)  # frozen dataclass: a cache, not a field
    return got


def _on_cpu(m: MixedLUT, *tensors) -> bool:
    parts = [p.data if isinstance(p, _PACKED) else p for p in m.parts]
    return all(t is None or t.device.type == "cpu" for t in (m.rank, m.offset, *parts, *tensors))


@torch.library.register_fake("mole_kernels::lut_gather_mixed")
def _lut_gather_mixed_fake(rank, parts, formats, block_sizes, bases, dim, ids, weights=None, layer=None, offset=None,
                           col_scale=None, dtype=None, layer_end=None):
    from ._ops import gather_shape
    return ids.new_empty(gather_shape(parts[0], ids, weights, layer, dim, layer_end), dtype=dtype or torch.float32)


@torch.library.register_fake("mole_kernels::lut_combine_mixed")
def _lut_combine_mixed_fake(rank, parts, formats, block_sizes, bases, dim, ids, logits, layer=None, offset=None,
                            col_scale=None, residual=None, shared=None):
    dtype = residual.dtype if residual is not None else shared.dtype if shared is not None else torch.float32
    return ids.new_empty((*ids.shape, dim), dtype=dtype)


def mixed_lut_gather(m: MixedLUT, ids: torch.Tensor, weights: Optional[torch.Tensor] = None, *, layer=None,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`mole_kernels.quantized_lut_gather` for a :class:`MixedLUT` (rows or fused form).

    On a CPU one call of ``torch.ops.mole_kernels.lut_gather_mixed`` (csrc/lut_gather_mixed_cpu.cpp):
    each token's part found from its rank, its rows decoded by that part's format and, in the fused
    form, summed over experts in float32. A CUDA table runs
    :func:`mole_kernels.lowbit_triton.mixed_gather_triton` (one Triton launch per part, the parts
    picked on the device: no host synchronisation beyond the check of the ids). Elsewhere (and as the
    tests' reference, :func:`mixed_lut_gather_reference`) each part runs its own gather on its tokens.
    """
    if not isinstance(m, MixedLUT):
        raise ValueError(f"mixed_lut_gather: m must be a MixedLUT, got {type(m).__name__}")
    if m.rank.is_cuda:  # the GPU path (Triton)
        from .lowbit_triton import mixed_gather_triton

        return mixed_gather_triton(m, ids, weights, layer=layer, dtype=dtype)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mixed_lut_gather: ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
    if _on_cpu(m, ids, weights):
        from ._ops import layer_span, ops
        if weights is not None and tuple(weights.shape) != (*ids.shape, m.shape[-2]):
            raise ValueError(f"mixed_lut_gather: weights must have shape {[*ids.shape, m.shape[-2]]}, "
                             f"got {list(weights.shape)}")
        first, end = layer_span(layer, m.shape[1] if len(m.shape) == 4 else 1, "mixed_lut_gather")
        head, norm = mixed_op_args(m)
        return ops.lut_gather_mixed(*head, ids, weights, first, *norm, m.dtype if dtype is None else dtype, end)
    return mixed_lut_gather_reference(m, ids, weights, layer=layer, dtype=dtype)


def mixed_lut_gather_reference(m: MixedLUT, ids: torch.Tensor, weights: Optional[torch.Tensor] = None, *, layer=None,
                               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`mixed_lut_gather` by each part's own gather (torch; any device): the tokens of each part
    gathered by that part's format's gather, then put in place."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mixed_lut_gather: ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
    V = m.vocab_size
    flat = ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= V):
        bad = flat[(flat < 0) | (flat >= V)][0].item()
        raise ValueError(f"mixed_lut_gather: id {bad} is outside the table [0, {V})")
    dtype = m.dtype if dtype is None else dtype
    w2 = None
    if weights is not None:
        if tuple(weights.shape) != (*ids.shape, m.shape[-2]):
            raise ValueError(f"mixed_lut_gather: weights must have shape {[*ids.shape, m.shape[-2]]}, "
                             f"got {list(weights.shape)}")
        w2 = weights.reshape(-1, m.shape[-2])
    rank = m.rank[flat.long()].long()
    if m.normalized:  # the parts' rows in float32, un-normalised, then (fused form) summed over experts
        offset, col_scale = _normalisation_of(m, layer)
        part_dtype, part_weights = torch.float32, None
    else:
        part_dtype, part_weights = dtype, w2
    out = None
    for s, p in zip(m.starts, m.parts):
        sel = ((rank >= s) & (rank < s + _rows_of(p))).nonzero().squeeze(1)
        local = rank[sel] - s
        w = None if part_weights is None else part_weights[sel].contiguous()
        if isinstance(p, QuantizedLUT):
            got = quantized_lut_gather(p, local, w, layer=layer, dtype=part_dtype)
        elif isinstance(p, FactoredLUT):
            got = factored_lut_gather_reference(p, local, w, layer=layer, dtype=part_dtype)
        else:
            from .lut_gather import lut_gather
            got = lut_gather(p, local, w, layer=layer).to(part_dtype)
        if out is None:
            out = got.new_empty((flat.shape[0], *got.shape[1:]))
        out[sel] = got
    if m.normalized:
        out = out * col_scale + offset  # two roundings, as dequantize_mixed and the C++ gather
        if w2 is not None:  # sum_e w_e * row_e, accumulated in float32 as the fused kernels do
            out = torch.einsum("ne,ned->nd", w2.float(), out)
        out = out.to(dtype)
    return out.reshape(*ids.shape, *out.shape[1:])


def _normalisation_of(m: MixedLUT, layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """(offset, col_scale) of the layers a gather with ``layer`` reads (as the parts' gathers index them)."""
    if len(m.shape) == 3 or layer is None:
        return m.offset, m.col_scale
    return m.offset[layer], m.col_scale[layer]  # an int (one layer) or a slice of layers


def save_mixed(path, m: MixedLUT) -> None:
    """Writes ``m`` to a safetensors file: ``rank``, ``part{k}`` (packed bytes or floats) and metadata."""
    from safetensors.torch import save_file

    tensors = {"rank": m.rank.contiguous().cpu()}
    meta = {_META + ".layout": _VERSION, _META + ".parts": str(len(m.parts))}
    if m.normalized:
        tensors["offset"], tensors["col_scale"] = m.offset.contiguous().cpu(), m.col_scale.contiguous().cpu()
    for k, p in enumerate(m.parts):
        if isinstance(p, _PACKED):
            tensors[f"part{k}"] = p.data.contiguous().cpu()
            meta[f"{_META}.part{k}"] = json.dumps(p.metadata(), sort_keys=True)
            if isinstance(p, FactoredLUT):
                tensors[f"basis{k}"] = p.basis.contiguous().cpu()
        else:
            tensors[f"part{k}"] = p.contiguous().cpu()
            meta[f"{_META}.part{k}"] = json.dumps({"float": str(p.dtype).replace("torch.", "")})
    save_file(tensors, str(path), metadata=meta)


def load_mixed(path, *, parts_in_file: bool = False) -> MixedLUT:
    """Reads a file written by :func:`save_mixed`; ValueError when it is not one or is inconsistent.

    ``parts_in_file``: leave the parts' rows in the file (their tensors are ``meta`` tensors of the stored
    shape and dtype; rank, bases, offset and col_scale are read): what a disk-tier
    :class:`~mole_kernels.table.MixedLookupTable` reads row by row."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get(_META + ".layout") != _VERSION:
            raise ValueError(f"load_mixed: {path} is not a mixed table of layout {_VERSION!r} "
                             f"(metadata layout: {meta.get(_META + '.layout')!r})")
        try:
            n = int(meta[_META + ".parts"])
            specs = [json.loads(meta[f"{_META}.part{k}"]) for k in range(n)]
        except (KeyError, ValueError) as e:
            raise ValueError(f"load_mixed: {path} has broken metadata ({e})") from None
        names = set(f.keys())
        want = {"rank"} | {f"part{k}" for k in range(n)} | {f"basis{k}" for k in range(n) if "factored_bits" in specs[k]}
        if "offset" in names or "col_scale" in names:  # a normalised table (the MixedLUT checks both are there)
            want |= {"offset", "col_scale"}
        if names != want:
            raise ValueError(f"load_mixed: {path} holds tensors {sorted(names)}, expected {sorted(want)}")
        parts = []
        for k, spec in enumerate(specs):
            if parts_in_file:
                sl = f.get_slice(f"part{k}")
                t = torch.empty(sl.get_shape(), dtype=_SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.uint8),
                                device="meta")
            else:
                t = f.get_tensor(f"part{k}")
            if "float" in spec:
                if _FLOAT.get(spec["float"]) != t.dtype:
                    raise ValueError(f"load_mixed: part {k} is {t.dtype} but its metadata says {spec['float']!r}")
                parts.append(t)
            elif "factored_bits" in spec:
                basis = f.get_tensor(f"basis{k}")
                if parts_in_file:  # the sample check reads rows: done by the disk table on its own reads
                    parts.append(FactoredLUT(t, basis, int(spec["factored_bits"]), _FLOAT[spec["dtype"]]))
                else:
                    parts.append(FactoredLUT.from_metadata(t, basis, spec))
            else:
                parts.append(QuantizedLUT.from_metadata(t, spec, check_sample=not parts_in_file))
        norm = [f.get_tensor(k) for k in ("offset", "col_scale")] if "offset" in names else [None, None]
        return MixedLUT(f.get_tensor("rank"), parts, *norm)
