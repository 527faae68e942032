"""MoLE as a Hugging Face transformers model: `MoleForCausalLM` (a ``PreTrainedModel`` with
``GenerationMixin``), registered with ``AutoConfig`` / ``AutoModelForCausalLM`` on import.

    import mole_kernels.integrations.hf  # registers model_type "mole"
    model = AutoModelForCausalLM.from_pretrained(folder, lut_placement="disk")
    model.generate(**tokenizer("Hello", return_tensors="pt"), streamer=TextStreamer(tokenizer))

Written against transformers ``>=5.16.1,<5.20`` (the range pyproject's ``hf`` extra pins).

- **Built from the core.** The model holds a core model (:class:`~mole_kernels.MoLEForCausalLM`,
  either form, or a baseline such as :class:`~mole_kernels.DenseForCausalLM`) and runs its layers
  (``_CausalLM._hidden``): the same attention, MLP and fused LUT call, the same bits as
  ``MoLEForCausalLM.generate``. Its ``model.*`` and ``lm_head`` are the core's modules, so the
  state dict has the official names.
- **The LUT is never a parameter or buffer.** :meth:`MoleForCausalLM.from_pretrained` loads
  through :meth:`MoLEForCausalLM.from_pretrained`: the LUT is a
  :class:`~mole_kernels.table.LookupTable` on the tier the user names (``lut_placement``), opened
  in place on disk, so loading has the core's memory bounds. :meth:`save_pretrained` writes through
  the core too (the LUT streamed from its tier).
- **Folders.** Ours say ``"model_type": "mole"`` (transformers without this module refuses them).
  The official ones say ``"model_type": "llama"`` with ``"architectures": ["MoleForCausalLM"]``:
  ``AutoModelForCausalLM`` maps "llama" to Llama and we cannot change those files, so load them
  with this module's ``MoleForCausalLM.from_pretrained(folder)`` (which reads ``config.json``
  itself); saving such a model writes a "mole" folder.
- **The KV cache** is :class:`MoleKVCache`: the core's static cache (every layer's keys and values
  preallocated, slots marked valid), sized by ``generate`` as the core's ``generate`` sizes it, grown
  when a caller feeds more tokens; it supports beam reordering and cropping.

transformers version differences handled here: 5.19 passes and reads ``past_key_values`` (later
5.x releases ``cache``: both are accepted and returned); ``generate`` drops an all-ones mask (None
is causal); it builds ``position_ids`` from the mask because ``forward`` accepts them.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from ..model import MoLEForCausalLM, parse_dtype
from ..model.generation import _CausalLM
from ..model.layers import StaticKVCache, _attention_mask
from .hf_config import ARCHITECTURE, MoleConfig
from .hf_config import register as _register_config

SUPPORTED = ">=5.16.1,<5.20"  # the transformers versions this module was written and tested against


def _version_tuple(v: str):
    return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())


if not (5, 16, 1) <= _version_tuple(transformers.__version__) < (5, 20):
    warnings.warn(f"mole_kernels.integrations.hf was written for transformers{SUPPORTED}; transformers "
                  f"{transformers.__version__} is installed (pip install 'transformers{SUPPORTED}')", stacklevel=2)

# Keyword arguments AutoModel*.from_pretrained passes on (hub options, bookkeeping): a local folder
# needs none of them.
_PASSED_BY_AUTO = frozenset({"_from_auto", "trust_remote_code", "adapter_kwargs", "revision", "cache_dir",
                             "force_download", "local_files_only", "token", "proxies", "subfolder",
                             "code_revision", "_commit_hash", "use_safetensors", "low_cpu_mem_usage"})
_CACHE_BLOCK = 64  # slots a cache grows by at least when fed beyond its size (generate sizes it once)


class MoleKVCache(Cache):
    """The core's :class:`~mole_kernels.StaticKVCache` as a transformers ``Cache``.

    Keys and values live in preallocated ``[L, B, Hkv, slots, hd]`` buffers; ``valid`` marks the
    slots holding a real (not padding) token; :attr:`length` tokens have been seen. ``generate``
    sizes it once (:meth:`MoleForCausalLM._prepare_cache_for_generation`); fed more tokens than
    it holds it grows by copying into larger buffers.
    """

    is_compileable = False

    def __init__(self, core: _CausalLM, batch_size: int, max_len: int = 0):
        super().__init__(layers=[])
        self._core = core
        self._batch = batch_size
        self.length = 0
        self.static: Optional[StaticKVCache] = core._new_cache(batch_size, max_len) if max_len else None

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def max_len(self) -> int:
        return 0 if self.static is None else self.static.max_len

    def __len__(self):
        return self._core.config.num_hidden_layers

    def __repr__(self):
        return f"MoleKVCache(batch={self._batch}, length={self.length}, slots={self.max_len})"

    def reserve(self, n: int) -> StaticKVCache:
        """The buffers, with room for ``n`` tokens: made for exactly ``n`` (a first forward attends over
        the same keys as the core's forward: the same bits), grown by a block at least later."""
        if n > self.max_len:
            old = self.static
            size = n if old is None else max(n, old.max_len + _CACHE_BLOCK)
            self.static = self._core._new_cache(self._batch, size)
            if old is not None:
                m = self.length
                self.static.k[:, :, :, :m] = old.k[:, :, :, :m]
                self.static.v[:, :, :, :m] = old.v[:, :, :, :m]
                self.static.valid[:, :m] = old.valid[:, :m]
        return self.static

    # -- the Cache API generate uses ----------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # grows on demand

    def reset(self):
        self.length = 0
        if self.static is not None:
            self.static.valid.zero_()

    def crop(self, tokens_to_remove: int):
        """Forgets the last ``-tokens_to_remove`` tokens (0 or less, as transformers 5.x calls it); a
        positive value (older releases) is the number of tokens to keep."""
        n = tokens_to_remove
        keep = max(self.length + n, 0) if n <= 0 else min(n, self.length)
        if self.static is not None:
            self.static.valid[:, keep:] = False
        self.length = keep

    def batch_select_indices(self, indices: torch.Tensor):
        if self.static is not None:
            s = self.static
            indices = indices.to(s.valid.device)
            s.k, s.v = s.k.index_select(1, indices), s.v.index_select(1, indices)
            s.valid = s.valid.index_select(0, indices)
        self._batch = int(indices.numel())

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        idx = torch.arange(self._batch).repeat_interleave(repeats)
        self.batch_select_indices(idx)


@dataclass
class MoleCausalLMOutput(ModelOutput):
    """``logits`` ``[B, S, V]`` float32 (the last ``logits_to_keep`` positions), ``loss`` when labels
    were given, and the cache under both names transformers 5.x reads."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Optional[MoleKVCache] = None
    cache: Optional[MoleKVCache] = None


class MolePreTrainedModel(PreTrainedModel):
    config_class = MoleConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        pass  # the core initialises its own weights (as the official code does); loading never re-initialises


class MoleForCausalLM(MolePreTrainedModel, GenerationMixin):
    """A MoLE model (train form, or inference form with its LUT on any tier) for transformers.

    ``MoleForCausalLM(config)`` builds a seeded-by-torch train-form model with random weights;
    :meth:`from_pretrained` loads a folder (ours or the official layout) and :meth:`from_model`
    wraps a core model already in memory (``MoLEForCausalLM`` in either form, or a baseline such as
    ``DenseForCausalLM``, which the benchmarks compare through the same class).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoleConfig, core: Optional[_CausalLM] = None):
        if not isinstance(config, MoleConfig):
            raise ValueError(f"MoleForCausalLM: config must be a MoleConfig, got {type(config).__name__}")
        super().__init__(config)
        if core is None:
            core = MoLEForCausalLM(config.to_mole_config())
        elif not isinstance(core, _CausalLM):
            raise ValueError(f"MoleForCausalLM: core must be a mole_kernels model (MoLEForCausalLM, "
                             f"DenseForCausalLM, ...), got {type(core).__name__}")
        # The core's modules are this model's children (state-dict names model.* and lm_head.*, as the
        # official files); the core itself is kept out of the module tree (its names would be core.*).
        self.model = core.model
        self.lm_head = core.lm_head
        self.__dict__["core"] = core
        self.post_init()

    # -- building ----------------------------------------------------------------------

    @classmethod
    def from_model(cls, core: _CausalLM) -> "MoleForCausalLM":
        """Wraps a core model in memory (sharing its weights and LUT; nothing copied)."""
        if not isinstance(core, _CausalLM):
            raise ValueError(f"MoleForCausalLM.from_model: expected a mole_kernels model, got {type(core).__name__}")
        model = cls(MoleConfig.from_mole_config(core.config), core=core)
        model.train(core.training)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, lut_placement=None,
                        lut_file=None, lut_dtype=None, lut_format=None, block_size=None, lut_path=None, dtype=None,
                        torch_dtype=None, device=None, device_map=None, **kwargs) -> "MoleForCausalLM":
        """Loads a local model folder through :meth:`MoLEForCausalLM.from_pretrained` (nothing downloaded).

        ``lut_placement``: the LUT's tier, ``"device"``, ``"host"`` or ``"disk"``. A re-parameterized
        folder defaults to ``"host"``; a train-form folder loads as the train form unless it is given,
        and is then re-parameterized into that tier. ``lut_file``, ``lut_dtype``, ``lut_format``,
        ``block_size``, ``lut_path``: as in :meth:`MoLEForCausalLM.from_pretrained`. ``dtype`` (or
        ``torch_dtype``): the other weights' dtype ("auto" or None: as stored). ``device`` (or
        ``device_map`` naming one device): where the model runs. ``config``: ignored beyond a check
        (the folder's ``config.json`` is read by the core). The folder's ``generation_config.json``,
        when present, becomes :attr:`generation_config`.
        """
        where = f"{cls.__name__}.from_pretrained"
        if model_args:
            raise ValueError(f"{where}: unexpected positional arguments {model_args!r}")
        unknown = sorted(set(kwargs) - _PASSED_BY_AUTO)
        if unknown:
            raise ValueError(f"{where}: unsupported argument(s) {unknown} (a MoLE model takes lut_placement, lut_file, "
                             "lut_dtype, lut_format, block_size, lut_path, dtype, device)")
        if kwargs.get("subfolder"):
            pretrained_model_name_or_path = os.path.join(pretrained_model_name_or_path, kwargs["subfolder"])
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise ValueError(f"{where}: {path!r} is not a local folder (MoLE models load from a folder with "
                             "config.json and weights; download one first, e.g. huggingface_hub.snapshot_download)")
        if config is not None and not isinstance(config, MoleConfig) and \
                ARCHITECTURE not in (getattr(config, "architectures", None) or []):
            raise ValueError(f"{where}: config is a {type(config).__name__} that is not a MoLE config")
        if dtype is not None and torch_dtype is not None:
            raise ValueError(f"{where}: give dtype or torch_dtype, not both")
        dtype = dtype if dtype is not None else torch_dtype
        dtype = None if dtype == "auto" else parse_dtype(dtype, f"{where}: dtype")
        device = _single_device(device, device_map, where)
        core = MoLEForCausalLM.from_pretrained(path, dtype=dtype, device=device, placement=lut_placement,
                                               lut_dtype=lut_dtype, lut_path=lut_path, lut_format=lut_format,
                                               block_size=block_size, lut_file=lut_file)
        model = cls.from_model(core)
        model.eval()
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model

    def save_pretrained(self, save_directory, *, lut_dtype=None, safe_serialization: bool = True, **kwargs) -> None:
        """Writes the folder through the core (:meth:`MoLEForCausalLM.save_pretrained`: ``"model_type":
        "mole"``, the LUT streamed from its tier as ``model.moe_table.weight``) plus ``generation_config.json``."""
        unknown = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if unknown:
            raise ValueError(f"{type(self).__name__}.save_pretrained: unsupported argument(s) {unknown}")
        if not isinstance(self.core, MoLEForCausalLM):
            raise ValueError(f"{type(self).__name__}.save_pretrained: the wrapped {type(self.core).__name__} is a "
                             "baseline; only MoLE models are saved as folders")
        self.core.save_pretrained(save_directory, lut_dtype=lut_dtype, safe_serialization=safe_serialization)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)

    # -- the network ---------------------------------------------------------------------

    @property
    def lut(self):
        """The core's :class:`~mole_kernels.table.LookupTable` (None for the train form)."""
        return getattr(self.core, "lut", None)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep=0, cache: Optional[Cache] = None,
                return_dict: Optional[bool] = None, **kwargs) -> MoleCausalLMOutput:
        """Logits for ``input_ids`` ``[B, S]``, continuing ``past_key_values`` (or ``cache``) when given.

        ``attention_mask`` ``[B, past + S]`` (1 token, 0 padding; None: no padding);
        ``position_ids`` ``[B, S]`` (None: counted from the mask or the cache, padding excluded).
        ``use_cache`` (default ``config.use_cache``) returns a :class:`MoleKVCache` to continue from.
        """
        where = f"{type(self).__name__}.forward"
        if inputs_embeds is not None:
            raise ValueError(f"{where}: inputs_embeds are not supported: a MoLE layer reads its LUT rows by token id, "
                             "so a MoLE model needs input_ids")
        core = self.core
        ids = core._check_ids(input_ids, where)  # shape, device, vocabulary range: checked once, here
        B, S = ids.shape
        kv = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if kv is not None and not isinstance(kv, MoleKVCache):
            if kv.get_seq_length() > 0:
                raise ValueError(f"{where}: past_key_values is a {type(kv).__name__} holding tokens; a MoLE model "
                                 "continues only from the MoleKVCache it returned")
            kv = None  # an empty cache generate made for us: replaced by ours
        if kv is None and use_cache:
            kv = MoleKVCache(core, B)
        past = 0 if kv is None else kv.length
        if kv is not None and kv.batch_size != B:
            raise ValueError(f"{where}: input_ids has batch {B} but the cache holds {kv.batch_size} sequences")
        mask = _check_mask(attention_mask, B, past + S, core.device, where)
        if position_ids is None:
            if mask is not None:
                position_ids = (mask.long().cumsum(-1) - 1).clamp_(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + S, device=core.device).expand(B, S)
        elif tuple(position_ids.shape) not in ((B, S), (1, S)):
            raise ValueError(f"{where}: position_ids must be [B, S] = [{B}, {S}], got {tuple(position_ids.shape)}")
        position_ids = position_ids.to(core.device).expand(B, S)
        if kv is None:  # no cache: one causal pass over the sequence
            key_valid = mask if mask is not None else torch.ones(B, S, dtype=torch.bool, device=core.device)
            attn = _attention_mask(torch.arange(S, device=core.device), key_valid, core.dtype)
            h = core._hidden(ids, position_ids, attn)
        else:
            static = kv.reserve(past + S)
            if mask is not None:
                static.valid[:, :past + S] = mask
            else:
                static.valid[:, past:past + S] = True
            slots = torch.arange(past, past + S, device=core.device)
            attn = _attention_mask(slots, static.valid, core.dtype)
            h = core._hidden(ids, position_ids, attn, static, slots)
            kv.length = past + S
        if isinstance(logits_to_keep, int):
            h_out = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h_out = h[:, logits_to_keep]
        logits = core.lm_head(h_out).float()
        loss = None
        if labels is not None:
            if tuple(labels.shape) != (B, S) or h_out.shape[1] != S:
                raise ValueError(f"{where}: labels must have shape {(B, S)} (with logits_to_keep=0), got "
                                 f"{tuple(labels.shape)}")
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return MoleCausalLMOutput(loss=loss, logits=logits, past_key_values=kv, cache=kv)

    # -- generate's hooks ----------------------------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        """Our cache, sized as ``MoLEForCausalLM.generate`` sizes its own (prompt + new tokens): the same
        attention shapes give the same bits, so greedy tokens equal the core's."""
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                                         batch_size, max_cache_length, *args, **kwargs)
        rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
        model_kwargs["past_key_values"] = MoleKVCache(self.core, rows, max_cache_length + 1)

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


