"""The baselines MoLE is measured against: the dense model with MoLE's activated parameters, and an
MoE with top-k experts whose weights can be offloaded to host memory."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import _is_expert_key
from .config import MoLEConfig
from .generation import _CausalLM
from .layers import _acc_dtype
from .mole import MoLEForCausalLM

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
