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
from .checkpoints import (LUT_KEY, StreamedTensor, WeightFiles, _check_state_dict, _is_expert_key, _read_config,
                          _weight_files, check_counts, save_checkpoint)
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
        if self._kind != "mole_lut":  # the train form: its experts read the embeddings
            return embeds
        # Every layer's rows for this step's ids, started before layer 0 (prefetched on a GPU). Ids
        # were range-checked where they entered (forward/generate): no step synchronises for them.
        # The context is each layer's one call itself (the decode loop runs it L times per token).
        return (self._reader or self._new_reader()).start(input_ids)

    def _new_reader(self):
        if self.lut is None:
            raise RuntimeError("MoLEForCausalLM: the inference form has no LUT; call set_lut(table) "
                               "(or build it with reparameterize() / from_pretrained())")
        if self.lut.device != self.device:
            raise RuntimeError(f"MoLEForCausalLM: the LUT delivers rows to {self.lut.device} but the model is on "
                               f"{self.device}; rebuild the table with device={self.device}")
        self._reader = self.lut.reader()
        return self._reader

    def _ffn(self, l, layer, h, ctx):
        n = layer.post_attention_layernorm(h)
        if self._kind == "mole_lut":
            # One fused call: the router matmul (the D x E weight, not the module: its hook machinery
            # costs more than the matmul at decode sizes), softmax, the token's E rows, their sum, both adds.
            # The weight is read from the module's dicts: `layer.router.weight` runs nn.Module.__getattr__
            # twice, Python code that cost ~0.4 % of a demo-sized decode step (measured in generate).
            w = layer._modules["router"]._parameters.get("weight")
            return ctx(l, n, h, layer.mlp(n), layer.router.weight if w is None else w)  # None: parametrized
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
        """Every expert of every layer on every vocabulary entry: a ``[V, L, E, D]`` tensor.

        ``LUT[v, l, e] = experts[l][e](expert_layernorm[l](embed_tokens.weight[v]))``, computed in
        the model's dtype (as the train form computes it) ``chunk_size`` entries at a time on
        ``device`` (default: the GPU when there is one, else the model's device; the experts are
        copied there once when the model is elsewhere), then rounded to ``dtype`` (default: the
        model's dtype). ``out``: a ``[V, L, E, D]`` tensor (any device) to fill; default a new CPU tensor.
        This holds the whole table: :meth:`reparameterize` writes it straight into its tier instead.
        """
        dtype = parse_dtype(dtype, "compute_lut: dtype") or self.dtype
        fill = self._lut_rows(chunk_size, device, "compute_lut")
        V, L, E, D = self.config.lut_shape
        if out is None:
            out = torch.empty((V, L, E, D), dtype=dtype)
        elif tuple(out.shape) != (V, L, E, D):
            raise ValueError(f"compute_lut: out must have shape {(V, L, E, D)}, got {tuple(out.shape)}")
        with progress_bar(V * L, "reparameterizing", enabled=progress, unit="row") as bar:
            fill(0, V, out, bar)
        return out

    def _lut_rows(self, chunk_size: int, device, where: str):
        """``fill(a, b, out, bar)``: writes the LUT rows of tokens [a, b) into ``out`` ``[b - a, L, E, D]``
        (any dtype and device), computing ``chunk_size`` tokens of one layer at a time on ``device``."""
        if self.is_reparameterized:
            raise RuntimeError(f"{where}: this model is already the inference form (it has no experts)")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"{where}: chunk_size must be a positive int, got {chunk_size!r}")
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else self.device
        device = torch.device(device)
        on_device = {}  # layer -> (its expert_layernorm, its experts) on `device`, copied once if elsewhere

        def layer_on_device(l, layer):
            if l not in on_device:
                mods = (layer.expert_layernorm, layer.experts)
                if any(p.device != device for m in mods for p in m.parameters()):
                    mods = tuple(copy.deepcopy(m).to(device) for m in mods)  # .to() on the model's own would move it
                on_device[l] = mods
            return on_device[l]

        embed = self.model.embed_tokens.weight

        @torch.no_grad()
        def fill(a, b, out, bar):
            for l, layer in enumerate(self.model.layers):
                norm, experts = layer_on_device(l, layer)
                for s in range(a, b, chunk_size):
                    e = min(b, s + chunk_size)
                    x = norm(embed[s:e].to(device))
                    out[s - a:e - a, l].copy_(torch.stack([ex(x) for ex in experts], dim=1))  # [n, E, D]
                    bar.update(e - s)

        return fill

    @torch.no_grad()
    def reparameterize(self, *, placement: str = "host", dtype=None, device=None, path: Optional[str] = None,
                       chunk_size: int = 4096, progress: bool = True, lut_format: Optional[str] = None,
                       block_size: Optional[int] = None, max_cost: Optional[float] = None,
                       quality_text: Optional[torch.Tensor] = None, check_quality: bool = True,
                       counts: Optional[torch.Tensor] = None) -> "MoLEForCausalLM":
        """The inference form of this (train-form) model, its LUT on ``placement``.

        Args:
            placement: ``"device"`` (VRAM), ``"host"`` (pinned RAM when CUDA is present) or
                ``"disk"`` (a safetensors file read on demand: ``path``, or an anonymous temp file).
            dtype: the LUT's dtype (float32/float16/bfloat16; default the model's dtype). For a
                quantized LUT: the dtype it is quantized from and its rows are dequantized to.
            device: where rows (and so the model's compute) land; default the model's device.
            chunk_size, progress: see :meth:`compute_lut` (a tqdm bar on stderr when importable).
            lut_format, block_size: store the LUT quantized (``"int8"``, ``"fp8"``/``"fp8_e4m3"``,
                ``"nf4"``, and below 4 bits ``"q3"``, ``"q2"``, ``"q1"``; see :func:`mole_kernels.quantize`):
                every tier then holds and moves the quantized rows only, and the gather dequantizes
                them. None (default): a float LUT. Or a **mixed plan** (:func:`mole_kernels.mixed.parse_plan`,
                e.g. ``"norm:int8@64+f36x5"``: the 64 most frequent ids in int8, the rest factored): a
                :class:`~mole_kernels.table.MixedLookupTable` on the ``"host"`` or ``"disk"`` tier (CPU;
                disk: the :func:`~mole_kernels.mixed.save_mixed` file ``path``), ids ranked by ``counts``.
            counts: per-id token counts ``[V]`` that rank the ids of a mixed plan (e.g.
                :func:`mole_kernels.mixed.token_counts` of a corpus); default: the counts of ``quality_text``.
            max_cost, quality_text: the quality gate (:mod:`mole_kernels.quality`): the format's
                perplexity cost on ``quality_text`` (token ids ``[N, S]``) vs the bf16 LUT must be at
                most ``max_cost`` (a fraction: 0.005 = +0.5 %), else :class:`~mole_kernels.quality.QualityError`.
                Formats below 4 bits are refused without the gate unless ``check_quality=False``; so are mixed
                plans with a q3/q2/q1 or factored part (the gate measures the very table it then serves).

        Memory: the rows are computed straight into the tier (:meth:`LookupTable.build`): the host
        and device tiers hold the table once, plus one chunk when quantizing; the disk tier streams
        chunks (a 32nd of the table within [4, 64] MiB) to the file and holds no table in RAM.
        The returned model shares every other weight with this one (no copy).
        """
        dtype = parse_dtype(dtype, "reparameterize: dtype") or self.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"reparameterize: dtype must be float32, float16 or bfloat16, got {dtype}")
        plan = _check_lut_format(lut_format, block_size, self.config.hidden_size, "reparameterize", mixed=True)
        self._quality_gate(lut_format, block_size, max_cost, quality_text, check_quality, progress)
        if plan is not None:
            return self._reparameterize_mixed(plan, lut_format, placement, dtype, device, path, chunk_size, progress,
                                              counts, max_cost, quality_text)
        if counts is not None:
            raise ValueError("reparameterize: counts= ranks the ids of a mixed plan; lut_format is not one")
        fill = self._lut_rows(chunk_size, None, "reparameterize")
        from ..table import LookupTable

        V, L = self.config.lut_shape[:2]
        with progress_bar(V * L, "reparameterizing", enabled=progress, unit="row") as bar:
            table = LookupTable.build(self.config.lut_shape, dtype, lambda a, b, out: fill(a, b, out, bar), placement,
                                      device=device if device is not None else self.device, path=path,
                                      format=lut_format, block_size=block_size, progress=False)
        return self._inference_form(table)

    def _reparameterize_mixed(self, plan, text, placement, dtype, device, path, chunk_size, progress, counts,
                              max_cost, quality_text) -> "MoLEForCausalLM":
        """reparameterize with a mixed plan: the float LUT computed on the CPU, made into the plan's
        MixedLUT (gated), served by a MixedLookupTable on the host tier or from its file on the disk tier."""
        from ..mixed import check_plan, save_mixed
        from ..table import MixedLookupTable

        where = "reparameterize"
        check_plan(plan, self.config.vocab_size, f"{where}: lut_format {text!r}")
        if placement not in ("host", "disk"):
            raise ValueError(f"{where}: lut_format={text!r} is a mixed plan, served from the CPU on the 'host' or "
                             f"'disk' tier (MixedLookupTable has no device tier); got placement={placement!r}")
        if torch.device(device if device is not None else self.device).type != "cpu":
            raise ValueError(f"{where}: a mixed table delivers its rows on the CPU; got device={device or self.device}")
        counts = _plan_counts(counts, quality_text, self.config.vocab_size, text, where)
        lut = self.compute_lut(dtype=dtype, chunk_size=chunk_size, progress=progress)
        m, _ = self._mixed_lut(lut, plan, counts, max_cost, quality_text, progress)
        del lut
        if placement == "host":
            return self._inference_form(MixedLookupTable(m))
        if path is not None:
            save_mixed(path, m)
            return self._inference_form(MixedLookupTable.open(path, "disk"))
        import tempfile

        fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="mole_mixed_lut_")
        os.close(fd)
        try:  # an anonymous file: unlinked once open (the table's open descriptors keep it)
            save_mixed(tmp, m)
            return self._inference_form(MixedLookupTable.open(tmp, "disk"))
        finally:
            os.unlink(tmp)

    def _mixed_lut(self, lut: torch.Tensor, plan, counts: torch.Tensor, max_cost, quality_text, progress):
        """(the MixedLUT of this (train-form) model's LUT ``lut`` by ``plan``, ids ranked by ``counts``; the gate's
        measured row or None). Behind the quality gate when ``max_cost`` is given:
        :class:`~mole_kernels.quality.QualityError` if that very table costs more than ``max_cost`` on
        ``quality_text``."""
        from ..mixed import quantize_plan
        from ..quality import check_format

        m = quantize_plan(lut, counts, plan, progress=progress)
        row = None if max_cost is None else check_format(self, m, None, quality_text, max_cost, lut=lut,
                                                         progress=progress)
        return m, row

    def _quality_gate(self, lut_format, block_size, max_cost, quality_text, check_quality, progress) -> None:
        """Refuses a format below 4 bits without the gate's arguments, and measures a single format (a mixed
        plan's table is measured once made: :meth:`_mixed_lut`)."""
        from ..mixed import is_plan
        from ..quality import check_format, is_low_bit

        mixed = is_plan(lut_format)
        fmt = lut_format if lut_format is None or mixed else canonical_format(lut_format)
        if (max_cost is None) != (quality_text is None):
            raise ValueError("reparameterize: the quality gate needs both max_cost= and quality_text= (token ids [N, S])")
        if max_cost is not None:
            if fmt is None:
                raise ValueError("reparameterize: max_cost= applies to a quantized LUT; name its lut_format")
            if not mixed:
                check_format(self, fmt, block_size, quality_text, max_cost, progress=progress)
        elif check_quality and is_low_bit(fmt):
            what = "has parts below 4 bits per value (q3/q2/q1 or factored)" if mixed else "is below 4 bits per value"
            raise ValueError(f"reparameterize: lut_format={fmt!r} {what}, where quality depends on the "
                             "model; pass max_cost= and quality_text= (the gate measures its perplexity cost on your "
                             "text), or check_quality=False to use it unmeasured")

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
    def from_pretrained(cls, path, *, dtype=None, device=None, placement: Optional[str] = None, lut_dtype=None,
                        lut_path: Optional[str] = None, lut_format: Optional[str] = None,
                        block_size: Optional[int] = None, lut_file: Optional[str] = None) -> "MoLEForCausalLM":
        """Loads a Hugging Face-format folder in the official MoLE layout (nothing is downloaded).

        The folder holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
        (or their sharded ``*.index.json`` forms). With ``model.layers.{i}.experts.*`` it is
        the train form; with ``model.moe_table.weight`` ``[V, L*E*D]`` the re-parameterized
        form, whose LUT goes to ``placement`` (as in :meth:`reparameterize`; default ``"host"``) in
        ``lut_dtype`` (default: as stored), quantized on the way when ``lut_format`` (and optionally
        ``block_size``) is given.

        A train-form folder loads as the train form (experts computed) unless ``placement`` is given:
        then it is re-parameterized into that tier (:meth:`reparameterize`, with a progress bar; the
        LUT in ``lut_dtype``, default the model's dtype, quantized when ``lut_format`` is given,
        the disk tier's file at ``lut_path``), so the call returns the inference form it asked for.

        Memory (the LUT is the big part: 10-50 GB at the paper's sizes):

        - ``placement="disk"`` with no conversion serves ``model.moe_table.weight`` **in place**
          from its weight file (its ``[V, L*E*D]`` bytes are the ``[V, L, E, D]`` table): nothing
          of the table is read up front or held in RAM, no second file is written, and opening
          takes the same time whatever the table's size. A conversion (``lut_dtype`` other than
          stored, ``lut_format``) or ``lut_path`` writes a new table file (``lut_path``, else an
          anonymous temporary file) chunk by chunk.
        - ``"host"``/``"device"``: the table is read once, chunk by chunk, into its final memory
          (pinned when CUDA is present): one copy of the LUT, plus a chunk when converting.
        - Chunks are a 32nd of the table within [4, 64] MiB. The other weights are read into RAM.
        - In place means the file is read with ``pread``: safetensors always; ``pytorch_model.bin``
          when the LUT is a contiguous tensor whose zip record provably holds what
          ``torch.load(weights_only=True)`` reads (stored uncompressed, one dtype per storage, a
          unique name: :class:`~mole_kernels.model.checkpoints.WeightFiles`); any other ``.bin``
          (pre-1.6, compressed, crafted) is loaded whole by ``torch.load`` first. Either way the
          weights are what torch (or the safetensors library) reads from the files.
        - Each weight file's header or pickle is read once, and ``config.json``'s sizes are checked
          against the files' tensor names and shapes before any model is built.

        ``lut_file``: a :class:`~mole_kernels.table.LookupTable` file (``LookupTable.save``, or
        ``mole-kernels reparameterize --lut-file``; float or quantized) to use as the LUT instead
        of ``model.moe_table.weight``, which the folder then need not hold (the official layout
        has no quantized form, so a quantized LUT travels in such a file). It is opened on
        ``placement`` as it is (disk: read from the file on demand, nothing loaded); ``lut_format``/
        ``block_size``, if given, must match it, and ``lut_dtype``/``lut_path`` do not apply. A mixed
        table's file (:func:`~mole_kernels.mixed.save_mixed`, or ``mole-kernels reparameterize --lut-format
        PLAN``; recognised by its metadata) opens as a :class:`~mole_kernels.table.MixedLookupTable` on the
        ``"host"`` or ``"disk"`` tier of a CPU model (no device tier); ``lut_format``, if given, must be its
        plan, and ``block_size`` does not apply (a plan names its parts' blocks).

        ``dtype`` casts the other weights (default: as stored); ``device`` is where the model runs.
        """
        path = os.fspath(path)
        where = f"{cls.__name__}.from_pretrained"
        cfg = _read_config(path, where)
        if lut_file is not None and (lut_dtype is not None or lut_path is not None):
            raise ValueError(f"{where}: lut_dtype/lut_path apply to model.moe_table.weight, not to lut_file "
                             "(a LookupTable file is used as stored)")
        plan = _check_lut_format(lut_format, block_size, cfg.hidden_size, where, mixed=True)
        if plan is not None and lut_file is None:
            raise ValueError(f"{where}: lut_format={lut_format!r} is a mixed plan, which ranks ids by their counts in a "
                             "text that from_pretrained does not take: write the table with `mole-kernels reparameterize "
                             "--lut-format PLAN --lut-file F --quality-text TEXT` (or reparameterize(lut_format=PLAN, "
                             "counts=..., path=F, placement='disk')), then load it with lut_file=F")
        lut_dtype = parse_dtype(lut_dtype, f"{where}: lut_dtype")
        weights = WeightFiles(_weight_files(path, where), where)  # headers/pickles, read once: no tensor data
        names = weights.shapes
        has_experts = any(_is_expert_key(k) for k in names)
        has_lut = LUT_KEY in names or lut_file is not None
        if has_experts and has_lut:
            raise ValueError(f"{where}: {path!r} holds experts but " + (f"lut_file={lut_file!r} was given" if
                             lut_file is not None else f"also {LUT_KEY}") + "; expected one form")
        if not has_experts and not has_lut:
            raise ValueError(f"{where}: {path!r} holds neither expert weights (model.layers.{{i}}.experts.{{e}}.*) "
                             f"nor {LUT_KEY}: not a MoLE checkpoint (a LUT kept elsewhere: pass lut_file=)")
        if has_experts and placement is None and (lut_format, block_size, lut_dtype, lut_path) != (None,) * 4:
            raise ValueError(f"{where}: lut_format applies to a re-parameterized folder (as do block_size, lut_dtype "
                             f"and lut_path); {path!r} is the train form: pass placement= to re-parameterize it into "
                             "that tier while loading")
        from ..table.lookup_table import PLACEMENTS

        if placement is not None and placement not in PLACEMENTS:  # before any weight is read
            raise ValueError(f"{where}: placement must be None (not given) or one of {PLACEMENTS}, got {placement!r}")
        check_counts(cfg, names, where, path)  # before a model of the config's size is built
        sd = weights.load(skip=frozenset({LUT_KEY}))
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # older HF saves it
        dtype = parse_dtype(dtype, f"{where}: dtype")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if cfg.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        with torch.device("meta"):
            model = cls(cfg, reparameterized=has_lut)
        _check_state_dict(model, sd, where, path)
        sd = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.eval()

        if lut_file is not None:
            table = _lut_file_table(lut_file, placement or "host", device, lut_format, block_size, where, mixed=True)
            try:
                model.set_lut(table)
            except ValueError:
                table.close()
                raise
        elif has_lut:
            model.set_lut(_official_lut(weights, cfg, placement or "host", device, lut_dtype, lut_path, lut_format,
                                        block_size, where))
        elif placement is not None:  # the train form, asked for on a tier: re-parameterized into it
            return model.reparameterize(placement=placement, dtype=lut_dtype, device=device, path=lut_path,
                                        lut_format=lut_format, block_size=block_size)
        return model

    def save_pretrained(self, path, *, lut_dtype=None, safe_serialization: bool = True) -> None:
        """Writes ``config.json`` and the weights in the official layout (train form: the experts;
        inference form: ``model.moe_table.weight`` ``[V, L*E*D]`` in ``lut_dtype``, default as held).

        The official layout has no quantized form: a quantized (or mixed) LUT is written dequantized (in
        ``lut_dtype``, default the dtype it was quantized from). To keep the quantized rows,
        also ``self.lut.save(file)`` (a mixed table: :func:`~mole_kernels.mixed.save_mixed`) and load with
        ``from_pretrained(..., lut_file=file)``.

        The LUT is streamed from its tier chunk by chunk (``model.safetensors``: no copy of it in
        RAM; ``pytorch_model.bin`` needs it whole, as ``torch.save`` does).
        The folder changes in one commit: an interruption at any instant (Ctrl-C, SIGTERM,
        SIGKILL) leaves the old model or this one for :meth:`from_pretrained`; the weight files,
        shard indexes and shards of an earlier save (in either format) are removed once this
        model is in place, so that :meth:`from_pretrained` reads this model and nothing else. A
        ``path`` that is a file, or whose ``config.json``/weight file names hold a FIFO, device or
        folder, is refused before anything is written (see
        :func:`~mole_kernels.model.checkpoints.save_checkpoint`)."""
        path = os.fspath(path)
        if not isinstance(safe_serialization, bool):
            raise ValueError(f"save_pretrained: safe_serialization must be a bool, got {safe_serialization!r}")
        sd = dict(self.state_dict())
        streamed = {}
        if self.is_reparameterized:
            if self.lut is None:
                raise RuntimeError("save_pretrained: the inference form has no LUT to save")
            V, L, E, D = self.config.lut_shape
            lut_dtype = parse_dtype(lut_dtype, "save_pretrained: lut_dtype") or self.lut.dtype
            table = self.lut
            if getattr(table, "format", None) == "mixed":  # a MixedLookupTable: its parts in RAM once (the
                from ..mixed import mixed_lut_gather       # compressed size; disk: read whole), rows gathered

                mixed = table._lut_for(None)
                read = lambda a, b: mixed_lut_gather(mixed, torch.arange(a, b))  # noqa: E731
            else:
                read = table.read

            def rows(a, b):  # tokens [a, b) as the official [n, L*E*D] rows, read from the table's tier
                chunk = read(a, b)
                chunk = dequantize(chunk) if isinstance(chunk, QuantizedLUT) else chunk
                return chunk.reshape(b - a, L * E * D).to("cpu", lut_dtype)

            streamed[LUT_KEY] = StreamedTensor((V, L * E * D), lut_dtype, rows)
        cfg = self.config.to_dict()
        # "mole", not the official "llama": transformers then loads the folder as MoLE (with
        # mole_kernels.integrations.hf imported) or refuses it, never as Llama with random MLPs.
        cfg.update(model_type="mole", architectures=["MoleForCausalLM"])
        cfg.pop("auto_map", None)  # an official folder's remote-code pointers: that code is not copied here
        cfg["torch_dtype"] = str(self.dtype).replace("torch.", "")
        save_checkpoint(path, sd, cfg, safe_serialization, streamed)


