"""`MoLEForCausalLM`: the train form (experts computed) and the inference form (experts as LUT
rows read through a LookupTable), ``reparameterize`` between them, checkpoints in the official layout.

The architecture follows the official MoLE code (github.com/JieShibo/MoLE,
``modeling_mole.py`` / ``modeling_mole_rep.py``), layer ``l``::

    h = h + attn(input_layernorm(h))
    n = post_attention_layernorm(h)
    h = h + mlp(n) + sum_e softmax(router(n))_e * expert_e(expert_layernorm(embed(ids)))
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .._progress import progress_bar
from ..quant import QuantizedLUT, canonical_format, dequantize, row_layout
from .checkpoints import (LUT_KEY, _check_state_dict, _is_expert_key, _load_state_dict, _read_config,
                          _weight_files, save_checkpoint)
from .config import MoLEConfig, parse_dtype
from .generation import _CausalLM
from .layers import _acc_dtype

class MoLEForCausalLM(_CausalLM):
    """Mixture of Lookup Experts, in one of two forms.

    - **train form** (``MoLEForCausalLM(config)``): every layer computes its E experts on
      ``expert_layernorm(embed_tokens(ids))``; trains with ``loss.backward()``.
    - **inference form** (:meth:`reparameterize`, or :meth:`from_pretrained` of a
      re-parameterized folder): no experts; their outputs for every vocabulary entry are a
      ``[V, L, E, D]`` :class:`~mole_kernels.table.LookupTable` (:attr:`lut`) on the
      ``"device"``, ``"host"`` or ``"disk"`` tier. Each layer's expert term is one fused call
      (:class:`~mole_kernels.table.reader.LayerReader`: router softmax, the token's E rows
      read from wherever the table lives, their weighted sum, the residual and shared MLP
      output added). Inference only (no autograd through the LUT).
    """

    def __init__(self, config: MoLEConfig, *, reparameterized: bool = False, init_std: float = 0.02):
        super().__init__(config, init_std=init_std, kind="mole_lut" if reparameterized else "mole")
        self.lut = None  # the LookupTable of the inference form
        self._reader = None  # how steps read self.lut (made on first use)

    @property
    def is_reparameterized(self) -> bool:
        return self._kind == "mole_lut"

    # -- the expert term -----------------------------------------------------------------

    def _ffn_context(self, input_ids, embeds):
        if not self.is_reparameterized:
            return embeds
        if self._reader is None:
            if self.lut is None:
                raise RuntimeError("MoLEForCausalLM: the inference form has no LUT; call set_lut(table) "
                                   "(or build it with reparameterize() / from_pretrained())")
            if self.lut.device != self.device:
                raise RuntimeError(f"MoLEForCausalLM: the LUT delivers rows to {self.lut.device} but the model is on "
                                   f"{self.device}; rebuild the table with device={self.device}")
            self._reader = self.lut.reader()
        # Every layer's rows for this step's ids, started before layer 0 (prefetched on a GPU). Ids
        # were range-checked where they entered (forward/generate): no step synchronises for them.
        return self._reader.start(input_ids)

    def _ffn(self, l, layer, h, ctx):
        n = layer.post_attention_layernorm(h)
        if self.is_reparameterized:
            # One fused call: the router matmul (the D x E weight, not the module: its hook machinery
            # costs more than the matmul at decode sizes), softmax, the token's E rows, their sum, both adds.
            return ctx.combine(l, n, h, layer.mlp(n), layer.router.weight)
        # The train form, as the official layer: softmax in float32, cast to the hidden dtype, weighted sum.
        logits = layer.router(n)
        shared = layer.mlp(n)
        p = F.softmax(logits, dim=-1, dtype=_acc_dtype(shared.dtype)).to(shared.dtype)
        x = layer.expert_layernorm(ctx)
        experts = torch.stack([e(x) for e in layer.experts], dim=2)  # [B, S, E, D]
        return h + shared + (experts * p.unsqueeze(-1)).sum(dim=2)

    def _graph_step(self, cache, B):
        if self.is_reparameterized and self.lut is not None and self.lut.placement == "disk":
            raise ValueError("MoLEForCausalLM.generate: cuda_graph=True is not possible with the LUT on the disk tier "
                             "(host threads read each step's rows once its ids are on the host); use placement='host' "
                             "(pinned, read over PCIe inside the graph) or cuda_graph=False")
        return super()._graph_step(cache, B)

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
                ``"disk"`` (a safetensors file read on demand: ``path``, or an anonymous temp file).
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
        from ..table import LookupTable

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
        self._reader = None

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
        ``placement`` as it is (disk: read from the file on demand); ``lut_format``/``block_size``, if given,
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
        from ..table import LookupTable

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
        also ``self.lut.save(file)`` and load with ``from_pretrained(..., lut_file=file)``.

        Every file is written whole or not at all, and the weight files, shard indexes and shards
        of an earlier save into ``path`` (in either format) are removed, so that
        :meth:`from_pretrained` reads this model and nothing else (see
        :func:`~mole_kernels.model.checkpoints.save_checkpoint`)."""
        path = os.fspath(path)
        if not isinstance(safe_serialization, bool):
            raise ValueError(f"save_pretrained: safe_serialization must be a bool, got {safe_serialization!r}")
        sd = dict(self.state_dict())
        if self.is_reparameterized:
            if self.lut is None:
                raise RuntimeError("save_pretrained: the inference form has no LUT to save")
            V, L, E, D = self.config.lut_shape
            lut = self.lut.read()
            if isinstance(lut, QuantizedLUT):
                lut = dequantize(lut)
            lut_dtype = parse_dtype(lut_dtype, "save_pretrained: lut_dtype") or lut.dtype
            sd[LUT_KEY] = lut.reshape(V, L * E * D).to("cpu", lut_dtype)
        cfg = self.config.to_dict()
        cfg.setdefault("architectures", ["MoleForCausalLM"])
        cfg.setdefault("model_type", "llama")  # the official config class is LlamaConfig
        cfg["torch_dtype"] = str(self.dtype).replace("torch.", "")
        save_checkpoint(path, sd, cfg, safe_serialization)


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
