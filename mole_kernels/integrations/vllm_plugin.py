"""The ``vllm.general_plugins`` entry point (pyproject.toml): vLLM calls :func:`register` in each of its
processes at start-up. It imports nothing of vLLM's model code: the MoLE model module
(:mod:`mole_kernels.integrations.vllm`) is registered by name and imported only when a MoLE folder
is served."""
from __future__ import annotations

ARCHITECTURES = {  # config.json's "architectures" -> the class vLLM serves it with
    "MoleForCausalLM": "mole_kernels.integrations.vllm:MoleForCausalLM",
    "MoleDenseForCausalLM": "mole_kernels.integrations.vllm:MoleDenseForCausalLM",  # the benchmarks' baseline
}


def register() -> None:
    """Registers the MoLE architectures with vLLM and the ``"model_type": "mole"`` config with transformers'
    AutoConfig (folders this package writes say "mole"; the official ones say "llama": both are served)."""
    from vllm import ModelRegistry

    from .hf_config import register as register_config

    register_config()
    known = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)