def _check_lut_format(lut_format: Optional[str], block_size, hidden: int, where: str, *, mixed: bool = False):
    """Checks a LUT quantization request up front (before any expensive work); ValueError naming it.
    Returns the parsed mixed plan when ``lut_format`` is one (:func:`mole_kernels.mixed.parse_plan`), else
    None; ``mixed``: whether the caller serves mixed tables (MoLEForCausalLM on a CPU; not tensor
    parallelism or vLLM)."""
    from ..mixed import is_plan, parse_plan

    if lut_format is None:
        if block_size is not None:
            raise ValueError(f"{where}: block_size={block_size!r} needs lut_format (a float LUT has no blocks)")
        return None
    if is_plan(lut_format):
        if not mixed:
            raise ValueError(f"{where}: lut_format={lut_format!r} is a mixed plan; mixed tables are served by "
                             "MoLEForCausalLM on a CPU (host or disk tier) only, not here")
        if block_size is not None:
            raise ValueError(f"{where}: block_size={block_size!r} does not apply to the mixed plan {lut_format!r} "
                             "(it names each part's block: FORMAT/BLOCK)")
        return parse_plan(lut_format, hidden, where=f"{where}: lut_format")
    try:
        fmt = canonical_format(lut_format)
        if block_size is not None:
            row_layout(fmt, hidden, block_size)
    except ValueError as e:
        raise ValueError(f"{where}: lut_format={lut_format!r}, block_size={block_size!r}: {e}") from None
    return None


