"""The reference MoLE model, its re-parameterization into a LUT, and the baselines.

Read top to bottom: the config; the building blocks (RMSNorm, rotary attention with
grouped-query heads and a static KV cache, the GELU MLP); one decoder layer that every
model kind shares; the causal-LM base class (forward, loss, generation with a KV cache and
an optional CUDA graph); :class:`MoLEForCausalLM` (train form and inference form,
``reparameterize``, checkpoints in the official layout); the dense and MoE-offload
baselines.

The architecture follows the official MoLE code (github.com/JieShibo/MoLE,
``modeling_mole.py`` / ``modeling_mole_rep.py``), layer ``l``::

    h = h + attn(input_layernorm(h))
    n = post_attention_layernorm(h)
    h = h + mlp(n) + sum_e softmax(router(n))_e * expert_e(expert_layernorm(embed(ids)))

The inference form replaces the expert term by rows of a ``[V, L, E, D]`` lookup table
(:class:`mole_kernels.table.LookupTable`): a prefetcher starts every layer's rows for the
step's ids before layer 0 and each layer calls
``mole_combine(router_logits, prefetch.layer(l), residual=h, shared=mlp_out)``.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._progress import progress_bar
from .quant import QuantizedLUT, canonical_format, dequantize, row_layout

__all__ = [
    "MoLEConfig",
    "MoLEForCausalLM",
    "DenseForCausalLM",
    "MoEForCausalLM",
    "CausalLMOutput",
    "GenerationOutput",
    "StaticKVCache",
]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
BIN_WEIGHTS = "pytorch_model.bin"
LUT_KEY = "model.moe_table.weight"
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are upcast to float32 (as the official code does); float64 stays float64 so
    # that a float64 copy of the model is a true high-precision reference.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- config ------------------


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
                     "num_key_value_heads", "num_experts", "moe_num_experts", "moe_top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MoLEConfig: {name} must be a positive int, got {v!r}")
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
        if not self.rms_norm_eps > 0:
            raise ValueError(f"MoLEConfig: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
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
        eos = kw.get("eos_token_id")
        if isinstance(eos, list):  # HF allows a list; the first is the one we stop on
            kw["eos_token_id"] = eos[0] if eos else None
        extra = {k: v for k, v in d.items() if k not in names}
        try:
            return cls(**kw, extra=extra)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.extra.items()}
        for f in fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        return d


# ---------------------------------------------------------------- building blocks ---------


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 for half inputs (as official)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(_acc_dtype(in_dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(in_dtype)


class MLP(nn.Module):
    """``down_proj(GELU(up_proj(x)))``: exact (erf) GELU, no biases — the shared MLP and each expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin ``[B, S, head_dim]`` for integer positions ``[B, S]`` (Llama's half-split layout)."""
    acc = _acc_dtype(dtype)
    dev = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=dev, dtype=torch.int64).to(acc) / head_dim))
    freqs = position_ids.to(acc)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class StaticKVCache:
    """Keys/values ``[L, B, Hkv, max_len, hd]`` plus which slots hold a real token (``valid [B, max_len]``).

    Shapes never change while decoding, so a decode step can be captured in a CUDA graph.
    Zero-initialised: unwritten slots are masked out, and 0 * weight never makes a NaN.
    """

    def __init__(self, cfg: MoLEConfig, batch: int, max_len: int, *, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Attention(nn.Module):
    """Rotary multi-head attention with grouped-query K/V heads (no biases)."""

    def __init__(self, cfg: MoLEConfig):
        super().__init__()
        D, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, hd
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)

    def forward(self, x, cos, sin, mask, cache: Optional[StaticKVCache] = None, layer: int = 0,
                cache_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S, _ = x.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, S, H, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, S, Hkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, S, Hkv, hd).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        if cache is not None:
            # index_copy_ with a tensor index: the same kernels every step (graph-capturable).
            cache.k[layer].index_copy_(2, cache_idx, k)
            cache.v[layer].index_copy_(2, cache_idx, v)
            k, v = cache.k[layer], cache.v[layer]
        if H != Hkv:  # repeat_kv (enable_gqa= needs torch 2.5)
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * hd))


