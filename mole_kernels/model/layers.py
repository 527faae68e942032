"""The building blocks every model kind shares: RMSNorm, the GELU MLP, rotary attention with
grouped-query heads and a static KV cache, one decoder layer, the backbone (``model.*``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoLEConfig

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are upcast to float32 (as the official code does); float64 stays float64 so
    # that a float64 copy of the model is a true high-precision reference.
    return torch.float64 if dtype == torch.float64 else torch.float32


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

    def __init__(self, cfg: MoLEConfig, batch: int, max_len: int, *, device, dtype, num_kv_heads: Optional[int] = None):
        # num_kv_heads: the heads this process computes (a tensor-parallel rank holds Hkv / N); default all.
        heads = cfg.num_key_value_heads if num_kv_heads is None else num_kv_heads
        shape = (cfg.num_hidden_layers, batch, heads, max_len, cfg.head_dim)
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
