"""Tensor-parallel inference of the reference models on ``torch.distributed`` (launched by ``torchrun``).

Megatron's scheme, with MoLE's lookup branch riding in the all-reduce the MLP needs anyway. With
N ranks, rank r holds:

- attention: query heads ``[r*H/N, (r+1)*H/N)`` and key/value heads ``[r*Hkv/N, (r+1)*Hkv/N)``
  (q/k/v column-parallel; under grouped-query attention those are exactly the K/V heads its
  query heads read), so its KV cache holds its own heads only; o_proj row-parallel: the ranks'
  partial outputs are summed by one all-reduce;
- shared MLP: intermediate units ``[r*I/N, (r+1)*I/N)`` (up_proj column-, down_proj row-parallel);
- MoLE: the LUT sharded along D: columns ``D_r = [r*D/N, (r+1)*D/N)`` of every row, a
  ``[V, L, E, D/N]`` :class:`~mole_kernels.table.LookupTable` (token-major, any tier, float or
  quantized with a block dividing D/N). The router (D x E) runs on every rank: its input is
  replicated. Rank r writes ``residual[D_r] + its partial MLP output[D_r] + sum_e p_e LUT_r[id, l, e]``
  into columns D_r of its partial MLP output (one fused ``lut_combine`` call) *before* the
  all-reduce; the sum over ranks is then ``h + mlp(n) + sum_e p_e LUT[id, l, e, :]`` on every rank.
  Per layer the collectives are exactly the dense TP model's: one all-reduce after attention,
  one after the MLP. Each rank holds, and reads per token, 1/N of the LUT.
- embeddings, norms, router and lm_head: replicated (also in the dense TP baseline). A
  vocabulary-parallel lm_head would add a collective per step (gathering logits, or a
  distributed argmax/sampling) and a vocabulary-parallel embedding an all-reduce per step; both
  matrices are small next to the LUT (160M: 2 x 77 MB in fp16 against a 3.7 GB table), and
  replicated logits let every rank choose the same token with no communication.

Files: the LUT is token-major, so a rank's D/N columns are strided inside every row of a
single-process table: no rank can read "its own region" of one file. :func:`write_sharded_tables`
therefore writes one ``[V, L, E, D/N]`` file per rank, once (``mole-kernels reparameterize
--tensor-parallel N``); a rank then reads one contiguous block of L*E*D/N values per token (1/N of
the bytes), and the page cache holds its bytes only. Loading from a single-process table (the
official ``model.moe_table.weight`` or a LookupTable file) works too: each rank reads whole rows,
a bounded chunk of tokens at a time, and keeps its columns (every rank reads the whole file once).

Why plain collectives and local ``nn.Linear`` shards, not ``torch.distributed.tensor.parallel``
(DTensor): the MoLE term must enter the MLP's all-reduce, which ``RowwiseParallel`` performs inside
down_proj; and DTensor's per-op dispatch costs more than a small decode step does (measured on
this package's 2-core CPU machine, 2 ranks: a ColwiseParallel + RowwiseParallel MLP at D=128 took
1.15 ms per call; the plain modules' matmuls take 0.07 ms and an all-reduce of their output 0.1-0.35
ms). Megatron and vLLM shard the same way.

Every rank must make the same calls in the same order. Steps that can fail on one rank only
(reading a file, a rank's arguments) are followed by an exchange of errors, so a failure on any
rank is a ``ValueError`` on every rank, never a rank waiting forever; the process group is
created with a timeout (:func:`init_tensor_parallel`) as the last resort.
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import tempfile
import uuid
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._files import check_replaceable
from ..quant import quantize, quantized_layout
from ..table import LookupTable
from ..table.file_format import _chunk_rows, _metadata, _write_table
from .baselines import DenseForCausalLM
from .checkpoints import (LUT_KEY, WeightFiles, _check_state_dict, _is_expert_key, _read_config, _weight_files,
                          check_counts, is_safetensors)
from .config import MoLEConfig, parse_dtype
from .generation import GenerationOutput
from .mole import MoLEForCausalLM, _check_lut_format, _lut_file_table

DEFAULT_TIMEOUT_S = 300.0
_META = "mole_kernels.tp_"  # shard file metadata: rank, world_size, columns, hidden, table
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

__all__ = ["TPDenseForCausalLM", "TPMoLEForCausalLM", "check_tensor_parallel", "init_tensor_parallel", "shard_file",
           "write_sharded_tables"]


# ---------------------------------------------------------------- the process group -----------------


def init_tensor_parallel(backend: Optional[str] = None, *, timeout_s: float = DEFAULT_TIMEOUT_S):
    """The default process group of a ``torchrun`` launch, created here (with ``timeout_s`` on every
    collective) unless it exists. ``backend``: default NCCL when CUDA is available (each rank on
    ``cuda:LOCAL_RANK``), else gloo. A group created here is destroyed when the process exits
    (left to the interpreter's teardown, a gloo group can abort the process as it ends)."""
    if not dist.is_available():
        raise RuntimeError("tensor parallel: this torch build has no torch.distributed")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("tensor parallel: not launched by torchrun (RANK/WORLD_SIZE unset); run e.g. "
                               "`torchrun --standalone --nproc-per-node 2 -m mole_kernels demo --tensor-parallel 2`")
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"init_tensor_parallel: timeout_s must be a positive number, got {timeout_s!r}")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_destroy_group)
    return dist.group.WORLD


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _group_info(group, where: str):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialised; launch with torchrun and call "
                           "init_tensor_parallel() (or dist.init_process_group) first")
    # None (the default group) stays None: a model holding no reference to the default group lets
    # destroy_process_group() release it (one kept alive until interpreter teardown can abort the process).
    return group, dist.get_rank(group), dist.get_world_size(group)


