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

Plans in text (:func:`parse_plan`, the grammar of ``mole-kernels quality --variants`` and
``reparameterize --lut-format``): ``[norm:]FORMAT[/BLOCK]@N+...+FORMAT[/BLOCK]``, e.g.
``norm:int8@64+f36x5``; :func:`quantize_plan` makes the table, :attr:`MixedLUT.plan` says a table's
plan back. ``MoLEForCausalLM.reparameterize(lut_format=PLAN, counts=...)`` and
``from_pretrained(..., lut_file=<a save_mixed file>)`` serve it as a model's table.

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

from .factored import FactoredLUT, _check as _check_factored, dequantize_factored, factored_lut_gather_reference, factorize
from .factored import parse_factored_format
from .quant import FORMATS, QuantizedLUT, canonical_format, default_block_size, dequantize, quantize, quantized_lut_gather, row_layout

__all__ = ["MixedLUT", "token_counts", "column_normalisation", "quantize_mixed", "quantize_plan", "dequantize_mixed",
           "mixed_lut_gather", "mixed_lut_gather_reference", "save_mixed", "load_mixed", "parse_plan", "is_plan",
           "is_mixed_metadata"]

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

    @property
    def plan(self) -> str:
        """The table's plan in :func:`parse_plan`'s grammar, e.g. ``norm:int8@64+f36x5`` (a block size is
        written only where it is not the format's default; a float part is named by its dtype)."""
        def part(p):
            if isinstance(p, QuantizedLUT):
                return p.format, p.block_size
            return (p.format, None) if isinstance(p, FactoredLUT) else (str(p.dtype).replace("torch.", ""), None)
        return _plan_text([(*part(p), _rows_of(p)) for p in self.parts], self.normalized, self.shape[-1])

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


# ---------------------------------------------------------------- plans in text ----------------

_PLAN_GRAMMAR = "[norm:]FORMAT[/BLOCK]@N+...+FORMAT[/BLOCK]"


def is_plan(text) -> bool:
    """Whether ``text`` is written as a mixed plan (it has a part count ``@``, a ``+`` or ``norm:``), not one format.
    A factored format alone (``f36x5``) is a one-part plan too: only a mixed table stores it."""
    if not isinstance(text, str):
        return False
    t = text.strip()
    return "@" in t or "+" in t or t.startswith("norm:") or parse_factored_format(t) is not None


def parse_plan(text: str, dim: Optional[int] = None, *, where: str = "mixed plan") -> dict:
    """A mixed plan written ``[norm:]FORMAT[/BLOCK]@N+...+FORMAT[/BLOCK]`` (e.g. ``norm:int8@64+f36x5``):
    the ``N`` most frequent ids per part, most frequent first, the last part taking the rest; ``norm:``
    column-normalised; ``FORMAT`` a quantization format (int8, fp8, nf4, q3, q2, q1; ``/BLOCK`` its block
    size, also written ``-BLOCK``) or a factored one (``f<rank>x<bits>``, no block).

    Returns ``{"plan": [(format, n, block), ...], "normalize": bool}`` (the last ``n`` None; what
    :func:`quantize_plan` and :func:`mole_kernels.quality.format_costs` take), formats canonical. ``dim``
    (D, the row's values): also check that every block size and rank fits it. ValueError starting with
    ``where`` and the plan."""
    def bad(problem):
        return ValueError(f"{where} {text!r}: {problem}")

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} {text!r}: expected a plan {_PLAN_GRAMMAR} (e.g. norm:int8@64+f36x5)")
    body = text.strip()
    normalize = body.startswith("norm:")
    body = body[len("norm:"):] if normalize else body
    pieces = body.split("+")
    plan = []
    for k, piece in enumerate(pieces):
        spec, at, n = piece.partition("@")
        if (k < len(pieces) - 1) != bool(at):
            raise bad(f"every part but the last names its ids with @N (the last takes the rest), got {piece!r}")
        try:
            count = int(n) if at else None
        except ValueError:
            raise bad(f"@N must be an int, got {piece!r}") from None
        if count is not None and count < 1:
            raise bad(f"@N must be >= 1, got {piece!r}")
        fmt, sep, block = spec.replace("-", "/").partition("/")
        try:
            b = int(block) if sep else None
        except ValueError:
            raise bad(f"part {k}: the block size after '/' must be an int, got {spec!r}") from None
        factored = parse_factored_format(fmt)
        try:
            if factored is not None:
                if b is not None:
                    raise ValueError(f"a factored part ({fmt}) has no block size")
                if dim is not None:
                    _check_factored(*factored, dim)
            else:
                fmt = canonical_format(fmt)
                if dim is not None:
                    row_layout(fmt, dim, default_block_size(fmt, dim) if b is None else b)
        except ValueError as e:
            raise bad(f"part {k} ({spec!r}): {e}") from None
        plan.append((fmt, count, b))
    return {"plan": plan, "normalize": normalize}


