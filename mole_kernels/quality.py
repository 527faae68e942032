"""The quality gate: what a LUT format costs in perplexity on the user's model and text.

A format's cost is ``ppl(model with the format's LUT) / ppl(model with the reference LUT) - 1``,
measured teacher-forced on the user's token windows. The reference is the model's LUT rounded to
``base_dtype`` (bf16 by default: what an unquantized table stores). The quantized LUT is the
reference quantized and dequantized (:func:`mole_kernels.dequantize`: element for element what the
gathers return), so the measurement needs no kernel for the format on this machine.

Formats below 4 bits per value (``q3``, ``q2``, ``q1`` and mixed tables that use them) lose
quality on some models and not on others, so :meth:`MoLEForCausalLM.reparameterize` refuses them
unless the gate passed on the user's text (``max_cost=`` and ``quality_text=``) or the user
overrides (``check_quality=False``).
"""
from typing import Iterable, List, Optional

import torch

from ._progress import progress_bar

__all__ = ["LOW_BIT_FORMATS", "perplexity", "format_costs", "check_format", "QualityError"]

LOW_BIT_FORMATS = ("q3", "q2", "q1")


class QualityError(ValueError):
    """A format's measured perplexity cost exceeds the allowed maximum."""


def _windows(text: torch.Tensor) -> torch.Tensor:
    if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"quality: text must be token ids [N, S] (int32/int64, S >= 2), got "
                         f"{getattr(text, 'dtype', type(text))} {tuple(getattr(text, 'shape', ()))}")
    if text.shape[1] < 2 or text.shape[0] < 1:
        raise ValueError(f"quality: text must hold at least one window of 2 or more tokens, got {tuple(text.shape)}")
    return text.long()


@torch.no_grad()
def perplexity(model, text: torch.Tensor, *, batch: int = 8, progress: bool = False) -> float:
    """exp(mean next-token negative log-likelihood) of ``model`` over the windows ``text`` ``[N, S]``."""
    text = _windows(text)
    nll, count = 0.0, 0
    with progress_bar(text.shape[0], "perplexity", enabled=progress, unit="window") as bar:
        for i in range(0, text.shape[0], batch):
            x = text[i:i + batch].to(model.device)
            logits = model(x).logits.double()
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                                                     reduction="sum").item()
            count += x[:, 1:].numel()
            bar.update(x.shape[0])
    return float(torch.tensor(nll / count).exp())


def _lut_model(train, lut: torch.Tensor):
    from .table import LookupTable

    return train._inference_form(LookupTable.from_tensor(lut, "host", device=train.device))


def _variant_lut(variant, ref: torch.Tensor, counts: Optional[torch.Tensor]):
    """(name, bits per value, float32 LUT) of one variant of the reference LUT ``ref``."""
    from .mixed import MixedLUT, dequantize_mixed, is_plan, parse_plan, quantize_plan
    from .quant import QuantizedLUT, dequantize, quantize

    if isinstance(variant, (QuantizedLUT, MixedLUT)):
        q = variant
    elif is_plan(variant):  # a mixed plan in text: "norm:int8@64+f36x5"
        if counts is None:
            raise ValueError("quality: a mixed plan needs token counts (counts=)")
        q = quantize_plan(ref, counts, parse_plan(variant, ref.shape[-1]), progress=False)
    elif isinstance(variant, str):
        fmt, _, block = variant.partition("/")
        q = quantize(ref, fmt, int(block) if block else None, progress=False)
    else:  # a mixed plan: [(format, n, block), ...] or {"plan": [...], "normalize": bool}
        spec = variant if isinstance(variant, dict) else {"plan": variant}
        if set(spec) - {"plan", "normalize"} or "plan" not in spec:
            raise ValueError(f"quality: a mixed-plan dict has keys 'plan' and 'normalize', got {sorted(spec)}")
        if counts is None:
            raise ValueError("quality: a mixed plan needs token counts (counts=)")
        q = quantize_plan(ref, counts, {"plan": spec["plan"], "normalize": spec.get("normalize", False)}, progress=False)
    if isinstance(q, MixedLUT):
        return q.describe(), q.bits_per_value, dequantize_mixed(q, torch.float32)
    return f"{q.format}/{q.block_size}", q.bits_per_value, dequantize(q, torch.float32)