def check_tensor_parallel(config: MoLEConfig, world_size: int, *, lut_format: Optional[str] = None,
                          block_size: Optional[int] = None) -> None:
    """ValueError naming the first size that ``world_size`` ranks cannot split evenly, or a LUT
    quantization (``lut_format``, ``block_size``) that a rank's D/N columns cannot take; cheap, so
    a command checks it before any long computation."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"tensor parallel: the world size must be a positive int, got {world_size!r}")
    holds = {"hidden_size": "D/N columns of every LUT row", "num_attention_heads": "whole query heads",
             "num_key_value_heads": "whole key/value heads", "intermediate_size": "I/N units of the shared MLP"}
    for name, what in holds.items():
        v = getattr(config, name)
        if v % world_size:
            raise ValueError(f"tensor parallel over {world_size} ranks: the world size must divide {name}={v} "
                             f"(each rank holds {what})")
    n = config.hidden_size // world_size
    _check_lut_format(lut_format, block_size, n, f"tensor parallel over {world_size} ranks (each rank's D/N = {n})")


def _all_reduce(t: torch.Tensor, group, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, group=group)
    return t


def _all_gather_object(obj, group, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _on_every_rank(group, world: int, where: str, fn: Callable):
    """``fn()`` on this rank; if it raised on any rank, a ValueError naming the rank(s) and their
    errors on every rank (so no rank is left waiting in a collective for one that gave up)."""
    try:
        result, err = fn(), None
    except Exception as e:  # noqa: BLE001 - any local failure must reach the other ranks
        result, err = None, e
    errors = _all_gather_object(None if err is None else f"{type(err).__name__}: {err}", group, world)
    failed = {r: m for r, m in enumerate(errors) if m is not None}
    if not failed:
        return result
    if result is not None and hasattr(result, "close"):
        result.close()
    if len(set(failed.values())) == 1 and len(failed) == world:
        msg = f"on every rank: {errors[0]}"
    else:
        msg = f"on rank(s) {sorted(failed)} of {world}: " + "; ".join(f"rank {r}: {m}" for r, m in failed.items())
    raise ValueError(f"{where} failed {msg}") from err


def _agree(value, group, world: int, where: str, what: str):
    """ValueError on every rank unless ``value`` is equal on all ranks."""
    values = _all_gather_object(value, group, world)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise ValueError(f"{where}: {what} differ between ranks: rank 0 has {values[0]}; "
                         + "; ".join(f"rank {r} has {values[r]}" for r in bad))


# ---------------------------------------------------------------- sharded modules --------------------


def _split(name: str, cfg: MoLEConfig, world: int) -> Optional[Tuple[int, int]]:
    """(dim, rows or columns per rank) along which a weight is sharded; None: replicated."""
    hd = cfg.head_dim
    if name.endswith(".self_attn.q_proj.weight"):
        return 0, cfg.num_attention_heads // world * hd
    if name.endswith((".self_attn.k_proj.weight", ".self_attn.v_proj.weight")):
        return 0, cfg.num_key_value_heads // world * hd
    if name.endswith(".self_attn.o_proj.weight"):
        return 1, cfg.num_attention_heads // world * hd
    if name.endswith(".mlp.up_proj.weight"):
        return 0, cfg.intermediate_size // world
    if name.endswith(".mlp.down_proj.weight"):
        return 1, cfg.intermediate_size // world
    return None


class _RowParallelLinear(nn.Linear):
    """o_proj on one rank: its heads' input columns; the ranks' partial outputs summed by one all-reduce."""

    def __init__(self, in_features: int, out_features: int, group, world: int):
        super().__init__(in_features, out_features, bias=False)
        self.group, self.world = group, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(F.linear(x, self.weight), self.group, self.world)


_PRIVATE = object()


class _TensorParallel:
    """What both tensor-parallel models share: local shards of the attention and MLP, loading a rank's
    slices, and ``generate`` run by every rank. Build with ``from_model`` / ``from_pretrained``."""

    _base_kwargs: ClassVar[Dict[str, object]] = {}

    def __init__(self, config, *, _token=None):
        if _token is not _PRIVATE:
            raise TypeError(f"build a {type(self).__name__} with {type(self).__name__}.from_model(...) or "
                            ".from_pretrained(...), on every rank of the process group")
        super().__init__(config, **self._base_kwargs)

    @property
    def tp_world_size(self) -> int:
        return self._tp[2]

    @property
    def tp_rank(self) -> int:
        return self._tp[1]

    @property
    def tp_group(self):
        return self._tp[0]

    def _shard_modules(self, group, rank: int, world: int) -> None:
        cfg = self.config
        self._tp = (group, rank, world)
        D, hd = cfg.hidden_size, cfg.head_dim
        H, Hkv, I = cfg.num_attention_heads // world, cfg.num_key_value_heads // world, cfg.intermediate_size // world
        for layer in self.model.layers:
            a = layer.self_attn
            a.num_heads, a.num_kv_heads = H, Hkv
            a.q_proj = nn.Linear(D, H * hd, bias=False)
            a.k_proj = nn.Linear(D, Hkv * hd, bias=False)
            a.v_proj = nn.Linear(D, Hkv * hd, bias=False)
            a.o_proj = _RowParallelLinear(H * hd, D, group, world)
            layer.mlp.up_proj = nn.Linear(D, I, bias=False)
            layer.mlp.down_proj = nn.Linear(I, D, bias=False)  # row-parallel; its all-reduce is in _ffn

    @classmethod
    def _from_weights(cls, cfg: MoLEConfig, get: Callable, group, rank: int, world: int, *, device, dtype):
        """This rank's model: ``get(name)`` returns a full weight, or something that slices like one
        (a safetensors slice reads only the rows/columns asked for)."""
        check_tensor_parallel(cfg, world)
        with torch.device("meta"):
            model = cls(cfg, _token=_PRIVATE)
            model._shard_modules(group, rank, world)
        sd = {}
        for name in model.state_dict():
            w, split = get(name), _split(name, cfg, world)
            if split is None:
                w = w[:]  # a tensor's view (shared with its source), or a safetensors slice read whole
            else:
                dim, n = split
                w = w[rank * n:(rank + 1) * n] if dim == 0 else w[:, rank * n:(rank + 1) * n]
                w = w.clone(memory_format=torch.contiguous_format)  # not a view keeping the full weight alive
            sd[name] = w.to(device=device, dtype=dtype or w.dtype)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval()

    @classmethod
    def _shard_of(cls, model, group, device, where: str):
        """This rank's modules of a single-process ``model`` every rank holds (checked: equal weights)."""
        group, rank, world = _group_info(group, where)
        device = torch.device(device) if device is not None else model.device
        tp = _on_every_rank(group, world, where, lambda: cls._from_weights(
            model.config, model.state_dict().__getitem__, group, rank, world, device=device, dtype=None))
        _agree(_weights_digest(model), group, world, where, "the models' weights (config, per-tensor sums)")
        return tp

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """:meth:`_CausalLM.generate <mole_kernels.model.generation._CausalLM.generate>` on every rank of
        the group, with the same arguments everywhere (checked first: a rank called otherwise is an
        error on every rank, not a hang). Sampling without a ``generator`` uses one seeded by rank 0.
        Every rank returns the tokens, after checking that all ranks generated the same ones."""
        where = f"{type(self).__name__}.generate"
        group, _, world = self._tp
        sampling = bool(kwargs.get("do_sample")) and kwargs.get("generator") is None
        seed = int(torch.randint(0, 2 ** 62, ()).item()) if sampling else None
        views = _all_gather_object((_fingerprint((input_ids, attention_mask, kwargs)), seed), group, world)
        bad = [r for r, (fp, _) in enumerate(views) if fp != views[0][0]]
        if bad:
            raise ValueError(f"{where}: rank(s) {bad} were called with other arguments than rank 0 (input_ids, "
                             "attention_mask or options differ); every rank must call generate alike")
        if sampling:
            kwargs["generator"] = torch.Generator(self.device).manual_seed(views[0][1])
        out = super().generate(input_ids, attention_mask, **kwargs)
        seq = out.sequences if isinstance(out, GenerationOutput) else out
        digests = _all_gather_object(_fingerprint(seq), group, world)
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise RuntimeError(f"{where}: rank(s) {bad} generated other tokens than rank 0 (a rank's generator "
                               "state or weights differ)")
        return out

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.save_pretrained: this rank holds 1/N of the sharded "
                                  "weights; save the single-process model, and write LUT shards with "
                                  "write_sharded_tables()")