def _attention_mask(q_idx: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, S, K]``: query at cache slot ``q_idx[s]`` sees valid keys at slots <= it.

    Every query also sees its own slot, so a left-padding query is never fully masked: its
    (unused) output stays finite, and so do the K/V it leaves in the cache (a NaN there would
    poison real tokens through 0 * NaN in the attention sum).
    """
    K = key_valid.shape[1]
    slots = torch.arange(K, device=q_idx.device)[None, :]
    causal = slots <= q_idx[:, None]  # [S, K]
    allowed = (causal[None] & key_valid[:, None, :]) | (slots == q_idx[:, None])[None]  # [B, S, K]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q_idx.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


class DecoderLayer(nn.Module):
    """One layer; ``kind`` picks the feed-forward part and so the state-dict names.

    - ``"mole"``: shared ``mlp``, ``router``, ``experts.{e}``, ``expert_layernorm`` (train form)
    - ``"mole_lut"``: shared ``mlp`` and ``router`` (re-parameterized form: experts are LUT rows)
    - ``"dense"``: ``mlp`` only
    - ``"moe"``: ``router`` and ``experts.{e}`` on the hidden state (top-k), no shared MLP
    """

    def __init__(self, cfg: MoLEConfig, kind: str):
        super().__init__()
        D = cfg.hidden_size
        self.kind = kind
        self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        if kind in ("mole", "mole_lut", "dense"):
            self.mlp = MLP(D, cfg.intermediate_size)
        if kind in ("mole", "mole_lut"):
            self.router = nn.Linear(D, cfg.num_experts, bias=False)
        if kind == "mole":
            self.experts = nn.ModuleList(MLP(D, cfg.intermediate_size) for _ in range(cfg.num_experts))
            self.expert_layernorm = RMSNorm(D, cfg.rms_norm_eps)
        if kind == "moe":
            self.router = nn.Linear(D, cfg.moe_num_experts, bias=False)
            self.experts = nn.ModuleList(MLP(D, cfg.moe_intermediate_size) for _ in range(cfg.moe_num_experts))


class _Backbone(nn.Module):
    """``model.*`` of the state dict: embeddings, layers, final norm."""

    def __init__(self, cfg: MoLEConfig, kind: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V] float32 (as the official code returns)
    loss: Optional[torch.Tensor] = None


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, S + n]: the (left-padded) prompt, then n <= max_new_tokens tokens
    logits: Optional[torch.Tensor] = None  # [B, n, V] float32, the logits each new token was chosen from


# ---------------------------------------------------------------- causal LM base ----------


class _CausalLM(nn.Module):
    """Shared forward / loss / generation; subclasses define the per-layer feed-forward term."""

    _kind = "dense"

    def __init__(self, config: MoLEConfig, *, init_std: float = 0.02, kind: Optional[str] = None):
        super().__init__()
        if kind is not None:
            self._kind = kind
        if not isinstance(config, MoLEConfig):
            raise ValueError(f"{type(self).__name__}: config must be a MoLEConfig, got {type(config).__name__}")
        self.config = config
        self.model = _Backbone(config, self._kind)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights(init_std)
        self._graphs: Dict[tuple, "_GraphStep"] = {}

    def _init_weights(self, std: float):
        # As the official _init_weights: normal(0, std) for Linear and Embedding, norms at 1.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # -- the network ---------------------------------------------------------------------

    def _ffn_context(self, input_ids: torch.Tensor, embeds: torch.Tensor, *, static: bool = False):
        return None

    def _ffn(self, l: int, layer: DecoderLayer, h: torch.Tensor, ctx) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _hidden(self, input_ids, position_ids, mask, cache=None, cache_idx=None, *, static=False):
        x = self.model.embed_tokens(input_ids)
        cos, sin = _rope(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        ctx = self._ffn_context(input_ids, x, static=static)  # MoLE: the prefetch starts here, before layer 0
        h = x
        for l, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, mask, cache, l, cache_idx)
            h = self._ffn(l, layer, h, ctx)
        return self.model.norm(h)

    def _check_ids(self, input_ids, where: str) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: input_ids must be an int32/int64 tensor [B, S]")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"{where}: input_ids must be [B, S] with S >= 1, got {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"{where}: input_ids are on {input_ids.device} but the model is on {self.device}")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"{where}: input_ids contains {lo if lo < 0 else hi}, outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        return input_ids.long()

    def _check_mask(self, attention_mask, input_ids, where: str) -> Optional[torch.Tensor]:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"{where}: attention_mask must be a tensor [B, S] of 0/1")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"{where}: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        m = attention_mask.to(self.device).bool()
        if not bool(m.any(dim=1).all()):
            raise ValueError(f"{where}: attention_mask has a row with no real token")
        return m

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """Logits ``[B, S, V]`` (float32) for a whole sequence; ``loss`` when ``labels`` are given.

        ``attention_mask`` (1 = token, 0 = padding) masks padded keys; positions count real
        tokens only (left padding works). ``labels`` use -100 for ignored positions and are
        shifted inside (token t predicts t+1), as in the official code.
        """
        input_ids = self._check_ids(input_ids, f"{type(self).__name__}.forward")
        B, S = input_ids.shape
        mask = self._check_mask(attention_mask, input_ids, f"{type(self).__name__}.forward")
        if mask is None:
            position_ids = torch.arange(S, device=self.device).expand(B, S)
            key_valid = torch.ones(B, S, dtype=torch.bool, device=self.device)
        else:
            position_ids = (mask.long().cumsum(-1) - 1).clamp_(min=0)
            key_valid = mask
        attn = _attention_mask(torch.arange(S, device=self.device), key_valid, self.dtype)
        logits = self.lm_head(self._hidden(input_ids, position_ids, attn)).float()
        loss = None
        if labels is not None:
            if tuple(labels.shape) != (B, S):
                raise ValueError(f"forward: labels must have shape {(B, S)}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    # -- generation ----------------------------------------------------------------------

    def _decode_step(self, cache: StaticKVCache, tok: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor,
                     static: bool) -> torch.Tensor:
        """One token per row: ``tok``/``pos`` ``[B]``, ``idx`` ``[1]`` the cache slot. Static shapes."""
        cache.valid.index_fill_(1, idx, True)
        attn = _attention_mask(idx, cache.valid, self.dtype)
        h = self._hidden(tok[:, None], pos[:, None], attn, cache, idx, static=static)
        return self.lm_head(h[:, -1]).float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 cuda_graph: bool = False, return_logits: bool = False):
        """Autoregressive generation with a static KV cache.

        Args:
            input_ids: ``[B, S]`` prompts, **left**-padded when their lengths differ.
            attention_mask: ``[B, S]`` 1 for tokens, 0 for (left) padding; None = no padding.
            max_new_tokens: how many tokens to generate at most.
            do_sample: sample (with ``temperature``, ``top_k`` (0 = off), ``top_p`` (1 = off),
                ``generator``) instead of greedy argmax.
            eos_token_id: a row stops at this token (default ``config.eos_token_id``); later
                slots of a stopped row hold ``pad_token_id``. Generation ends when every row stopped.
            pad_token_id: default ``config.pad_token_id``, else ``eos_token_id``, else 0.
            cuda_graph: capture the decode step in a CUDA graph and replay it (CUDA only).
            return_logits: return a :class:`GenerationOutput` with the per-step logits.

        Returns ``[B, S + n]`` token ids (or a :class:`GenerationOutput`).
        """
        name = f"{type(self).__name__}.generate"
        input_ids = self._check_ids(input_ids, name)
        mask = self._check_mask(attention_mask, input_ids, name)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"{name}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"{name}: temperature must be > 0 when sampling, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"{name}: top_p must be in (0, 1], got {top_p!r}")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"{name}: cuda_graph=True needs the model on a CUDA device (it is on {self.device})")
        B, S = input_ids.shape
        if mask is not None:
            # Left padding: once a row's tokens start they continue to the end.
            if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
                raise ValueError(f"{name}: attention_mask must be left-padded (0s before 1s in every row)")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = pad_token_id if pad_token_id is not None else self.config.pad_token_id
        pad = pad if pad is not None else (eos if eos is not None else 0)
        dev = self.device

        cache = StaticKVCache(self.config, B, S + max(max_new_tokens, 1), device=dev, dtype=self.dtype)
        valid = mask if mask is not None else torch.ones(B, S, dtype=torch.bool, device=dev)
        cache.valid[:, :S] = valid
        positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)
        slots = torch.arange(S, device=dev)
        attn = _attention_mask(slots, cache.valid, self.dtype)
        logits = self.lm_head(self._hidden(input_ids, positions, attn, cache, slots)[:, -1]).float()

        out_tokens: List[torch.Tensor] = []
        out_logits: List[torch.Tensor] = []
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        pos = valid.long().sum(-1)  # the next token's position in each row
        idx = torch.tensor([S], device=dev)
        step = self._graph_step(cache, B) if cuda_graph else None
        for i in range(max_new_tokens):
            if return_logits:
                out_logits.append(logits)
            tok = _choose(logits, do_sample, temperature, top_k, top_p, generator)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            out_tokens.append(tok)
            if eos is not None:
                finished |= tok == eos
                if bool(finished.all()):  # one synchronisation per step, only when eos is set
                    break
            if i == max_new_tokens - 1:
                break
            if step is not None:
                logits = step(tok, idx, pos)
            else:
                logits = self._decode_step(cache, tok, idx, pos, static=False)
            idx += 1
            pos += 1
        seq = torch.cat([input_ids] + [t[:, None] for t in out_tokens], dim=1)
        if return_logits:
            lg = torch.stack(out_logits, 1) if out_logits else logits.new_zeros(B, 0, logits.shape[-1])
            return GenerationOutput(sequences=seq, logits=lg)
        return seq

    def _graph_step(self, cache: StaticKVCache, B: int) -> "_GraphStep":
        return _GraphStep(self, cache, B)


def _choose(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _GraphStep:
    """The decode step captured once in a CUDA graph over static input buffers, then replayed."""

    def __init__(self, model: _CausalLM, cache: StaticKVCache, B: int):
        self.model, self.cache = model, cache
        dev = model.device
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.graph = None
        self.out = None

    def __call__(self, tok, idx, pos) -> torch.Tensor:
        self.tok.copy_(tok)
        self.idx.copy_(idx)
        self.pos.copy_(pos)
        if self.graph is None:
            # Warm up on a side stream (lazy allocations, Triton compiles), then capture. The
            # warm-up computes this very step; replaying it rewrites the same cache slot.
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self.model._decode_step(self.cache, self.tok, self.idx, self.pos, static=True)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.model._decode_step(self.cache, self.tok, self.idx, self.pos, static=True)
        self.graph.replay()
        return self.out.clone()


# ---------------------------------------------------------------- checkpoints -------------


def _read_config(path: str, where: str) -> MoLEConfig:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: {path!r} is not a directory (expected a Hugging Face-format folder "
                                f"with {CONFIG_NAME} and {SAFE_WEIGHTS} or {BIN_WEIGHTS})")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{where}: {path!r} has no {CONFIG_NAME}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: {cfg_path} is not valid JSON ({e})") from None
    return MoLEConfig.from_dict(d, source=f"{where}: {cfg_path}")


def _weight_files(path: str, where: str) -> List[str]:
    """The weight files of a folder: single or sharded (``*.index.json``), safetensors preferred."""
    for single, index in ((SAFE_WEIGHTS, SAFE_WEIGHTS + ".index.json"), (BIN_WEIGHTS, BIN_WEIGHTS + ".index.json")):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
        ipath = os.path.join(path, index)
        if os.path.isfile(ipath):
            try:
                with open(ipath, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{where}: {ipath} is not a valid shard index ({e!r})") from None
            files = [os.path.join(path, s) for s in shards]
            for fpath in files:
                if not os.path.isfile(fpath):
                    raise FileNotFoundError(f"{where}: shard {fpath} listed in {ipath} is missing")
            return files
    raise FileNotFoundError(f"{where}: {path!r} has no {SAFE_WEIGHTS} or {BIN_WEIGHTS} (nor a sharded index)")


def _load_state_dict(files: List[str], where: str) -> Dict[str, torch.Tensor]:
    sd: Dict[str, torch.Tensor] = {}
    for fpath in files:
        try:
            if fpath.endswith(".safetensors"):
                from safetensors.torch import load_file

                part = load_file(fpath, device="cpu")
            else:
                part = torch.load(fpath, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which
            raise ValueError(f"{where}: cannot read weights from {fpath}: {e}") from e
        if not isinstance(part, dict):
            raise ValueError(f"{where}: {fpath} does not hold a state dict")
        sd.update(part)
    return sd


def _save_state_dict(sd: Dict[str, torch.Tensor], path: str, safe: bool) -> None:
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if safe:
        from safetensors.torch import save_file

        save_file(sd, os.path.join(path, SAFE_WEIGHTS), metadata={"format": "pt"})
    else:
        torch.save(sd, os.path.join(path, BIN_WEIGHTS))


# ---------------------------------------------------------------- MoLE --------------------


class MoLEForCausalLM(_CausalLM):
    """Mixture of Lookup Experts, in one of two forms.

    - **train form** (``MoLEForCausalLM(config)``): every layer computes its E experts on
      ``expert_layernorm(embed_tokens(ids))``; trains with ``loss.backward()``.
    - **inference form** (:meth:`reparameterize`, or :meth:`from_pretrained` of a
      re-parameterized folder): no experts; their outputs for every vocabulary entry are a
      ``[V, L, E, D]`` :class:`~mole_kernels.table.LookupTable` (:attr:`lut`) on the
      ``"device"``, ``"host"`` or ``"disk"`` tier, read by a prefetcher and combined by
      :func:`mole_kernels.mole_combine`. Inference only (no autograd through the LUT).
    """

    def __init__(self, config: MoLEConfig, *, reparameterized: bool = False, init_std: float = 0.02):
        super().__init__(config, init_std=init_std, kind="mole_lut" if reparameterized else "mole")
        self.lut = None  # the LookupTable of the inference form
        self._prefetchers: Dict[bool, object] = {}

    @property
    def is_reparameterized(self) -> bool:
        return self._kind == "mole_lut"

    # -- the expert term -----------------------------------------------------------------

    def _ffn_context(self, input_ids, embeds, *, static=False):
        if not self.is_reparameterized:
            return embeds
        if self.lut is None:
            raise RuntimeError("MoLEForCausalLM: the inference form has no LUT; call set_lut(table) "
                               "(or build it with reparameterize() / from_pretrained())")
        if self.lut.device != self.device:
            raise RuntimeError(f"MoLEForCausalLM: the LUT delivers rows to {self.lut.device} but the model is on "
                               f"{self.device}; rebuild the table with device={self.device}")
        ids = input_ids.reshape(-1)
        # Under graph capture nothing may synchronise: strict=False counts bad ids instead of raising
        # (ids were range-checked before generation began).
        return self._prefetcher(ids.numel(), strict=not static).start(ids)

    def _prefetcher(self, T: int, strict: bool):
        pf = self._prefetchers.get(strict)
        if pf is None or pf.max_tokens < T:
            pf = self.lut.prefetcher(max(T, 1), strict=strict)
            self._prefetchers[strict] = pf
        return pf

    def _ffn(self, l, layer, h, ctx):
        n = layer.post_attention_layernorm(h)
        logits = layer.router(n)
        shared = layer.mlp(n)
        if not self.is_reparameterized:
            # As the official layer: softmax in float32, cast to the hidden dtype, weighted sum.
            p = F.softmax(logits, dim=-1, dtype=_acc_dtype(shared.dtype)).to(shared.dtype)
            x = layer.expert_layernorm(ctx)
            experts = torch.stack([e(x) for e in layer.experts], dim=2)  # [B, S, E, D]
            return h + shared + (experts * p.unsqueeze(-1)).sum(dim=2)
        from .combine import mole_combine

        B, S, D = h.shape
        rows = ctx.layer(l)  # [T, E, D]: waits for this layer's rows only
        out = mole_combine(logits.reshape(B * S, -1), rows, residual=h.reshape(B * S, D),
                           shared=shared.reshape(B * S, D))
        return out.view(B, S, D)

    # -- re-parameterization -------------------------------------------------------------

    @torch.no_grad()
    def compute_lut(self, *, dtype=None, chunk_size: int = 4096, device=None, progress: bool = True,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every expert of every layer on every vocabulary entry: a ``[V, L, E, D]`` CPU tensor.

        ``LUT[v, l, e] = experts[l][e](expert_layernorm[l](embed_tokens.weight[v]))``, computed in
        the model's dtype (as the train form computes it) ``chunk_size`` entries at a time on
        ``device`` (default: the GPU when there is one, else the model's device), then rounded
        to ``dtype`` (default: the model's dtype). ``out``: a ``[V, L, E, D]`` tensor to fill.
        """
        if self.is_reparameterized:
            raise RuntimeError("compute_lut: this model is already the inference form (it has no experts)")
        cfg = self.config
        dtype = parse_dtype(dtype, "compute_lut: dtype") or self.dtype
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"compute_lut: chunk_size must be a positive int, got {chunk_size!r}")
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else self.device
        device = torch.device(device)
        V, L, E, D = cfg.lut_shape
        if out is None:
            out = torch.empty((V, L, E, D), dtype=dtype)
        elif tuple(out.shape) != (V, L, E, D):
            raise ValueError(f"compute_lut: out must have shape {(V, L, E, D)}, got {tuple(out.shape)}")
        bar = progress_bar(V * L, "reparameterizing", enabled=progress, unit="row")
        try:
            for l, layer in enumerate(self.model.layers):
                # One layer's experts at a time on the compute device (a big model need not fit there).
                norm = copy.deepcopy(layer.expert_layernorm).to(device)
                experts = copy.deepcopy(layer.experts).to(device)
                for a in range(0, V, chunk_size):
                    b = min(V, a + chunk_size)
                    x = norm(self.model.embed_tokens.weight[a:b].to(device))
                    res = torch.stack([e(x) for e in experts], dim=1)  # [n, E, D]
                    out[a:b, l].copy_(res.to(out.dtype), non_blocking=False)
                    bar.update(b - a)
                del norm, experts
        finally:
            bar.close()
        return out

    @torch.no_grad()
    def reparameterize(self, *, placement: str = "host", dtype=None, device=None, path: Optional[str] = None,
                       chunk_size: int = 4096, progress: bool = True, lut_format: Optional[str] = None,
                       block_size: Optional[int] = None) -> "MoLEForCausalLM":
        """The inference form of this (train-form) model, its LUT on ``placement``.

        Args:
            placement: ``"device"`` (VRAM), ``"host"`` (pinned RAM when CUDA is present) or
                ``"disk"`` (a memory-mapped safetensors file: ``path``, or an anonymous temp file).
            dtype: the LUT's dtype (float32/float16/bfloat16; default the model's dtype). For a
                quantized LUT: the dtype it is quantized from and its rows are dequantized to.
            device: where rows (and so the model's compute) land; default the model's device.
            chunk_size, progress: see :meth:`compute_lut` (a tqdm bar on stderr when importable).
            lut_format, block_size: store the LUT quantized (``"int8"``, ``"fp8"``/``"fp8_e4m3"``,
                ``"nf4"``; see :func:`mole_kernels.quantize`): every tier then holds and moves the
                quantized rows only, and the gather dequantizes them. None (default): a float LUT.

        The returned model shares every other weight with this one (no copy).
        """
        dtype = parse_dtype(dtype, "reparameterize: dtype") or self.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"reparameterize: dtype must be float32, float16 or bfloat16, got {dtype}")
        _check_lut_format(lut_format, block_size, self.config.hidden_size, "reparameterize")
        lut = self.compute_lut(dtype=dtype, chunk_size=chunk_size, progress=progress)
        from .table import LookupTable

        table = LookupTable.from_tensor(lut, placement, device=device if device is not None else self.device,
                                        path=path, format=lut_format, block_size=block_size)
        del lut
        return self._inference_form(table)

    def _inference_form(self, table) -> "MoLEForCausalLM":
        with torch.device("meta"):
            inf = MoLEForCausalLM(self.config, reparameterized=True)
        keep = {k: v for k, v in self.state_dict().items() if not _is_expert_key(k)}
        inf.load_state_dict(keep, strict=True, assign=True)  # assign=True: share, do not copy
        inf.train(self.training)
        inf.set_lut(table)
        return inf

    def set_lut(self, table) -> None:
        """Uses ``table`` (a LookupTable ``[V, L, E, D]`` matching the config) as the experts' outputs."""
        if not self.is_reparameterized:
            raise RuntimeError("set_lut: this is the train form; call reparameterize() to get the inference form")
        shape = tuple(getattr(table, "shape", ()))
        if shape != self.config.lut_shape:
            raise ValueError(f"set_lut: table must have shape [V, L, E, D] = {list(self.config.lut_shape)}, "
                             f"got {list(shape)}")
        self.lut = table
        self._prefetchers = {}

    # -- checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, placement: str = "host", lut_dtype=None,
                        lut_path: Optional[str] = None, lut_format: Optional[str] = None,
                        block_size: Optional[int] = None, lut_file: Optional[str] = None) -> "MoLEForCausalLM":
        """Loads a Hugging Face-format folder in the official MoLE layout (nothing is downloaded).

        The folder holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
        (or their sharded ``*.index.json`` forms). With ``model.layers.{i}.experts.*`` it is
        the train form; with ``model.moe_table.weight`` ``[V, L*E*D]`` the re-parameterized
        form, whose LUT goes to ``placement`` (as in :meth:`reparameterize`; ``lut_path`` for
        the disk tier's file) in ``lut_dtype`` (default: as stored), quantized on the way when
        ``lut_format`` (and optionally ``block_size``) is given.

        ``lut_file``: a :class:`~mole_kernels.table.LookupTable` file (``LookupTable.save``, or
        ``mole-kernels reparameterize --lut-file``; float or quantized) to use as the LUT instead
        of ``model.moe_table.weight``, which the folder then need not hold (the official layout
        has no quantized form, so a quantized LUT travels in such a file). It is opened on
        ``placement`` as it is (disk: mapped in place); ``lut_format``/``block_size``, if given,
        must match it, and ``lut_dtype``/``lut_path`` do not apply.

        ``dtype`` casts the other weights (default: as stored); ``device`` is where the model runs.
        """
        path = os.fspath(path)
        where = f"{cls.__name__}.from_pretrained"
        cfg = _read_config(path, where)
        if lut_file is not None and (lut_dtype is not None or lut_path is not None):
            raise ValueError(f"{where}: lut_dtype/lut_path apply to model.moe_table.weight, not to lut_file "
                             "(a LookupTable file is used as stored)")
        _check_lut_format(lut_format, block_size, cfg.hidden_size, where)
        sd = _load_state_dict(_weight_files(path, where), where)
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # older HF saves it
        dtype = parse_dtype(dtype, f"{where}: dtype")
        device = torch.device(device) if device is not None else torch.device("cpu")
        has_experts = any(_is_expert_key(k) for k in sd)
        has_lut = LUT_KEY in sd or lut_file is not None
        if has_experts and has_lut:
            raise ValueError(f"{where}: {path!r} holds experts but " + (f"lut_file={lut_file!r} was given" if
                             lut_file is not None else f"also {LUT_KEY}") + "; expected one form")
        if not has_experts and not has_lut:
            raise ValueError(f"{where}: {path!r} holds neither expert weights (model.layers.{{i}}.experts.{{e}}.*) "
                             f"nor {LUT_KEY}: not a MoLE checkpoint (a LUT kept elsewhere: pass lut_file=)")
        if has_experts and lut_format is not None:
            raise ValueError(f"{where}: lut_format applies to a re-parameterized folder; {path!r} is the train form "
                             "(call reparameterize(lut_format=...) on the loaded model)")
        lut = sd.pop(LUT_KEY, None)
        if lut_file is not None:
            lut = None  # the file replaces it (never read twice)
        if cfg.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        with torch.device("meta"):
            model = cls(cfg, reparameterized=has_lut)
        _check_state_dict(model, sd, where, path)
        sd = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.eval()
        from .table import LookupTable

        if lut_file is not None:
            table = LookupTable.open(lut_file, placement, device=device)
            try:
                if lut_format is not None and canonical_format(lut_format) != table.format:
                    raise ValueError(f"{where}: lut_format={lut_format!r} but {lut_file!r} holds a "
                                     f"{table.format or 'float'} table")
                if block_size is not None and block_size != table.block_size:
                    raise ValueError(f"{where}: block_size={block_size} but {lut_file!r} has block_size="
                                     f"{table.block_size}")
                model.set_lut(table)
            except ValueError:
                table.close()
                raise
        elif has_lut:
            V, L, E, D = cfg.lut_shape
            if tuple(lut.shape) not in ((V, L * E * D), (V, L, E, D)):
                raise ValueError(f"{where}: {LUT_KEY} has shape {list(lut.shape)}, expected [V, L*E*D] = "
                                 f"[{V}, {L * E * D}] for this config")
            lut = lut.reshape(V, L, E, D)
            lut_dtype = parse_dtype(lut_dtype, f"{where}: lut_dtype") or lut.dtype
            model.set_lut(LookupTable.from_tensor(lut.to(lut_dtype), placement, device=device, path=lut_path,
                                                  format=lut_format, block_size=block_size))
        return model

    def save_pretrained(self, path, *, lut_dtype=None, safe_serialization: bool = True) -> None:
        """Writes ``config.json`` and the weights in the official layout (train form: the experts;
        inference form: ``model.moe_table.weight`` ``[V, L*E*D]`` in ``lut_dtype``, default as held).

        The official layout has no quantized form: a quantized LUT is written dequantized (in
        ``lut_dtype``, default the dtype it was quantized from). To keep the quantized rows,
        also ``self.lut.save(file)`` and load with ``from_pretrained(..., lut_file=file)``."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        sd = dict(self.state_dict())
        if self.is_reparameterized:
            if self.lut is None:
                raise RuntimeError("save_pretrained: the inference form has no LUT to save")
            V, L, E, D = self.config.lut_shape
            lut = self.lut.tensor
            if isinstance(lut, QuantizedLUT):
                lut = dequantize(lut)
            lut_dtype = parse_dtype(lut_dtype, "save_pretrained: lut_dtype") or lut.dtype
            sd[LUT_KEY] = lut.reshape(V, L * E * D).to("cpu", lut_dtype)
        cfg = self.config.to_dict()
        cfg.setdefault("architectures", ["MoleForCausalLM"])
        cfg.setdefault("model_type", "llama")  # the official config class is LlamaConfig
        cfg["torch_dtype"] = str(self.dtype).replace("torch.", "")
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        _save_state_dict(sd, path, safe_serialization)


def _check_lut_format(lut_format: Optional[str], block_size, hidden: int, where: str) -> None:
    """Checks a LUT quantization request up front (before any expensive work); ValueError naming it."""
    if lut_format is None:
        if block_size is not None:
            raise ValueError(f"{where}: block_size={block_size!r} needs lut_format (a float LUT has no blocks)")
        return
    try:
        fmt = canonical_format(lut_format)
        if block_size is not None:
            row_layout(fmt, hidden, block_size)
    except ValueError as e:
        raise ValueError(f"{where}: lut_format={lut_format!r}, block_size={block_size!r}: {e}") from None


def _is_expert_key(k: str) -> bool:
    return ".experts." in k or k.endswith("expert_layernorm.weight")


def _check_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], where: str, path: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing {len(missing)} tensor(s), e.g. {missing[:4]}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:4]}")
        raise ValueError(f"{where}: {path!r} does not match its config.json: " + "; ".join(msg))
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{where}: {path!r}: tensor {k} has shape {list(sd[k].shape)}, the config needs "
                             f"{list(shape)}")
        if not sd[k].is_floating_point():
            raise ValueError(f"{where}: {path!r}: tensor {k} has dtype {sd[k].dtype}, expected a float type")


# ---------------------------------------------------------------- baselines ---------------


class DenseForCausalLM(_CausalLM):
    """The dense baseline: the same attention and shared MLP as MoLE, no experts.

    It has MoLE's activated parameters exactly (a MoLE model at inference computes no expert).
    """

    _kind = "dense"

    @classmethod
    def from_mole(cls, mole: MoLEForCausalLM) -> "DenseForCausalLM":
        """A dense model with ``mole``'s non-expert weights (shared, not copied)."""
        with torch.device("meta"):
            dense = cls(mole.config)
        sd = {k: v for k, v in mole.state_dict().items() if not _is_expert_key(k) and ".router." not in k}
        dense.load_state_dict(sd, strict=True, assign=True)
        return dense