def _plan_counts(counts, quality_text, vocab_size: int, plan_text: str, where: str) -> torch.Tensor:
    """The per-id counts [V] that rank a mixed plan's ids: ``counts``, else those of ``quality_text``."""
    from ..mixed import token_counts

    if counts is None:
        if quality_text is None:
            raise ValueError(f"{where}: lut_format={plan_text!r} is a mixed plan, which ranks ids by frequency: pass "
                             "counts= (per-id token counts [V], e.g. mole_kernels.mixed.token_counts of a corpus) or "
                             "quality_text=")
        return token_counts(quality_text, vocab_size)
    counts = torch.as_tensor(counts)
    if tuple(counts.shape) != (vocab_size,) or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise ValueError(f"{where}: counts must be per-id token counts [V] = [{vocab_size}], got "
                         f"{counts.dtype} {list(counts.shape)}")
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts.double()).all()):
        raise ValueError(f"{where}: counts must be finite and >= 0")
    return counts


def _lut_file_table(lut_file, placement: str, device, lut_format: Optional[str], block_size, where: str, *,
                    mixed: bool = False):
    """The LookupTable file ``lut_file`` opened on ``placement`` as stored (see from_pretrained's ``lut_file``);
    ``lut_format``/``block_size``, if given, must match it (ValueError, the table closed). ``mixed``: a
    mixed table's file (:func:`mole_kernels.mixed.save_mixed`) opens as a MixedLookupTable (elsewhere
    LookupTable.open refuses it, saying what it is)."""
    from ..mixed import is_mixed_metadata, is_plan
    from ..table import LookupTable
    from ..table.file_format import safetensors_header

    if mixed and is_mixed_metadata(safetensors_header(os.fspath(lut_file), where)[1]):
        return _mixed_file_table(os.fspath(lut_file), placement, device, lut_format, block_size, where)
    table = LookupTable.open(lut_file, placement, device=device)
    try:
        if lut_format is not None and (is_plan(lut_format) or canonical_format(lut_format) != table.format):
            raise ValueError(f"{where}: lut_format={lut_format!r} but {lut_file!r} holds a "
                             f"{table.format or 'float'} table")
        if block_size is not None and block_size != table.block_size:
            raise ValueError(f"{where}: block_size={block_size} but {lut_file!r} has block_size={table.block_size}")
    except ValueError:
        table.close()
        raise
    return table


