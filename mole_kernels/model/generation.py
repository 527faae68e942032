"""The causal-LM base class every model kind shares: forward, loss, generation with a static
KV cache, and the decode step captured in a CUDA graph."""
from __future__ import annotations

import importlib
import logging
import math
import sys
import types
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..combine import enable_inductor_decomposition
from .config import MoLEConfig, _is_int
from .layers import DecoderLayer, StaticKVCache, _attention_mask, _Backbone, _rope

@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V] float32 (as the official code returns)
    loss: Optional[torch.Tensor] = None


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, S + n]: the (left-padded) prompt, then n <= max_new_tokens tokens
    logits: Optional[torch.Tensor] = None  # [B, n, V] float32, the logits each new token was chosen from


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
        self._compiled_step = None  # _decode_step through torch.compile, made on first use

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

    def _ffn_context(self, input_ids: torch.Tensor, embeds: torch.Tensor):
        return None

    def _ffn(self, l: int, layer: DecoderLayer, h: torch.Tensor, ctx) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _hidden(self, input_ids, position_ids, mask, cache=None, cache_idx=None):
        x = self.model.embed_tokens(input_ids)
        cos, sin = _rope(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        ctx = self._ffn_context(input_ids, x)  # MoLE: the step's rows start here, before layer 0
        h = x
        for l, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, mask, cache, l, cache_idx)
            h = self._ffn(l, layer, h, ctx)
        return self.model.norm(h)

    def _check_ids(self, input_ids, where: str) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"{where}: input_ids must be an int32/int64 tensor [B, S], got {got}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or 0 in input_ids.shape:  # an empty batch has nothing to run
            raise ValueError(f"{where}: input_ids must be [B, S] with B >= 1 and S >= 1, got {tuple(input_ids.shape)}")
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
        m = attention_mask.to(self.device)
        if m.dtype != torch.bool:  # 0.5 or 2 is not "token" or "padding"
            if m.dtype.is_complex or not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"{where}: attention_mask must hold only 0 and 1 (or be bool), got a {m.dtype} "
                                 "tensor with other values")
            m = m.bool()
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

    def _decode_step(self, cache: StaticKVCache, tok: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row: ``tok``/``pos`` ``[B]``, ``idx`` ``[1]`` the cache slot. Static shapes."""
        cache.valid.index_fill_(1, idx, True)
        attn = _attention_mask(idx, cache.valid, self.dtype)
        h = self._hidden(tok[:, None], pos[:, None], attn, cache, idx)
        return self.lm_head(h[:, -1]).float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 cuda_graph: bool = False, compile_step: bool = False, return_logits: bool = False):
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
            compile_step: run the decode step through ``torch.compile`` (inductor; compiled once per
                model and cache length, which takes seconds): it fuses the many tiny ops that
                dominate a small model's step on a CPU (measured in bench/RESULTS.md).
            return_logits: return a :class:`GenerationOutput` with the per-step logits.

        Returns ``[B, S + n]`` token ids (or a :class:`GenerationOutput`).
        """
        name = f"{type(self).__name__}.generate"
        input_ids = self._check_ids(input_ids, name)
        mask = self._check_mask(attention_mask, input_ids, name)
        _check_generate_args(name, self.config.vocab_size, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id, generator=generator, cuda_graph=cuda_graph,
                             compile_step=compile_step, return_logits=return_logits)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"{name}: cuda_graph=True needs the model on a CUDA device (it is on {self.device})")
        if cuda_graph and compile_step:
            raise ValueError(f"{name}: choose one of cuda_graph=True and compile_step=True")
        B, S = input_ids.shape
        if mask is not None:
            # Left padding: once a row's tokens start they continue to the end.
            if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
                raise ValueError(f"{name}: attention_mask must be left-padded (0s before 1s in every row)")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = pad_token_id if pad_token_id is not None else self.config.pad_token_id
        pad = pad if pad is not None else (eos if eos is not None else 0)
        dev = self.device

        cache = self._new_cache(B, S + max(max_new_tokens, 1))
        step = self._graph_step(cache, B) if cuda_graph else None  # before any work: it says if it cannot be
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
            elif compile_step:
                logits = self._compiled_decode_step()(cache, tok, idx, pos)
            else:
                logits = self._decode_step(cache, tok, idx, pos)
            idx += 1
            pos += 1
        seq = torch.cat([input_ids] + [t[:, None] for t in out_tokens], dim=1)
        if return_logits:
            lg = torch.stack(out_logits, 1) if out_logits else logits.new_zeros(B, 0, logits.shape[-1])
            return GenerationOutput(sequences=seq, logits=lg)
        return seq

    def _new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        """The KV cache of a generation: as many K/V heads as the attention modules compute (a
        tensor-parallel rank computes only its own heads)."""
        kv_heads = self.model.layers[0].self_attn.num_kv_heads
        return StaticKVCache(self.config, batch, max_len, device=self.device, dtype=self.dtype, num_kv_heads=kv_heads)

    def _graph_step(self, cache: StaticKVCache, B: int) -> "_GraphStep":
        return _GraphStep(self, cache, B)

    def _compiled_decode_step(self):
        """``_decode_step`` through torch.compile, made once per model (inductor caches the code)."""
        if self._compiled_step is None:
            import_cpp_extension_quietly()
            enable_inductor_decomposition()  # lut_combine as inductor's own fused code, not a dispatcher call
            # Dynamo keeps its compiled graphs on the code object, which every model's _decode_step shares:
            # each call of one model would first fail the guards of every model compiled before it (at the
            # demo shape a MoLE step compiled after the dense one ran ~20 % longer), and all of them would
            # share one recompile limit. A copy of the code per model gives each model its own cache.
            fn = type(self)._decode_step
            own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                     fn.__closure__)
            self._compiled_step = torch.compile(types.MethodType(own, self), dynamic=False)
        return self._compiled_step


def _check_generate_args(name: str, vocab: int, *, max_new_tokens, do_sample, temperature, top_k, top_p,
                         eos_token_id, pad_token_id, generator, cuda_graph, compile_step, return_logits) -> None:
    """ValueError naming the argument for any of generate()'s options outside its domain (a bool is
    not a count, NaN is not a temperature)."""
    def is_real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for flag, v in (("do_sample", do_sample), ("cuda_graph", cuda_graph), ("compile_step", compile_step),
                    ("return_logits", return_logits)):
        if not isinstance(v, bool):
            raise ValueError(f"{name}: {flag} must be a bool, got {v!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{name}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not is_real(temperature) or (do_sample and not temperature > 0):
        raise ValueError(f"{name}: temperature must be a finite number (> 0 when sampling), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"{name}: top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"{name}: top_p must be a number in (0, 1], got {top_p!r}")
    for tok, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if v is not None and (not _is_int(v) or not 0 <= v < vocab):
            raise ValueError(f"{name}: {tok} must be None or an int in [0, vocab_size={vocab}), got {v!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{name}: generator must be a torch.Generator or None, got {type(generator).__name__}")


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
                self.model._decode_step(self.cache, self.tok, self.idx, self.pos)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.model._decode_step(self.cache, self.tok, self.idx, self.pos)
        self.graph.replay()
        return self.out.clone()


def import_cpp_extension_quietly() -> None:
    """Imports torch.utils.cpp_extension (inductor does, when it first compiles) without the line its
    import logs on a machine with a CUDA toolkit but no GPU, "No CUDA runtime is found, using
    CUDA_HOME=...": a warning about a toolkit that a CPU step never uses."""
    if "torch.utils.cpp_extension" in sys.modules or torch.cuda.is_available():
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.setLevel(level)