@dataclass
class OffloadStats:
    """What the MoE baseline copied host -> device: bytes and expert copies since the last reset."""

    bytes_h2d: int = 0
    expert_copies: int = 0
    tokens: int = 0


class MoEForCausalLM(_CausalLM):
    """The MoE baseline: top-k routed experts on the hidden state, no shared expert.

    ``config.moe_num_experts`` experts of hidden size ``config.moe_intermediate_size`` (default
    ``intermediate_size // moe_top_k``, so the activated FFN equals MoLE's shared MLP), router
    softmax in float32, the top-k probabilities renormalised. :meth:`offload_experts` moves the
    experts to host memory (pinned when CUDA is present); each layer then copies in only the
    experts its tokens chose — the "MoE with offloading" MoLE is compared against.
    """

    _kind = "moe"

    def __init__(self, config: MoLEConfig, *, init_std: float = 0.02):
        super().__init__(config, init_std=init_std)
        self.offloaded = False
        self.offload_stats = OffloadStats()
        self._host: List[List[Tuple[torch.Tensor, torch.Tensor]]] = []
        self._stage: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @torch.no_grad()
    def offload_experts(self) -> None:
        """Moves every expert's weights to host memory; forward copies the chosen ones in."""
        pin = torch.cuda.is_available()
        self._host = []
        for layer in self.model.layers:
            per = []
            for e in layer.experts:
                up, down = e.up_proj.weight.detach().cpu(), e.down_proj.weight.detach().cpu()
                if pin:
                    up, down = up.pin_memory(), down.pin_memory()
                per.append((up, down))
                # The device copies are dropped: the module keeps empty placeholders.
                e.up_proj.weight = nn.Parameter(torch.empty(0, device=self.device, dtype=up.dtype), requires_grad=False)
                e.down_proj.weight = nn.Parameter(torch.empty(0, device=self.device, dtype=down.dtype),
                                                  requires_grad=False)
            self._host.append(per)
        cfg = self.config
        k = min(cfg.moe_num_experts, cfg.moe_top_k)  # staging slots, grown on demand
        self._stage = self._new_stage(k)
        self.offloaded = True

    def _new_stage(self, slots: int):
        cfg = self.config
        I, D = cfg.moe_intermediate_size, cfg.hidden_size
        return (torch.empty(slots, I, D, device=self.device, dtype=self.dtype),
                torch.empty(slots, D, I, device=self.device, dtype=self.dtype))

    @property
    def host_bytes(self) -> int:
        """Bytes of expert weights held in host memory (0 until :meth:`offload_experts`)."""
        return sum(u.numel() * u.element_size() + d.numel() * d.element_size() for per in self._host for u, d in per)

    def _ffn(self, l, layer, h, ctx):
        cfg = self.config
        B, S, D = h.shape
        x = layer.post_attention_layernorm(h).reshape(B * S, D)
        p = F.softmax(layer.router(x), dim=-1, dtype=_acc_dtype(x.dtype))
        w, sel = p.topk(cfg.moe_top_k, dim=-1)  # [T, k]
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        if self.offloaded:
            chosen = torch.unique(sel).tolist()  # which experts to copy in: a synchronisation, as in real offloading
            if self._stage[0].shape[0] < len(chosen):
                self._stage = self._new_stage(len(chosen))
            for slot, e in enumerate(chosen):
                up, down = self._host[l][e]
                su, sd = self._stage[0][slot], self._stage[1][slot]
                su.copy_(up, non_blocking=True)
                sd.copy_(down, non_blocking=True)
                self.offload_stats.bytes_h2d += up.numel() * up.element_size() + down.numel() * down.element_size()
                self.offload_stats.expert_copies += 1
                self._apply_expert(x, y, sel, w, e, lambda t: F.linear(F.gelu(F.linear(t, su)), sd))
            if l == 0:
                self.offload_stats.tokens += B * S
        else:
            for e, expert in enumerate(layer.experts):
                self._apply_expert(x, y, sel, w, e, expert)
        return h + y.view(B, S, D)

    @staticmethod
    def _apply_expert(x, y, sel, w, e, fn):
        tok, slot = (sel == e).nonzero(as_tuple=True)
        if tok.numel():
            y.index_add_(0, tok, fn(x[tok]) * w[tok, slot, None])

    def _graph_step(self, cache, B):
        if self.offloaded:
            raise ValueError("MoEForCausalLM.generate: cuda_graph=True is not possible with offloaded experts "
                             "(which experts to copy is decided on the host each step)")
        return super()._graph_step(cache, B)
