"""`MoLEConfig`: the hyper-parameters, with the names of the official (Llama-style) ``config.json``;
and `parse_dtype`, the one reader of dtype names for the model and the command line."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Tuple

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(dtype, what: str = "dtype") -> Optional[torch.dtype]:
    """``torch.float16``, ``"fp16"``, ``"bfloat16"``, ... -> a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise ValueError(f"{what} must be a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


_F32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32
_F32_MAX = torch.finfo(torch.float32).max
# Rotary inverse frequencies reach 1 / rope_theta; at 2**64 times any position a cache can hold they
# stay finite in float32.
_MIN_ROPE_THETA = 2.0 ** -64


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a size


def _check_positive_int(name: str, v) -> None:
    if not _is_int(v) or v < 1:
        raise ValueError(f"MoLEConfig: {name} must be a positive int, got {v!r}")


def _check_real(name: str, v, lo: float, hi: float, why: str) -> None:
    try:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise ValueError(f"MoLEConfig: {name} must be a finite number in [{lo:.3g}, {hi:.3g}], got {v!r} ({why})")


@dataclass
class MoLEConfig:
    """Hyper-parameters, with the names of the official (Llama-style) ``config.json``.

    ``num_experts`` is the number of MoLE routed experts per layer (all used, softmax-weighted).
    ``moe_*`` fields only matter for the MoE baseline (top-k experts on the hidden state).
    """

    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: Optional[int] = None  # None: = num_attention_heads (no GQA)
    num_experts: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    moe_num_experts: int = 10
    moe_top_k: int = 2
    moe_intermediate_size: Optional[int] = None  # None: intermediate_size // moe_top_k
    extra: Dict[str, object] = field(default_factory=dict)  # unknown config.json keys, kept on save

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "num_experts", "moe_num_experts", "moe_top_k",
                     "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.moe_intermediate_size is not None:
            _check_positive_int("moe_intermediate_size", self.moe_intermediate_size)
        # Both are used in float32 (RMSNorm and rotary frequencies of half models are computed in
        # float32): outside these ranges they round to 0 or overflow, and the logits become NaN.
        _check_real("rms_norm_eps", self.rms_norm_eps, _F32_TINY, _F32_MAX,
                    "a smaller eps is 0 in float32, and a zero hidden state then normalises to 0/0 = NaN")
        _check_real("rope_theta", self.rope_theta, _MIN_ROPE_THETA, math.inf,
                    "a smaller base makes the rotary frequencies overflow float32 into inf/NaN")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v < self.vocab_size):
                raise ValueError(f"MoLEConfig: {name} must be None or an int in [0, vocab_size={self.vocab_size}), "
                                 f"got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"MoLEConfig: tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"MoLEConfig: extra must be a dict, got {type(self.extra).__name__}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"MoLEConfig: hidden_size={self.hidden_size} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"MoLEConfig: num_attention_heads={self.num_attention_heads} must be divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"MoLEConfig: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.moe_top_k > self.moe_num_experts:
            raise ValueError(f"MoLEConfig: moe_top_k={self.moe_top_k} exceeds moe_num_experts={self.moe_num_experts}")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = max(1, self.intermediate_size // self.moe_top_k)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def lut_shape(self) -> Tuple[int, int, int, int]:
        """``[V, L, E, D]`` of the re-parameterized table."""
        return (self.vocab_size, self.num_hidden_layers, self.num_experts, self.hidden_size)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "MoLEConfig":
        """Reads an official ``config.json`` dict (unknown keys are kept in ``extra``)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: must be a JSON object, got {type(d).__name__}")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing}")
        rope_scaling = d.get("rope_scaling")
        if rope_scaling not in (None, {}):
            raise ValueError(f"{source}: rope_scaling={rope_scaling!r} is not supported (the official MoLE "
                             "checkpoints use plain rotary embeddings)")
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: d[k] for k in names if k in d}
        extra = {k: v for k, v in d.items() if k not in names}
        eos = kw.get("eos_token_id")
        if isinstance(eos, list):  # HF allows a list; the first is the one we stop on
            kw["eos_token_id"] = eos[0] if eos else None
        try:
            cfg = cls(**kw, extra=extra)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        for i, e in enumerate(eos if isinstance(eos, list) else ()):  # the others must be token ids too
            if not _is_int(e) or not 0 <= e < cfg.vocab_size:
                raise ValueError(f"{source}: MoLEConfig: eos_token_id[{i}] must be an int in [0, vocab_size="
                                 f"{cfg.vocab_size}), got {e!r}")
        return cfg

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.extra.items()}
        for f in fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        return d