def _mixed_file_table(path: str, placement: str, device, lut_format: Optional[str], block_size, where: str):
    """A mixed table's file (see _lut_file_table) as a MixedLookupTable on ``placement`` ("host"/"disk", CPU)."""
    from ..mixed import plan_text
    from ..table import MixedLookupTable

    if placement not in ("host", "disk"):
        raise ValueError(f"{where}: {path!r} is a mixed-precision table, served from the CPU on the 'host' or 'disk' "
                         f"tier (MixedLookupTable has no device tier); got placement={placement!r}")
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"{where}: {path!r} is a mixed-precision table, whose rows are delivered on the CPU; got "
                         f"device={device} (a GPU model needs a single-format table)")
    if block_size is not None:
        raise ValueError(f"{where}: block_size={block_size} does not apply to {path!r}, a mixed-precision table (its "
                         "parts' blocks are in the file)")
    try:
        table = MixedLookupTable.open(path, placement)
    except ValueError as e:  # a corrupt or inconsistent file, named
        raise ValueError(f"{where}: {path!r}: not a valid mixed table file: {e}") from None
    m = table.lut
    try:
        if lut_format is not None and plan_text(lut_format, m.shape[-1]) != m.plan:
            raise ValueError(f"{where}: lut_format={lut_format!r} but {path!r} holds the mixed table {m.plan!r}")
    except ValueError:
        table.close()
        raise
    return table


