"""The reference MoLE model, its re-parameterization into a LUT, and the baselines.

One concern per file:

- ``config.py``: :class:`MoLEConfig` (the official ``config.json`` names) and ``parse_dtype``;
- ``layers.py``: RMSNorm, the GELU MLP, rotary attention with a static KV cache, the decoder layer;
- ``generation.py``: the causal-LM base class (forward, loss, generation, the CUDA-graph step);
- ``mole.py``: :class:`MoLEForCausalLM`, train form and inference form (the LUT on any tier);
- ``baselines.py``: :class:`DenseForCausalLM` and :class:`MoEForCausalLM` (experts offloadable);
- ``checkpoints.py``: checkpoint folders in the official layout.
"""
from .baselines import DenseForCausalLM, MoEForCausalLM
from .checkpoints import LUT_KEY
from .mole import _check_lut_format  # noqa: F401  (the CLI checks a request before the long computation)
from .config import MoLEConfig, parse_dtype
from .generation import CausalLMOutput, GenerationOutput
from .layers import StaticKVCache
from .mole import MoLEForCausalLM

__all__ = [
    "MoLEConfig",
    "MoLEForCausalLM",
    "DenseForCausalLM",
    "MoEForCausalLM",
    "CausalLMOutput",
    "GenerationOutput",
    "StaticKVCache",
    "LUT_KEY",
    "parse_dtype",
]