def _plan_text(parts, normalize: bool, dim: int) -> str:
    """The canonical text of ``parts`` ``[(format, block, n), ...]`` (see :attr:`MixedLUT.plan`)."""
    items = []
    for k, (fmt, block, n) in enumerate(parts):
        default = None if block is None or parse_factored_format(fmt) or fmt not in FORMATS else \
            default_block_size(fmt, dim)
        text = fmt if block is None or block == default else f"{fmt}/{block}"
        items.append(text if k == len(parts) - 1 else f"{text}@{n}")
    return ("norm:" if normalize else "") + "+".join(items)


def plan_text(plan, dim: int) -> str:
    """The canonical text of a plan (:func:`parse_plan`'s dict or text) for a ``[..., D]`` table: what
    :attr:`MixedLUT.plan` says of the table :func:`quantize_plan` makes of it (to compare the two)."""
    spec = parse_plan(plan, dim) if isinstance(plan, str) else plan
    parts = [(fmt, b if b is not None or parse_factored_format(fmt) else default_block_size(fmt, dim), n)
             for fmt, n, b in spec["plan"]]
    return _plan_text(parts, spec["normalize"], dim)


def check_plan(plan: dict, vocab_size: int, where: str = "mixed plan") -> None:
    """ValueError unless the plan's ``@N`` counts leave at least one id of ``vocab_size`` to its last part."""
    taken = sum(n for _, n, _ in plan["plan"][:-1])
    if taken >= vocab_size:
        raise ValueError(f"{where}: its parts' @N counts add up to {taken} ids but the vocabulary has {vocab_size}; "
                         "the last part takes the rest, so they must add up to fewer")


def quantize_plan(lut: torch.Tensor, counts: torch.Tensor, plan, *, progress: Optional[bool] = None) -> MixedLUT:
    """:func:`quantize_mixed` of ``lut`` by a plan: :func:`parse_plan`'s text or dict."""
    spec = parse_plan(plan, lut.shape[-1]) if isinstance(plan, str) else plan
    return quantize_mixed(lut, counts, [(f, n) for f, n, _ in spec["plan"]], block_sizes=[b for _, _, b in spec["plan"]],
                          normalize=spec["normalize"], progress=progress)


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
    ``col_scale`` as the last two. Made once per table; a factored part's basis goes as it is stored
    (float16 ``[L, E, rank, D]``): the kernel applies the column scale after each expert's product."""
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
            bases.append(p.basis.contiguous())
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


def is_mixed_metadata(meta) -> bool:
    """Whether a safetensors file's metadata (``{str: str}``) names a mixed table (:func:`save_mixed`'s files)."""
    return isinstance(meta, dict) and (_META + ".layout") in meta


def save_mixed(path, m: MixedLUT) -> None:
    """Writes ``m`` to a safetensors file: ``rank``, ``part{k}`` (packed bytes or floats) and metadata; whole
    or not at all (:func:`mole_kernels._files.atomic_write`: an interrupted write leaves the old file). The
    file is serialised in memory first (a mixed table is the compact form: ~1/8 of the bf16 table)."""
    from safetensors.torch import save

    from ._files import atomic_write, check_replaceable

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
    check_replaceable(path, "save_mixed")  # a FIFO or device (/dev/null) is never replaced by a file
    data = save(tensors, metadata=meta)
    with atomic_write(path) as f:
        f.write(data)


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