def _official_lut(weights: WeightFiles, cfg: MoLEConfig, placement: str, device, lut_dtype, lut_path, lut_format,
                  block_size, where: str):
    """The LookupTable of a checkpoint's ``model.moe_table.weight`` (``[V, L*E*D]`` or ``[V, L, E, D]``):
    served in place or read once into its tier, or converted chunk by chunk (see from_pretrained)."""
    from ..table import LookupTable

    V, L, E, D = shape = cfg.lut_shape
    loc = weights.locate(LUT_KEY)
    stored_shape, stored_dtype = weights.shapes[LUT_KEY]
    if stored_shape not in ((V, L * E * D), (V, L, E, D)):
        raise ValueError(f"{where}: {LUT_KEY} has shape {list(stored_shape)}, expected [V, L*E*D] = "
                         f"[{V}, {L * E * D}] for this config")
    if stored_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{where}: {LUT_KEY} is {stored_dtype}; a LUT must be float32, float16 or bfloat16")
    lut_dtype = lut_dtype or stored_dtype
    if loc is None:  # not servable in place (an old-format or compressed .bin, a strided view): as torch loads it
        lut = weights.load(skip=frozenset(set(weights.shapes) - {LUT_KEY}))[LUT_KEY].reshape(shape)
        return LookupTable.build(shape, lut_dtype, lambda a, b, out: out.copy_(lut[a:b]), placement, device,
                                 path=lut_path, format=lut_format, block_size=block_size)

    def opened(placement, device):  # at the location the header (or pickle) gave: the file is not parsed again
        return LookupTable._open_at(loc.file, loc.offset, shape, stored_dtype, placement, device, loc.identity)

    if lut_dtype == stored_dtype and lut_format is None and lut_path is None:
        return opened(placement, device)  # disk: served in place; host/device: read once into the tier
    with opened("disk", "cpu") as src:  # converted (or copied to lut_path) chunk by chunk
        return LookupTable.build(shape, lut_dtype, lambda a, b, out: out.copy_(src.read(a, b)), placement, device,
                                 path=lut_path, format=lut_format, block_size=block_size,
                                 desc=f"converting {LUT_KEY}")
