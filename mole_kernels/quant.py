"""Quantized lookup tables: int8, fp8 (e4m3), nf4 and 3/2/1-bit rows, dequantized inside the gather.

A :class:`QuantizedLUT` is one uint8 tensor ``data`` of shape ``[V, L, E, row_bytes]`` (or
``[V, E, row_bytes]``) plus four facts (format, dim, block size, the original dtype). It keeps
the float table's token-major row addressing: row ``(v, l, e)`` is ``data[v, l, e]``, and one
token's rows for all layers are one contiguous block. Each row is self-contained::

    [ D codes (int8/fp8: 1 byte each; nf4: 2 per byte, element 2k in the low nibble) ]
    [ pad to 4 ][ D // block_size float32 scales ][ pad to a multiple of 16 bytes ]

Scales live inside the row, not in a parallel array, so a zero-copy PCIe read, a disk read or a
staging copy of a token's rows is one contiguous stream of exactly the bytes needed (see
csrc/lut_gather_quant.h). Only these quantized bytes ever move; the gather dequantizes in
registers.

Formats and their round-trip error bounds (per element ``x`` of a finite table; ``s`` its scale):

- ``int8``: one symmetric scale per row, ``s = max|row| / 127``; ``|x - deq| <= s / 2``.
- ``fp8_e4m3`` (alias ``fp8``): per-block scale ``s = max|block| / 448`` then e4m3 rounding;
  ``|x - deq| <= |x| / 16 + s / 1024`` (half an ulp of a 3-bit mantissa; the subnormal step).
- ``nf4``: 4-bit NormalFloat levels times the block's absmax ``s``;
  ``|x - deq| <= 0.1519 * s`` (half the widest gap between levels, -1 to -0.696).

Low-bit codebook formats (``q3``, ``q2``, ``q1``: 3, 2 and 1 bits per value) pack their codes densely
and keep float16 scales, with no padding beyond 2-byte alignment of the scales::

    [ ceil(D * bits / 8) bytes: value j in bits [bits*j, bits*j + bits) of the little-endian bit stream ]
    [ pad to 2 ][ D // block_size float16 scales ]

A value decodes to ``s * LEVELS[code]`` with symmetric levels fitted to a normal distribution
(Lloyd-Max; no zero level: a zero wastes a code at these widths) normalised to a top level of 1:
``q3`` 8 levels, ``q2`` 4 levels, ``q1`` the sign (+-1). The scale of each block is chosen at encode
time to minimise the block's squared error (a grid of fractions of the block's absmax refined by
least-squares steps; for ``q1`` the exact optimum, the mean of ``|x|``), then rounded to float16, and the
codes are re-chosen for the rounded scale. So the error of a value is not bounded by half a step:
the top of a block may be clipped when that lowers the block's total error. Blocks whose scale rounds
below float16's smallest subnormal (2^-24) decode to zero; values whose scale overflows float16 are refused.

``s`` is the stored float32 scale (int8, fp8, nf4). For int8 and fp8 it is the quotient above rounded to the nearest
float32, except that a subnormal quotient (a block below ~1e-36) is rounded *up* (at least to the
smallest subnormal), so that its few significant bits never clip a value; and it is at most the
largest float32 whose product with the top code (127, 448) is finite, so dequantizing a table of
finite values never gives an infinity (near float32's maximum the cap clips the largest values by
about one float32 ulp). Each bound holds up to one float32 rounding of the product ``s * code``,
of the quotient ``x / s`` when encoding and of the scale itself.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ._ops import _C, check_fake_devices, check_gather_args, gather_shape, layer_span, ops
from ._progress import progress_bar

__all__ = ["FORMATS", "QuantizedLUT", "quantize", "dequantize", "quantized_lut_gather"]

# Low-bit codebook formats: name -> (bits per value, levels ascending (top = 1), default block size).
# The same numbers as kQ3Levels / kQ2Levels in csrc/lut_gather_lowbit.h.
LOWBIT = {
    "q3": (3, (-1.0, -0.6245400309562683, -0.3513011038303375, -0.11389870941638947,
               0.11389870941638947, 0.3513011038303375, 0.6245400309562683, 1.0), 128),
    "q2": (2, (-1.0, -0.29978814721107483, 0.29978814721107483, 1.0), 64),
    "q1": (1, (-1.0, 1.0), 64),
}
FORMATS = ("int8", "fp8_e4m3", "nf4") + tuple(LOWBIT)
_ALIASES = {"fp8": "fp8_e4m3"}
_FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MAX = 448.0
# The 16 NF4 levels (QLoRA / bitsandbytes); the same numbers as kNf4Levels in csrc/lut_gather_quant.h.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# Relative error bounds stated above (tests check them).
ERROR_BOUNDS = {"int8": "s/2, s = max|row|/127", "fp8_e4m3": "|x|/16 + s/1024, s = max|block|/448",
                "nf4": "0.1519*s, s = max|block|",
                **{k: "no per-value bound: float16 scales minimise each block's squared error" for k in LOWBIT}}
_META_PREFIX = "mole_kernels."
LAYOUT_VERSION = "rows-v1"
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def canonical_format(format: str) -> str:
    """The canonical name of a format ('fp8' -> 'fp8_e4m3'); ValueError for an unknown one."""
    name = _ALIASES.get(format, format) if isinstance(format, str) else format
    if name not in FORMATS:
        raise ValueError(f"quantize: unknown format {format!r}; expected one of {FORMATS} (or 'fp8')")
    return name


def default_block_size(format: str, dim: int) -> int:
    """int8: the row (dim). fp8: 128, nf4: 64, q3: 128, q2 and q1: 64 when that divides dim, else dim."""
    name = canonical_format(format)
    _check_dim(dim)
    preferred = LOWBIT[name][2] if name in LOWBIT else {"int8": dim, "fp8_e4m3": 128, "nf4": 64}[name]
    return preferred if dim % preferred == 0 else dim


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is not a block size


def _check_dim(dim) -> None:
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"quantize: dim (values per row, D) must be a positive int, got {dim!r}")


def row_layout(format: str, dim: int, block_size: int) -> Tuple[int, int, int]:
    """(payload_bytes, scale_offset, row_bytes) of one quantized row; checks dim and block_size."""
    name = canonical_format(format)
    _check_dim(dim)
    if not _is_int(block_size) or block_size < 1 or dim % block_size:
        raise ValueError(f"quantize: block_size must divide D = {dim} (a positive int), got {block_size!r}")
    if name == "int8" and block_size != dim:
        raise ValueError(f"quantize: int8 has one scale per row, so block_size must be None or D = {dim}, "
                         f"got {block_size}")
    if name in LOWBIT:  # dense codes, float16 scales, no row padding (see the module docstring)
        payload = -(-dim * LOWBIT[name][0] // 8)
        scale_offset = payload + payload % 2
        return payload, scale_offset, scale_offset + 2 * (dim // block_size)
    payload = (dim + 1) // 2 if name == "nf4" else dim
    scale_offset = -(-payload // 4) * 4
    row_bytes = -(-(scale_offset + 4 * (dim // block_size)) // 16) * 16
    return payload, scale_offset, row_bytes


def scale_dtype(format: str) -> torch.dtype:
    """The dtype of a format's stored scales: float16 for the low-bit formats, else float32."""
    return torch.float16 if canonical_format(format) in LOWBIT else torch.float32