def _single_device(device, device_map, where: str) -> Optional[torch.device]:
    if device is not None and device_map is not None:
        raise ValueError(f"{where}: give device or device_map, not both")
    if device_map is None:
        return None if device is None else torch.device(device)
    if isinstance(device_map, (str, int, torch.device)) and str(device_map) not in ("auto", "balanced",
                                                                                      "balanced_low_0", "sequential"):
        return torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")
    raise ValueError(f"{where}: device_map={device_map!r}: a MoLE model runs on one device; name it "
                     "(device_map='cuda:0' or device='cpu'); the LUT's tier is lut_placement")


def _check_mask(mask, B: int, K: int, device, where: str) -> Optional[torch.Tensor]:
    """A 2D 0/1 mask ``[B, K]`` (the whole sequence so far) as bool, or None when there is none."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (B, K):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{where}: attention_mask must be a 2D [batch, past + new tokens] = [{B}, {K}] tensor of "
                         f"0/1, got {got}")
    m = mask.to(device)
    if m.dtype != torch.bool:
        if m.dtype.is_complex or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"{where}: attention_mask must hold only 0 and 1 (or be bool)")
        m = m.bool()
    return m


def register() -> None:
    """Makes ``AutoConfig`` and ``AutoModelForCausalLM`` load ``"model_type": "mole"`` folders as
    :class:`MoleForCausalLM` (idempotent; done when this module is imported)."""
    _register_config()
    AutoModelForCausalLM.register(MoleConfig, MoleForCausalLM, exist_ok=True)


register()

__all__ = ["MoleConfig", "MoleForCausalLM", "MoleKVCache", "MoleCausalLMOutput", "register", "SUPPORTED"]