def _fingerprint(x) -> str:
    """A digest equal on ranks that were given equal values (tensors by dtype, shape, device type and
    content; a device index may differ between ranks)."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, torch.Tensor):
            h.update(f"T{v.dtype}{tuple(v.shape)}{v.device.type}".encode())
            try:
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            except (RuntimeError, TypeError) as e:  # e.g. a sparse tensor: generate refuses it alike on every rank
                h.update(repr(e).encode())
        elif isinstance(v, torch.Generator):
            h.update(b"G" + v.get_state().numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                feed(k)
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(b"(")
            for e in v:
                feed(e)
            h.update(b")")
        else:
            h.update(repr(v).encode())

    feed(x)
    return h.hexdigest()


def _weights_digest(model) -> str:
    """Config and per-tensor float64 sum and norm: equal on ranks that hold the same model."""
    h = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    for k, v in model.state_dict().items():
        s, n = torch.sum(v, dtype=torch.float64).item(), torch.linalg.vector_norm(v, dtype=torch.float64).item()
        h.update(f"{k}{tuple(v.shape)}{v.dtype}{s!r}{n!r}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- the LUT, sharded along D ---------


def shard_file(path, rank: int, world_size: int) -> str:
    """Rank ``rank``'s table file of ``world_size``: ``lut.safetensors`` -> ``lut.tp0-of-2.safetensors``."""
    path = os.fspath(path)
    stem = path.removesuffix(".safetensors")
    return f"{stem}.tp{rank}-of-{world_size}.safetensors"