def bits_per_value(format: str, dim: int, block_size: Optional[int] = None) -> float:
    """Stored bits per table value, every scale and padding byte counted (one row / D)."""
    name = canonical_format(format)
    block = default_block_size(name, dim) if block_size is None else block_size
    return 8.0 * row_layout(name, dim, block)[2] / dim


@dataclass(frozen=True, eq=False)
class QuantizedLUT:
    """A quantized lookup table: packed rows ``data`` (uint8 ``[V, L, E, row_bytes]`` or ``[V, E, row_bytes]``).

    ``format``/``dim``/``block_size`` say how to decode a row; ``dtype`` is the float dtype the
    table was quantized from (the default result dtype of :func:`dequantize` and the gather).
    ``data`` is an ordinary tensor: move it, pin it, memory-map it or slice rows out of it.
    """

    data: torch.Tensor
    format: str
    dim: int
    block_size: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        object.__setattr__(self, "format", canonical_format(self.format))
        _, _, row_bytes = row_layout(self.format, self.dim, self.block_size)
        d = self.data
        if not isinstance(d, torch.Tensor) or d.dtype != torch.uint8 or d.dim() not in (3, 4):
            raise ValueError("QuantizedLUT: data must be a uint8 tensor [V, L, E, row_bytes] or [V, E, row_bytes], "
                             f"got {getattr(d, 'dtype', type(d))} {tuple(getattr(d, 'shape', ()))}")
        if d.shape[-1] != row_bytes:
            raise ValueError(f"QuantizedLUT: data rows are {d.shape[-1]} bytes, but format {self.format!r} with "
                             f"dim={self.dim}, block_size={self.block_size} needs {row_bytes} bytes per row "
                             "(do the metadata and the payload disagree?)")
        if self.dtype not in _FLOAT_DTYPES.values():
            raise ValueError(f"QuantizedLUT: dtype must be float32, float16 or bfloat16, got {self.dtype}")

    # ---- shape and bytes ----
    @property
    def shape(self) -> Tuple[int, ...]:
        """The logical (dequantized) shape: ``[V, L, E, D]`` or ``[V, E, D]``."""
        return (*self.data.shape[:-1], self.dim)

    @property
    def vocab_size(self) -> int:
        return self.data.shape[0]

    @property
    def num_layers(self) -> int:
        return self.data.shape[1] if self.data.dim() == 4 else 1

    @property
    def num_experts(self) -> int:
        return self.data.shape[-2]

    @property
    def row_bytes(self) -> int:
        return self.data.shape[-1]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's rows for all layers (what a full prefetch moves)."""
        return self.num_layers * self.num_experts * self.row_bytes

    @property
    def bytes_per_token_layer(self) -> int:
        """Bytes of one token's rows for one layer (what the fused gather reads)."""
        return self.num_experts * self.row_bytes

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    # ---- placement (data is the only tensor) ----
    def _with(self, data: torch.Tensor) -> "QuantizedLUT":
        return QuantizedLUT(data, self.format, self.dim, self.block_size, self.dtype)

    def to(self, *args, **kwargs) -> "QuantizedLUT":
        """Moves the packed bytes (a dtype argument is refused: the bytes are not numbers)."""
        data = self.data.to(*args, **kwargs)
        if data.dtype != torch.uint8:
            raise ValueError("QuantizedLUT.to: only the device can change; use dequantize(q, dtype) for floats")
        return self._with(data)

    def pin_memory(self) -> "QuantizedLUT":
        """A copy in pinned host memory, read in place by the CUDA gather (zero-copy)."""
        return self._with(self.data.pin_memory())

    def is_pinned(self) -> bool:
        return self.data.is_pinned()

    @property
    def bits_per_value(self) -> float:
        """Stored bits per value, scales and padding included."""
        return 8.0 * self.row_bytes / self.dim

    def scales(self) -> torch.Tensor:
        """The scales ``[V, L, E, D // block_size]`` as float32 (a copy; for inspection and tests)."""
        return _scales(self.data, self.format, self.dim, self.block_size)

    # ---- files (safetensors: one uint8 tensor + string metadata) ----
    def metadata(self) -> Dict[str, str]:
        """String metadata that, with ``data``, fully describes the table (safetensors-ready)."""
        return {
            _META_PREFIX + "format": self.format,
            _META_PREFIX + "dim": str(self.dim),
            _META_PREFIX + "block_size": str(self.block_size),
            _META_PREFIX + "dtype": str(self.dtype).replace("torch.", ""),
            _META_PREFIX + "layout": LAYOUT_VERSION,
        }

    @staticmethod
    def is_quantized_metadata(metadata: Optional[Dict[str, str]]) -> bool:
        return bool(metadata) and (_META_PREFIX + "format") in metadata

    @classmethod
    def from_metadata(cls, data: torch.Tensor, metadata: Dict[str, str], *,
                      check_sample: bool = True) -> "QuantizedLUT":
        """Rebuilds a table from ``data`` and :meth:`metadata`; ValueError when they disagree.

        ``check_sample``: also run :meth:`check_sample` on the first and last tokens' rows (off
        for data that cannot be read yet, e.g. a ``meta``-device tensor checked for shape only).
        """
        def get(key):
            if _META_PREFIX + key not in metadata:
                raise ValueError(f"QuantizedLUT: metadata lacks {_META_PREFIX + key!r} (got keys {sorted(metadata)})")
            return metadata[_META_PREFIX + key]

        layout = get("layout")
        if layout != LAYOUT_VERSION:
            raise ValueError(f"QuantizedLUT: unsupported layout {layout!r} (this version reads {LAYOUT_VERSION!r})")
        dtype_name = get("dtype")
        if dtype_name not in _FLOAT_DTYPES:
            raise ValueError(f"QuantizedLUT: metadata dtype must be one of {sorted(_FLOAT_DTYPES)}, got {dtype_name!r}")
        try:
            dim, block = int(get("dim")), int(get("block_size"))
        except ValueError as e:
            raise ValueError(f"QuantizedLUT: metadata dim/block_size must be integers: {e}") from None
        q = cls(data, get("format"), dim, block, _FLOAT_DTYPES[dtype_name])
        if check_sample:
            q.check_sample()
        return q

    def check_sample(self, tokens: int = 16) -> None:
        """Cheap consistency check of the first and last ``tokens`` tokens' rows (a table in a file
        is not read in full): padding bytes are zero and scales are finite and >= 0. ValueError if not."""
        payload, off, row_bytes = row_layout(self.format, self.dim, self.block_size)
        end = off + scale_dtype(self.format).itemsize * (self.dim // self.block_size)
        V = self.vocab_size
        idx = sorted(set(range(min(V, tokens))) | set(range(max(0, V - tokens), V)))
        rows = self.data[idx].cpu()
        s = _scales(rows, self.format, self.dim, self.block_size)
        unused = 0  # low-bit formats: the bits after the last code in the last payload byte are zero too
        if self.format in LOWBIT and (self.dim * LOWBIT[self.format][0]) % 8:
            unused = (rows[..., payload - 1] >> ((self.dim * LOWBIT[self.format][0]) % 8)) != 0
        if (rows[..., payload:off] != 0).any() or (rows[..., end:] != 0).any() or bool(torch.as_tensor(unused).any()):
            raise ValueError(f"QuantizedLUT: padding bytes of {self!r} are not zero: the payload was not "
                             "written with this format/dim/block_size (metadata and payload disagree)")
        if not (torch.isfinite(s).all() and (s >= 0).all()):
            raise ValueError(f"QuantizedLUT: scales of {self!r} are not finite and >= 0: the payload was not "
                             "written with this format/dim/block_size (metadata and payload disagree)")

    def __repr__(self):
        return (f"QuantizedLUT(format={self.format!r}, shape={list(self.shape)}, block_size={self.block_size}, "
                f"dtype={self.dtype}, row_bytes={self.row_bytes}, bytes_per_token={self.bytes_per_token}, "
                f"device={self.device}{', pinned' if self.data.device.type == 'cpu' and self.is_pinned() else ''})")


def quantized_layout(shape, format: str, block_size: Optional[int], dtype: torch.dtype) -> QuantizedLUT:
    """The :class:`QuantizedLUT` a float table of ``shape`` ``[..., D]`` in ``dtype`` quantizes to,
    over a meta payload (no memory): canonical format, default block size, row bytes. What a tier
    that is filled chunk by chunk allocates and names before any row exists."""
    fmt = canonical_format(format)
    D = shape[-1]
    block = default_block_size(fmt, D) if block_size is None else block_size
    payload = torch.empty((*shape[:-1], row_layout(fmt, D, block)[2]), dtype=torch.uint8, device="meta")
    return QuantizedLUT(payload, fmt, D, block, dtype)


# ---------------------------------------------------------------------------------------------
# quantize / dequantize (vectorised torch, in chunks of tokens so temporaries stay small)

_CHUNK_ELEMENTS = 1 << 24  # float32 values per chunk (64 MB of temporaries)


def _largest_scale(top_code: float) -> float:
    """The largest float32 ``s`` whose float32 product with ``top_code`` is finite."""
    inf = torch.tensor(math.inf)
    s = torch.tensor(torch.finfo(torch.float32).max / top_code, dtype=torch.float32)
    while not torch.isfinite(s * top_code):
        s = torch.nextafter(s, -inf)
    while torch.isfinite(torch.nextafter(s, inf) * top_code):
        s = torch.nextafter(s, inf)
    return s.item()


_MAX_SCALE = {"int8": _largest_scale(127.0), "fp8_e4m3": _largest_scale(_FP8_MAX)}


def _scale(amax: torch.Tensor, top_code: float, fmt: str) -> torch.Tensor:
    """``amax / top_code`` in float32, subnormal quotients rounded up, capped at ``_MAX_SCALE[fmt]``
    (see the module docstring)."""
    s = amax / top_code
    exact = amax.double() / top_code
    up = torch.where(s.double() < exact, torch.nextafter(s, torch.full_like(s, math.inf)), s)
    return torch.where(s < torch.finfo(torch.float32).tiny, up, s).clamp_(max=_MAX_SCALE[fmt])


def _scales(rows: torch.Tensor, fmt: str, dim: int, block: int) -> torch.Tensor:
    """The scales of uint8 rows ``[..., row_bytes]`` as float32 ``[..., dim // block]``."""
    _, off, _ = row_layout(fmt, dim, block)
    sd = scale_dtype(fmt)
    return rows[..., off:off + sd.itemsize * (dim // block)].contiguous().view(sd).float()


# The scale search of the low-bit formats: fractions of the block's absmax tried as the scale (the
# top level is 1), then least-squares refinements s = <x, c> / <c, c> for the chosen codes c.
_SCALE_GRID = tuple(0.30 + 0.025 * i for i in range(29))  # 0.30 .. 1.00
_REFINE_STEPS = 2


def _nearest(xn: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ascending ``levels``) for each value of ``xn`` (int64)."""
    return torch.bucketize(xn, (levels[1:] + levels[:-1]) / 2)


def _fit_lowbit(xb: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The float32 scale ``[..., nb, 1]`` minimising ``sum (x - s * levels[nearest(x / s)])^2`` per block
    of ``xb`` ``[..., nb, block]`` (over a grid plus refinements; exact for two levels).

    The levels are symmetric, so a value's error depends on ``|x|`` only, and for a scale ``s`` the
    values with ``|x|`` between two thresholds ``s * t_k`` (the midpoints of the level magnitudes
    ``m_k``) take level ``m_k``. So each block's ``|x|`` is sorted once and every candidate scale's
    error ``sum x^2 - 2 s sum_k m_k S_k + s^2 sum_k m_k^2 N_k`` (``S_k``, ``N_k``: sum and count of the
    ``|x|`` in bucket k) comes from a binary search of the thresholds and prefix sums (float64), not a
    pass over the block's values."""
    ax = xb.abs()
    if len(levels) == 2:  # sign: the optimum is the mean magnitude
        return ax.mean(-1, keepdim=True)
    amax = ax.amax(-1, keepdim=True)
    safe = torch.where(amax > 0, amax, 1.0)
    mags = levels[len(levels) // 2:].double()  # ascending magnitudes m_k
    thresholds = ((levels[1:] + levels[:-1]) / 2)[len(levels) // 2:]  # float32 t_k, as _nearest compares
    lead, block = ax.shape[:-1], ax.shape[-1]
    srt = ax.reshape(-1, block).sort(-1).values
    prefix = torch.nn.functional.pad(srt.double().cumsum(-1), (1, 0))  # prefix[i] = sum of the i smallest
    sumsq = (srt.double() ** 2).sum(-1, keepdim=True)

    def moments(s):
        """sum_k m_k S_k and sum_k m_k^2 N_k for the candidate scales ``s`` [rows, G] (float32)."""
        edges = torch.searchsorted(srt, (s.unsqueeze(-1) * thresholds).flatten(1), right=True)  # |x| <= s t_k: below
        edges = torch.cat([torch.zeros_like(s, dtype=torch.int64).unsqueeze(-1), edges.view(*s.shape, -1),
                           torch.full_like(s, block, dtype=torch.int64).unsqueeze(-1)], -1)
        p = prefix.gather(1, edges.flatten(1)).view(edges.shape)
        sums, counts = p.diff(dim=-1), edges.diff(dim=-1).double()
        return (sums * mags).sum(-1), (counts * mags * mags).sum(-1)

    def err_of(s):
        xc, cc = moments(s)
        return sumsq - 2 * s.double() * xc + s.double() ** 2 * cc, xc, cc

    flat_safe = safe.reshape(-1, 1)
    cand = torch.cat([flat_safe] + [flat_safe * f for f in _SCALE_GRID], 1)  # the start (absmax) and the grid
    err, xc, cc = err_of(cand)
    pick = err.argmin(-1, keepdim=True)  # the first of equal errors, as a strict "better" scan keeps
    best_s, best_err, best_xc, best_cc = (t.gather(1, pick) for t in (cand, err, xc, cc))
    best_s = torch.where(pick == 0, amax.reshape(-1, 1), best_s)
    for _ in range(_REFINE_STEPS):  # least squares for the codes of the best scale: s = <|x|, m> / <m, m>
        s = (best_xc / best_cc).float().clamp_(min=0)
        err, xc, cc = err_of(torch.where(s > 0, s, 1.0))
        better = (err < best_err) & (s > 0)
        best_s, best_err, best_xc, best_cc = (torch.where(better, a, b) for a, b in
                                              ((s, best_s), (err, best_err), (xc, best_xc), (cc, best_cc)))
    return torch.where(amax > 0, best_s.view(*lead, 1), 0.0)


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[..., D]`` (< 2^bits) -> the little-endian bit stream ``[..., ceil(D * bits / 8)]`` uint8."""
    D = codes.shape[-1]
    g = torch.nn.functional.pad(codes.to(torch.int64), (0, -D % 8)).unflatten(-1, (-1, 8))
    word = sum(g[..., k] << (bits * k) for k in range(8))  # 8 codes = `bits` whole bytes
    out = torch.stack([(word >> (8 * i)) & 255 for i in range(bits)], -1).flatten(-2).to(torch.uint8)
    return out[..., :-(-D * bits // 8)]


def _unpack_bits(payload: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of :func:`_pack_bits`: int64 codes ``[..., dim]``."""
    n = payload.shape[-1]
    b = torch.nn.functional.pad(payload.to(torch.int64), (0, -n % bits)).unflatten(-1, (-1, bits))
    word = sum(b[..., i] << (8 * i) for i in range(bits))
    codes = torch.stack([(word >> (bits * k)) & ((1 << bits) - 1) for k in range(8)], -1).flatten(-2)
    return codes[..., :dim]


def _encode_lowbit(x: torch.Tensor, fmt: str, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    bits, levels, _ = LOWBIT[fmt]
    levels = torch.tensor(levels, dtype=torch.float32, device=x.device)
    xb = x.unflatten(-1, (x.shape[-1] // block, block))
    s = _fit_lowbit(xb, levels).to(torch.float16)
    if torch.isinf(s).any():
        raise ValueError(f"quantize: format {fmt!r} stores float16 scales, and a block's scale exceeds float16's "
                         f"range (|values| up to {x.abs().max().item():.4g}); use int8/fp8/nf4 for this table")
    s32 = s.float()
    codes = _nearest(torch.where(s32 > 0, xb / s32, 0.0), levels).flatten(-2)
    return _pack_bits(codes, bits), s.squeeze(-1)


def _encode(x: torch.Tensor, fmt: str, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 [..., D] -> (codes uint8 [..., payload_bytes], scales [..., D // block] in scale_dtype(fmt))."""
    D = x.shape[-1]
    if fmt in LOWBIT:
        return _encode_lowbit(x, fmt, block)
    xb = x.unflatten(-1, (D // block, block))
    amax = xb.abs().amax(-1, keepdim=True)
    if fmt == "int8":
        s = _scale(amax, 127.0, fmt)
        q = torch.where(s > 0, xb / s, 0.0).round_().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        return q.flatten(-2), s.squeeze(-1)
    if fmt == "fp8_e4m3":
        s = _scale(amax, _FP8_MAX, fmt)
        y = torch.where(s > 0, xb / s, 0.0).clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8).view(torch.uint8)
        return y.flatten(-2), s.squeeze(-1)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=x.device)
    xn = torch.where(amax > 0, xb / amax, 0.0).flatten(-2)
    codes = torch.bucketize(xn, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # nearest level
    if D % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4), amax.squeeze(-1)


def _decode(rows: torch.Tensor, fmt: str, dim: int, block: int) -> torch.Tensor:
    """uint8 rows [..., row_bytes] -> float32 [..., dim]: scale * code, one float32 rounding (as the kernels)."""
    return _dequant(rows[..., :row_layout(fmt, dim, block)[0]], _scales(rows, fmt, dim, block), fmt, dim, block)


def _dequant(p: torch.Tensor, s: torch.Tensor, fmt: str, dim: int, block: int) -> torch.Tensor:
    """The codes ``p`` (uint8 [..., payload_bytes]) and float32 scales ``s`` [..., dim // block] of rows ->
    float32 [..., dim] (aten ops only: also what inductor compiles, see combine._lut_combine_quant_decomposed)."""
    nb = dim // block
    if fmt in LOWBIT:
        bits, levels, _ = LOWBIT[fmt]
        x = torch.tensor(levels, dtype=torch.float32, device=p.device)[_unpack_bits(p, bits, dim)]
    elif fmt == "int8":
        x = p.view(torch.int8).float()
    elif fmt == "fp8_e4m3":
        x = p.view(_FP8).float()
    else:
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=p.device)
        shifts = torch.tensor([0, 4], dtype=torch.uint8, device=p.device)  # broadcast, not stacked: no copy in inductor
        codes = ((p.unsqueeze(-1) >> shifts) & 15).flatten(-2)[..., :dim]
        x = levels[codes.long()]
    return (x.unflatten(-1, (nb, block)) * s[..., None]).flatten(-2)


def quantize(lut: torch.Tensor, format: str, block_size: Optional[int] = None, *,
             progress: Optional[bool] = None, first_token: int = 0) -> QuantizedLUT:
    """Quantizes a float table ``[V, L, E, D]`` (or ``[V, E, D]``) into a :class:`QuantizedLUT`.

    Args:
        lut: float32/float16/bfloat16 table, any device (the result is on the same device).
        format: ``"int8"`` (per-row scale), ``"fp8_e4m3"``/``"fp8"`` (per-block scale), ``"nf4"``, or
            below 4 bits ``"q3"``, ``"q2"``, ``"q1"`` (float16 scales chosen to minimise each block's
            squared error; see the module docstring and :mod:`mole_kernels.quality` for their cost).
        block_size: values per scale; must divide D. Default: :func:`default_block_size`
            (int8: D; fp8: 128; nf4: 64; q3: 128; q2, q1: 64; D itself where those do not divide it).
        progress: show a tqdm bar (if tqdm is installed). Default: only for tables over 2^28 values.
        first_token: ``lut`` is a chunk of a larger table starting at this token (only error
            messages use it: a non-finite value is named by its index in the whole table).

    The error bounds per format are in this module's docstring. Non-finite values are refused.
    """
    fmt = canonical_format(format)
    if not isinstance(lut, torch.Tensor) or lut.dim() not in (3, 4):
        raise ValueError(f"quantize: lut must be a tensor [V, L, E, D] or [V, E, D], got "
                         f"{tuple(lut.shape) if isinstance(lut, torch.Tensor) else type(lut)}")
    if lut.dtype not in _FLOAT_DTYPES.values():
        raise ValueError(f"quantize: lut must be float32, float16 or bfloat16, got {lut.dtype}")
    if fmt == "fp8_e4m3" and _FP8 is None:
        raise ValueError(f"quantize: fp8_e4m3 needs torch.float8_e4m3fn (torch >= 2.1); this is torch {torch.__version__}")
    D = lut.shape[-1]
    block = default_block_size(fmt, D) if block_size is None else block_size
    _, off, row_bytes = row_layout(fmt, D, block)
    V = lut.shape[0]
    data = torch.zeros(*lut.shape[:-1], row_bytes, dtype=torch.uint8, device=lut.device)
    per_token = max(1, math.prod(lut.shape[1:]))
    chunk = max(1, (_CHUNK_ELEMENTS // (8 if fmt in LOWBIT else 1)) // per_token)  # the scale search: more temporaries
    if lut.numel() == 0:  # nothing to encode (V = 0 or E = 0)
        return QuantizedLUT(data, fmt, D, block, lut.dtype)
    show = lut.numel() > (1 << 28) if progress is None else progress
    bar = progress_bar(V, f"quantize {fmt}", enabled=show, unit="tok", unit_scale=True)
    try:
        for v0 in range(0, V, chunk):
            x = lut[v0:v0 + chunk].float()
            if not torch.isfinite(x).all():
                bad = (~torch.isfinite(x)).nonzero()[0]
                raise ValueError(f"quantize: lut has a non-finite value at index "
                                 f"{(first_token + v0 + bad[0].item(), *bad[1:].tolist())}")
            codes, scales = _encode(x, fmt, block)
            rows = data[v0:v0 + chunk]
            rows[..., :codes.shape[-1]] = codes
            rows[..., off:off + scales.element_size() * scales.shape[-1]] = scales.contiguous().view(torch.uint8)
            bar.update(x.shape[0])
    finally:
        bar.close()
    return QuantizedLUT(data, fmt, D, block, lut.dtype)


def dequantize(q: QuantizedLUT, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float table ``[V, L, E, D]`` a :class:`QuantizedLUT` stands for (default dtype: ``q.dtype``).

    Element for element equal to what :func:`quantized_lut_gather` returns for the rows.
    """
    if not isinstance(q, QuantizedLUT):
        raise ValueError(f"dequantize: expected a QuantizedLUT, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    chunk = max(1, _CHUNK_ELEMENTS // max(1, math.prod(q.shape[1:])))
    for v0 in range(0, q.vocab_size, chunk):
        out[v0:v0 + chunk] = _decode(q.data[v0:v0 + chunk], q.format, q.dim, q.block_size).to(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# the gather

@torch.library.register_fake("mole_kernels::lut_gather_quant")
def _lut_gather_quant_fake(data, format, dim, block_size, ids, weights=None, layer=None, dtype=None, layer_end=None):
    check_fake_devices("lut_gather_quant", data, ids, weights=weights)
    return ids.new_empty(gather_shape(data, ids, weights, layer, dim, layer_end), dtype=dtype or torch.float32)


@torch.library.register_fake("mole_kernels::lut_gather_quant_out")
def _lut_gather_quant_out_fake(out, data, format, dim, block_size, ids, weights=None, layer=None,
                               accumulate=False, faults=None, layer_end=None):
    check_fake_devices("lut_gather_quant", data, ids, weights=weights, out=out, faults=faults)
    want = gather_shape(data, ids, weights, layer, dim, layer_end)
    torch._check(tuple(out.shape) == tuple(want), lambda: f"lut_gather_quant: out must have shape {want}")
    return None


def quantized_lut_gather(
    q: QuantizedLUT,
    ids: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    layer=None,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    faults: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """:func:`mole_kernels.lut_gather` for a :class:`QuantizedLUT`: same forms, same arguments.

    Rows (``weights=None``): dequantized ``[*, L, E, D]`` (``[*, E, D]`` for one layer), equal to
    ``dequantize(q, dtype)[ids]``. Fused: ``sum_e weights[..., e] * row[..., layer, e, :]`` ``[*, D]``,
    accumulated in float32. ``dtype`` (default ``q.dtype``) is the result dtype when ``out`` is
    not given. ``out``/``accumulate``/``faults`` behave as in ``lut_gather``. ``q.data`` may be on
    the GPU, pinned in host memory (read in place by the CUDA kernel: zero-copy, quantized bytes
    only), or an ordinary CPU tensor (CPU kernel).
    """
    if not isinstance(q, QuantizedLUT):
        raise ValueError(f"quantized_lut_gather: q must be a QuantizedLUT (see mole_kernels.quantize), "
                         f"got {type(q).__name__}; use mole_kernels.lut_gather for a float table")
    check_gather_args("quantized_lut_gather", q.data, ids, weights, out, accumulate, faults)
    if dtype is not None and dtype not in _FLOAT_DTYPES.values():
        raise ValueError(f"quantized_lut_gather: dtype must be float32, float16 or bfloat16 (or None), got {dtype!r}")
    if accumulate and out is None:
        raise ValueError("quantized_lut_gather: accumulate=True needs out= (the tensor to add into)")
    layer, layer_end = layer_span(layer, q.num_layers, "quantized_lut_gather")
    if out is None:
        dtype = q.dtype if dtype is None else dtype
        if faults is None:
            if not torch.compiler.is_compiling():  # plain CPU eager: the op's own CPU function, past the dispatcher
                result = _C._lut_gather_quant(q.data, q.format, q.dim, q.block_size, ids, weights, layer, dtype,
                                              layer_end)
                if result is not NotImplemented:
                    return result
            return ops.lut_gather_quant(q.data, q.format, q.dim, q.block_size, ids, weights, layer, dtype, layer_end)
        out = ids.new_empty(gather_shape(q.data, ids, weights, layer, q.dim, layer_end), dtype=dtype)
    elif dtype is not None and dtype != out.dtype:
        raise ValueError(f"quantized_lut_gather: dtype={dtype} disagrees with out.dtype={out.dtype}")
    ops.lut_gather_quant_out(out, q.data, q.format, q.dim, q.block_size, ids, weights, layer, accumulate, faults,
                             layer_end)
    return out