@torch.no_grad()
def format_costs(train, text: torch.Tensor, variants: Iterable, *, counts: Optional[torch.Tensor] = None,
                 base_dtype: torch.dtype = torch.bfloat16, lut: Optional[torch.Tensor] = None,
                 progress: bool = False) -> List[dict]:
    """The perplexity cost of each LUT variant on a train-form MoLE ``train`` and windows ``text``.

    ``variants``: format names (``"q2"``, ``"nf4/64"``: format/block size), QuantizedLUT/MixedLUT
    tables, or mixed plans (text, :func:`mole_kernels.mixed.parse_plan`: ``"norm:int8@64+f36x5"``, or
    ``[(format, n, block), ...]`` (see :func:`mole_kernels.mixed.quantize_mixed`;
    they need ``counts``, per-id token frequencies), or ``{"plan": [...], "normalize": True}`` for a
    column-normalised mixed table. ``lut``: the model's float LUT if already
    computed. Returns one dict per variant, the reference first: ``name``, ``bits`` (bits per value,
    every scale, padding and rank-map byte counted), ``ppl``, ``cost`` (relative to the reference).
    """
    text = _windows(text)
    lut32 = train.compute_lut(dtype=torch.float32, progress=progress) if lut is None else lut.float()
    ref = lut32.to(base_dtype)
    base = perplexity(_lut_model(train, ref.float()), text)
    rows = [dict(name=str(base_dtype).replace("torch.", ""), bits=8.0 * ref.element_size(), ppl=base, cost=0.0)]
    variants = list(variants)
    with progress_bar(len(variants), "quality: LUT formats", enabled=progress) as bar:
        for v in variants:
            name, bits, deq = _variant_lut(v, ref, counts)
            p = perplexity(_lut_model(train, deq), text)
            rows.append(dict(name=name, bits=bits, ppl=p, cost=p / base - 1.0))
            bar.update(1)
    return rows


def is_low_bit(format) -> bool:
    """Whether ``format`` (a format name, or a mixed plan: :func:`mole_kernels.mixed.parse_plan`'s text or
    dict) stores any row below 4 bits per value: a q3/q2/q1 or factored part."""
    from .factored import parse_factored_format
    from .mixed import is_plan, parse_plan

    if isinstance(format, dict) or is_plan(format):
        spec = parse_plan(format) if isinstance(format, str) else format
        return any(f in LOW_BIT_FORMATS or parse_factored_format(f) is not None for f, _, _ in spec["plan"])
    return format in LOW_BIT_FORMATS


def check_format(train, format, block_size: Optional[int], text: torch.Tensor, max_cost: float, *,
                 lut: Optional[torch.Tensor] = None, progress: bool = False) -> dict:
    """Measures ``format``'s cost (see :func:`format_costs`); :class:`QualityError` if it exceeds ``max_cost``
    (a fraction: 0.005 = +0.5 % perplexity). Returns the measured row. ``format``: a format name, or a
    table already made (a :class:`~mole_kernels.mixed.MixedLUT`: the gate measures exactly that table;
    ``block_size`` None)."""
    if not isinstance(max_cost, (int, float)) or isinstance(max_cost, bool) or not max_cost >= 0:
        raise ValueError(f"quality: max_cost must be a number >= 0 (a fraction: 0.005 = +0.5 %), got {max_cost!r}")
    spec = format if block_size is None else f"{format}/{block_size}"
    row = format_costs(train, text, [spec], lut=lut, progress=progress)[1]
    if row["cost"] > max_cost:
        name = row["name"] if not hasattr(format, "plan") else f"{format.plan} ({row['name']}, " \
                                                               f"{row['bits']:.3f} bits/value)"
        raise QualityError(f"quality gate: LUT format {name} costs {100 * row['cost']:+.3f} % perplexity on "
                           f"the given text, above max_cost = {100 * max_cost:.3f} %; choose a wider format "
                           "(or a larger max_cost)")
    return row