# (shape [V, L, E, D], dtype, read(a, b) -> tokens [a, b)'s rows [n, L, E, D]) of a float LUT
_Source = Tuple[Tuple[int, int, int, int], torch.dtype, Callable[[int, int], torch.Tensor]]


def _lut_source(src, where: str) -> _Source:
    """A float LUT held by a ``[V, L, E, D]`` tensor, a LookupTable (any tier; the disk tier reads only
    the tokens asked for) or a single-process MoLE model (the train form computes its LUT here)."""
    if isinstance(src, MoLEForCausalLM) and not isinstance(src, _TensorParallel):
        if not src.is_reparameterized:
            src = src.compute_lut(progress=False)
        elif src.lut is None:
            raise ValueError(f"{where}: the model is the inference form but has no LUT")
        else:
            src = src.lut
    if isinstance(src, LookupTable):
        if src.quantized:
            raise ValueError(f"{where}: the source table is quantized ({src.format}); shard the float table and "
                             "quantize each rank's columns (lut_format=...): re-quantizing rows would round twice")
        return src.shape, src.dtype, src.read
    if isinstance(src, torch.Tensor) and src.dim() in (3, 4) and src.is_floating_point():
        t = src if src.dim() == 4 else src.unsqueeze(1)
        return tuple(t.shape), t.dtype, lambda a, b: t[a:b]
    raise ValueError(f"{where}: the LUT source must be a float [V, L, E, D] tensor, a LookupTable or a "
                     f"single-process MoLEForCausalLM, got {type(src).__name__}")


def _tp_metadata(rank: int, world: int, hidden: int, table_id: str) -> Dict[str, str]:
    n = hidden // world
    return {_META + "rank": str(rank), _META + "world_size": str(world), _META + "columns": f"{rank * n}:{(rank + 1) * n}",
            _META + "hidden": str(hidden), _META + "table": table_id}


class _RankSlice:
    """Rank r's part of a float LUT source: columns ``D_r`` of every row, in ``dtype``, quantized
    (each rank's columns on their own, with a block dividing D/N) when ``fmt`` is given."""

    def __init__(self, src: _Source, rank: int, world: int, dtype: Optional[torch.dtype], fmt: Optional[str],
                 block: Optional[int]):
        (V, L, E, D), src_dtype, self._read = src
        n = D // world
        self.rank, self.world, self.hidden = rank, world, D
        self.cols = slice(rank * n, (rank + 1) * n)
        self.shape = (V, L, E, n)
        self.dtype = dtype or src_dtype
        self.template = None  # quantized: format, dim, block over a meta payload
        self.stored_shape, self.stored_dtype = self.shape, self.dtype
        if fmt is not None:
            self.template = quantized_layout(self.shape, fmt, block, self.dtype)
            self.stored_shape, self.stored_dtype = tuple(self.template.data.shape), torch.uint8
        # Source rows are whole (token-major: a rank's columns are strided in every row), read in bounded chunks.
        row = L * E * D * src_dtype.itemsize
        self._step = _chunk_rows(row, V * row)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """The stored rows of tokens [a, b) (float, or the packed uint8 rows of a quantized table)."""
        out = torch.empty((b - a, *self.stored_shape[1:]), dtype=self.stored_dtype)
        q = self.template
        for i in range(a, b, self._step):
            j = min(b, i + self._step)
            x = self._read(i, j)[..., self.cols].to("cpu", self.dtype)
            out[i - a:j - a] = x if q is None else quantize(x, q.format, q.block_size, progress=False).data
        return out

    def write(self, path: str, table_id: str) -> None:
        """The rank's table file, whole or not at all, with metadata naming rank, world size and table."""
        meta = {**_metadata(self.shape, self.dtype, self.template),
                **_tp_metadata(self.rank, self.world, self.hidden, table_id)}
        _write_table(path, self.stored_shape, self.stored_dtype, meta, self.rows)

    def table(self, placement: str, device: torch.device, path: Optional[str]) -> LookupTable:
        """The rank's LookupTable on ``placement`` (disk: written to ``path``, or an anonymous temp file)."""
        if placement == "disk":
            target = path
            if target is None:
                fd, target = tempfile.mkstemp(suffix=".safetensors", prefix="mole_lut_tp_")
                os.close(fd)
            try:
                self.write(target, "")
                return LookupTable.open(target, "disk", device)
            finally:
                if path is None:
                    os.unlink(target)  # the open table keeps its descriptor
        # Rows go straight into the tier's memory, a chunk at a time (the table is never held twice).
        table = LookupTable._build_stored(self.stored_shape, self.stored_dtype, self.template, placement, device,
                                          path=None, staging_bytes=64 << 20, desc=None,
                                          fill_stored=lambda a, b, dst: dst.copy_(self.rows(a, b)))
        table.metadata.update(_tp_metadata(self.rank, self.world, self.hidden, ""))
        return table


