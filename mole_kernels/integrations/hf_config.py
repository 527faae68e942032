"""`MoleConfig`: a MoLE model's ``config.json`` as a transformers config (``model_type: "mole"``).

Shared by the transformers and vLLM integrations: both engines read a folder's ``config.json``
through transformers' ``AutoConfig``, which knows the type once :func:`register` has run. A folder
written by this package says ``"model_type": "mole"``, so transformers without this registration
refuses it ("unrecognized model type") instead of loading it as Llama. The official MoLE folders
say ``"model_type": "llama"`` with ``"architectures": ["MoleForCausalLM"]``; vLLM resolves them by
the architecture name. `to_mole_config` turns either into the core's `MoLEConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from transformers import AutoConfig, PretrainedConfig

from ..model.config import MoLEConfig

MODEL_TYPE = "mole"
_MOLE_KEYS = frozenset(f.name for f in fields(MoLEConfig))


def _base_keys() -> frozenset:
    return frozenset(PretrainedConfig().to_dict())
ARCHITECTURE = "MoleForCausalLM"


@dataclass(repr=False)
class MoleConfig(PretrainedConfig):
    """The hyper-parameters of :class:`~mole_kernels.MoLEConfig`, with the same names and defaults."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 50304
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: Optional[int] = None
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
    moe_intermediate_size: Optional[int] = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.to_mole_config()  # the core's checks, with its messages, at load time

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_mole_config(self) -> MoLEConfig:
        """The core's config (validated; keys it does not know are kept in its ``extra``)."""
        base = _base_keys()  # transformers' own bookkeeping keys are not MoLE hyper-parameters
        d = {k: v for k, v in self.to_dict().items() if k not in base or k in _MOLE_KEYS}
        return MoLEConfig.from_dict(d, source=type(self).__name__)

    @classmethod
    def from_mole_config(cls, cfg: MoLEConfig) -> "MoleConfig":
        return cls(**cfg.to_dict())


def register() -> None:
    """Makes ``AutoConfig`` read ``"model_type": "mole"`` folders (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MoleConfig, exist_ok=True)