def write_sharded_tables(source, path, world_size: int, *, dtype=None, lut_format: Optional[str] = None,
                         block_size: Optional[int] = None) -> List[str]:
    """Writes the ``world_size`` per-rank tables of a float LUT, once, for tensor-parallel loading
    (``TPMoLEForCausalLM.from_pretrained(folder, lut_shards=path)``).

    ``source``: a ``[V, L, E, D]`` tensor, a float LookupTable (any tier) or a single-process
    MoLEForCausalLM (its LUT; the train form computes it). Rank r's file
    (:func:`shard_file`: ``path`` with ``.tp{r}-of-{N}`` before ``.safetensors``) holds columns
    ``[r*D/N, (r+1)*D/N)`` of every row as a ``[V, L, E, D/N]`` table, token-major (each rank then
    reads one contiguous block per token), in ``dtype`` (default: the source's), quantized per
    rank when ``lut_format`` is given (``block_size`` must divide D/N). Metadata names rank, world
    size, columns and a table id shared by the N files, so a rank that opens another rank's file,
    or files of different writes or world sizes, is a clear error. Returns the N paths.
    """
    where = "write_sharded_tables"
    if isinstance(source, MoLEForCausalLM):
        check_tensor_parallel(source.config, world_size, lut_format=lut_format, block_size=block_size)
    src = _lut_source(source, where)
    D = src[0][3]
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1 or D % world_size:
        raise ValueError(f"{where}: world_size must be a positive int dividing the table's D={D}, got {world_size!r}")
    dtype = parse_dtype(dtype, f"{where}: dtype")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{where}: dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_lut_format(lut_format, block_size, D // world_size, f"{where} (each rank's D/N = {D // world_size})")
    table_id = uuid.uuid4().hex
    paths = [shard_file(path, r, world_size) for r in range(world_size)]
    for p in paths:  # every output checked before the first is written (a FIFO or device is never replaced)
        check_replaceable(p, where)
    for r, p in enumerate(paths):
        _RankSlice(src, r, world_size, dtype, lut_format, block_size).write(p, table_id)
    return paths


def _check_shard(meta: Dict[str, str], path: str, rank: int, world: int, hidden: int) -> None:
    """ValueError unless ``meta`` (a table file's metadata) names this rank's shard of a D = ``hidden`` table."""
    try:
        r, n, d = (int(meta[_META + k]) for k in ("rank", "world_size", "hidden"))
    except (KeyError, ValueError):
        raise ValueError(f"{path}: not a tensor-parallel shard (no {_META}rank/world_size/hidden metadata); "
                         "write shards with write_sharded_tables()") from None
    if n != world:
        raise ValueError(f"{path} is a shard for {n} ranks, but the process group has {world}; write shards for "
                         f"{world} ranks")
    if r != rank:
        raise ValueError(f"{path} holds rank {r}'s columns {meta.get(_META + 'columns')}, but this is rank {rank}; "
                         f"each rank opens its own shard ({os.path.basename(shard_file('lut', rank, world))} for a "
                         "base name lut.safetensors)")
    if d != hidden:
        raise ValueError(f"{path} is a shard of a table with D={d}, but the model's hidden_size is {hidden}")


def _signature(table: LookupTable) -> dict:
    """What must be equal on every rank for the ranks' tables to be slices of one table."""
    m = table.metadata
    return dict(table=m.get(_META + "table"), world_size=m.get(_META + "world_size"), hidden=m.get(_META + "hidden"),
                shape=list(table.shape), dtype=str(table.dtype), format=table.format, block_size=table.block_size)


def _shape_dtype(t) -> Tuple[Tuple[int, ...], torch.dtype]:
    if isinstance(t, torch.Tensor):
        return tuple(t.shape), t.dtype
    return tuple(t.get_shape()), _ST_DTYPES.get(t.get_dtype(), torch.uint8)  # a safetensors slice


class _Checkpoint:
    """A checkpoint folder (official layout): config and tensors read on demand, a safetensors tensor
    a slice at a time (a rank reads its rows or columns only); a ``.bin`` read as torch reads it
    (:class:`~mole_kernels.model.checkpoints.WeightFiles`), its LUT served from the file when it
    lies there as torch would read it."""

    def __init__(self, path: str, where: str):
        self.config = cfg = _read_config(path, where)
        t = {}
        self._lut_loc = None
        for f in _weight_files(path, where):
            if is_safetensors(f):
                from safetensors import safe_open

                WeightFiles([f], where)  # the header, validated as the library does (errors name the file)
                h = safe_open(f, framework="pt", device="cpu")
                t.update({k: h.get_slice(k) for k in h.keys()})
            else:
                weights = WeightFiles([f], where)
                self._lut_loc = self._lut_loc or weights.locate(LUT_KEY)
                t.update(weights.load(skip=frozenset({LUT_KEY}) if self._lut_loc is not None else frozenset()))
        t = {k: v for k, v in t.items() if not k.endswith("rotary_emb.inv_freq")}  # older HF saves it
        if cfg.tie_word_embeddings and "lm_head.weight" not in t and "model.embed_tokens.weight" in t:
            t["lm_head.weight"] = t["model.embed_tokens.weight"]
        self._t = t
        names = set(t) | ({LUT_KEY} if self._lut_loc is not None else set())
        self.train_form = any(_is_expert_key(k) for k in names)
        self.has_lut = LUT_KEY in names
        shapes = {k: _shape_dtype(v) for k, v in t.items()}
        if self._lut_loc is not None:
            shapes[LUT_KEY] = (self._lut_loc.shape, self._lut_loc.dtype)
        check_counts(cfg, shapes, where, path)  # before a model of the config's size is built
        if not self.train_form:  # names and full shapes, checked before any rank slices them
            with torch.device("meta"):
                full = MoLEForCausalLM(cfg, reparameterized=True)
            metas = {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in shapes.items()
                     if k != LUT_KEY}
            _check_state_dict(full, metas, where, path)

    def get(self, name: str):
        return self._t[name]

    def lut_source(self, where: str) -> _Source:
        V, L, E, D = self.config.lut_shape
        if self._lut_loc is not None:  # read from the .bin's record in place, rows at a time
            loc = self._lut_loc
            if loc.shape not in ((V, L * E * D), (V, L, E, D)):
                raise ValueError(f"{where}: {LUT_KEY} is {list(loc.shape)} {loc.dtype}, expected a float "
                                 f"[V, L*E*D] = [{V}, {L * E * D}] for this config")
            table = LookupTable._open_at(loc.file, loc.offset, (V, L, E, D), loc.dtype, "disk", "cpu", loc.identity)
            return (V, L, E, D), loc.dtype, table.read
        t = self._t[LUT_KEY]
        shape, dtype = _shape_dtype(t)
        if shape not in ((V, L * E * D), (V, L, E, D)) or not dtype.is_floating_point:
            raise ValueError(f"{where}: {LUT_KEY} is {list(shape)} {dtype}, expected a float [V, L*E*D] = "
                             f"[{V}, {L * E * D}] for this config")
        return (V, L, E, D), dtype, lambda a, b: t[a:b].reshape(b - a, L, E, D)


# ---------------------------------------------------------------- the models ------------------------


class TPMoLEForCausalLM(_TensorParallel, MoLEForCausalLM):
    """The MoLE inference form, tensor-parallel over a process group (see the module docstring).

    Build it on every rank with :meth:`from_model` (a single-process model every rank holds) or
    :meth:`from_pretrained` (a checkpoint folder; the LUT from the folder, a LookupTable file or
    per-rank shard files). ``forward`` and ``generate`` have the single-process API; every rank must
    call them alike. :attr:`lut` is this rank's ``[V, L, E, D/N]`` table (columns :attr:`lut_columns`).
    """

    _base_kwargs: ClassVar[Dict[str, object]] = {"reparameterized": True}

    @property
    def lut_columns(self) -> slice:
        """The columns of D whose LUT values this rank holds and adds."""
        return self._lut_cols

    def _shard_modules(self, group, rank, world):
        super()._shard_modules(group, rank, world)
        n = self.config.hidden_size // world
        self._lut_cols = slice(rank * n, (rank + 1) * n)

    def _ffn(self, l, layer, h, ctx):
        n = layer.post_attention_layernorm(h)
        y = layer.mlp(n)  # this rank's partial sum over its I/N units (down_proj is row-parallel)
        c = self._lut_cols
        # Columns D_r also get this rank's weighted LUT slice and the residual's slice (every column from one
        # rank only), in one fused call; the all-reduce the MLP needs anyway then yields
        # h + mlp(n) + sum_e p_e * LUT[id, l, e, :] on every rank: no collective of its own.
        y[..., c] = ctx(l, n, y[..., c], h[..., c], layer.router.weight)  # as MoLE's _ffn
        group, _, world = self._tp
        return _all_reduce(y, group, world)

    def set_lut(self, table) -> None:
        """Uses ``table`` (this rank's columns :attr:`lut_columns` of every row: ``[V, L, E, D/N]``)."""
        V, L, E, D = self.config.lut_shape
        want = [V, L, E, D // self.tp_world_size]
        if list(getattr(table, "shape", ())) != want:
            raise ValueError(f"set_lut: rank {self.tp_rank}'s table must have shape [V, L, E, D/N] = {want} (columns "
                             f"{self._lut_cols.start}:{self._lut_cols.stop} of D={D}), got {list(getattr(table, 'shape', ()))}")
        self.lut, self._reader = table, None

    def _load_lut(self, make_table: Callable[[], LookupTable], where: str) -> None:
        """``make_table()`` on every rank, then a check that the ranks' tables are slices of one table."""
        group, _, world = self._tp

        def attach():
            table = make_table()
            try:
                self.set_lut(table)
            except BaseException:
                table.close()
                raise
            return table

        table = _on_every_rank(group, world, where, attach)
        try:
            _agree(_signature(table), group, world, where, "the ranks' LUT shards (table id, world size, shape, dtype, "
                   "format)")
        except ValueError:
            self.lut = self._reader = None
            table.close()
            raise

    def _slice_table(self, src: _Source, placement: str, lut_dtype, lut_format, block_size, lut_path,
                     where: str) -> LookupTable:
        """This rank's columns of a single-process float LUT, as a table on ``placement``."""
        _, rank, world = self._tp
        n = self.config.hidden_size // world
        LookupTable._check_placement(placement, self.device, "open")  # before reading anything
        _check_lut_format(lut_format, block_size, n, f"{where} (this rank's D/N = {n} columns)")
        if tuple(src[0]) != self.config.lut_shape:
            raise ValueError(f"{where}: the LUT has shape {list(src[0])} but the config needs "
                             f"{list(self.config.lut_shape)}")
        lut_dtype = parse_dtype(lut_dtype, f"{where}: lut_dtype")
        part = _RankSlice(src, rank, world, lut_dtype, lut_format, block_size)
        return part.table(placement, self.device, shard_file(lut_path, rank, world) if lut_path else None)

    @classmethod
    def from_model(cls, model: MoLEForCausalLM, group=None, *, placement: str = "host", device=None, lut_dtype=None,
                   lut_format: Optional[str] = None, block_size: Optional[int] = None,
                   lut_path: Optional[str] = None) -> "TPMoLEForCausalLM":
        """This rank's part of a single-process MoLE model that every rank holds (checked: equal weights).

        The LUT: the inference form's table (any tier; read a token chunk at a time, the rank keeps its
        columns), or for the train form the LUT computed here on every rank. This rank's table goes
        to ``placement`` (``"disk"``: ``shard_file(lut_path, rank, N)``, default an anonymous temp
        file) in ``lut_dtype`` (default: the source's), quantized per rank with ``lut_format`` /
        ``block_size`` (a block dividing D/N). ``device``: where this rank computes (default: the model's).
        """
        where = f"{cls.__name__}.from_model"
        if not isinstance(model, MoLEForCausalLM) or isinstance(model, _TensorParallel):
            raise ValueError(f"{where}: model must be a single-process MoLEForCausalLM, got {type(model).__name__}")
        tp = cls._shard_of(model, group, device, where)
        tp._load_lut(lambda: tp._slice_table(_lut_source(model, where), placement, lut_dtype, lut_format, block_size,
                                             lut_path, where), where)
        return tp

    @classmethod
    def from_pretrained(cls, path, group=None, *, dtype=None, device=None, placement: str = "host", lut_dtype=None,
                        lut_format: Optional[str] = None, block_size: Optional[int] = None,
                        lut_file: Optional[str] = None, lut_shards: Optional[str] = None,
                        lut_path: Optional[str] = None) -> "TPMoLEForCausalLM":
        """This rank's part of a checkpoint folder in the official layout (every rank calls it).

        A re-parameterized folder: each rank reads its rows/columns of the sharded weights (from
        safetensors, only those bytes) and the replicated ones. Its LUT, in order of preference:

        - ``lut_shards``: the base path given to :func:`write_sharded_tables`; this rank opens
          ``shard_file(lut_shards, rank, N)`` on ``placement`` (disk: read in place, 1/N of the bytes
          per token). ``lut_file``: one table file, either this rank's shard (checked) or a
          single-process table;
        - a single-process table (``lut_file``, or the folder's ``model.moe_table.weight``): the
          official layout is token-major, so a rank's columns are strided inside every row: the
          rank reads whole rows, a bounded chunk of tokens at a time, keeps its columns and puts
          them on ``placement`` (disk: its own file ``shard_file(lut_path, rank, N)``, default an
          anonymous temp file), in ``lut_dtype``, quantized with ``lut_format``/``block_size``.

        A train-form folder is loaded whole on every rank and its LUT computed there (then as
        :meth:`from_model`); for large models write the shards once instead
        (``mole-kernels reparameterize --tensor-parallel N``). ``dtype`` casts the other weights;
        ``device`` is where this rank computes (default CPU).
        """
        where = f"{cls.__name__}.from_pretrained"
        group, rank, world = _group_info(group, where)
        path = os.fspath(path)
        dtype = parse_dtype(dtype, f"{where}: dtype")
        if lut_file is not None and lut_shards is not None:
            raise ValueError(f"{where}: give lut_file or lut_shards, not both")
        ckpt = _on_every_rank(group, world, where, lambda: _Checkpoint(path, where))
        if ckpt.train_form:
            if lut_file is not None or lut_shards is not None:
                raise ValueError(f"{where}: {path!r} holds experts (the train form) but a LUT file was given; "
                                 "expected one form")
            train = _on_every_rank(group, world, where,
                                   lambda: MoLEForCausalLM.from_pretrained(path, dtype=dtype, device=device))
            return cls.from_model(train, group, placement=placement, lut_dtype=lut_dtype, lut_format=lut_format,
                                  block_size=block_size, lut_path=lut_path)
        if not ckpt.has_lut and lut_file is None and lut_shards is None:
            raise ValueError(f"{where}: {path!r} holds neither expert weights nor {LUT_KEY}, and no lut_file or "
                             "lut_shards was given: not a MoLE checkpoint")
        device = torch.device(device) if device is not None else torch.device("cpu")
        tp = _on_every_rank(group, world, where,
                            lambda: cls._from_weights(ckpt.config, ckpt.get, group, rank, world, device=device,
                                                      dtype=dtype))

        def table() -> LookupTable:
            D = tp.config.hidden_size
            shard = shard_file(lut_shards, rank, world) if lut_shards is not None else None
            if shard is None and lut_file is not None:
                from ..table.file_format import _read_header

                if _META + "rank" in _read_header(os.fspath(lut_file)).metadata:
                    shard = os.fspath(lut_file)
            if shard is None:  # a single-process table: this rank's columns of it
                if lut_file is None:
                    return tp._slice_table(ckpt.lut_source(where), placement, lut_dtype, lut_format, block_size,
                                           lut_path, where)
                with LookupTable.open(lut_file, "disk", device) as src:
                    return tp._slice_table(_lut_source(src, where), placement, lut_dtype, lut_format, block_size,
                                           lut_path, where)
            if lut_dtype is not None or lut_path is not None:
                raise ValueError(f"{where}: lut_dtype/lut_path apply when slicing a single-process table; the shard "
                                 f"{shard} is used as stored")
            t = _lut_file_table(shard, placement, device, lut_format, block_size, where)
            try:
                _check_shard(t.metadata, shard, rank, world, D)
            except BaseException:
                t.close()
                raise
            return t

        tp._load_lut(table, where)
        return tp


class TPDenseForCausalLM(_TensorParallel, DenseForCausalLM):
    """The dense baseline, tensor-parallel: :class:`TPMoLEForCausalLM`'s sharding without the LUT
    (one all-reduce after attention, one after the MLP, per layer)."""

    def _ffn(self, l, layer, h, ctx):
        group, _, world = self._tp
        return h + _all_reduce(layer.mlp(layer.post_attention_layernorm(h)), group, world)

    @classmethod
    def from_model(cls, model, group=None, *, device=None) -> "TPDenseForCausalLM":
        """This rank's part of a single-process dense or MoLE model (its attention and shared MLP; the
        experts and router are not used) that every rank holds (checked: equal weights)."""
        where = f"{cls.__name__}.from_model"
        if not isinstance(model, (DenseForCausalLM, MoLEForCausalLM)) or isinstance(model, _TensorParallel):
            raise ValueError(f"{where}: model must be a single-process DenseForCausalLM or MoLEForCausalLM, got "
                             f"{type(model).__name__}")
        return cls._shard_of(model, group, device, where)
