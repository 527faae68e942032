"""The ``mole-kernels`` command: ``demo``, ``reparameterize``, ``quality``, ``generate``, ``info``.

    mole-kernels demo [--save-model DIR]                # no download, no arguments needed
    mole-kernels reparameterize --from TRAIN_DIR --to REP_DIR [--dtype bf16]
                                [--lut-format nf4 --block-size 64 --lut-file LUT.safetensors]
                                [--lut-format "norm:int8@64+f36x5" --quality-text FILE --max-cost 0.5]  # mixed
    mole-kernels quality [--markdown FILE]              # quantized LUTs vs the bf16 LUT
    mole-kernels quality --model DIR --text FILE [--variants "q2/64,norm:int8@64+f36x5"]   # on your model
    mole-kernels generate --model DIR --prompt TEXT     # text in, text out (transformers)
    mole-kernels info                                   # build and device facts

This module imports neither torch nor the extension when it is loaded: `--help`, `--version`
and argument errors answer at once (mole_kernels/__init__.py explains how the package stays
light for the command). Every user error is one line, ``mole-kernels <command>: error: ...``,
exit status 2, found before any long computation: the arguments first, then the paths the
command will write, then what needs torch (a config, a checkpoint's header), then the work.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # torch is imported by the commands that need it (the CLI starts without it)
    import torch

from ._format import human_bytes as _human

PROG = "mole-kernels"
# The float LUT dtypes, by the names every option and message uses.
LUT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Files save_pretrained writes into a model folder (a LUT file must not be one of them).
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


def _torch_dtype(name: str):
    import torch

    return getattr(torch, LUT_DTYPES[name])


# ---------------------------------------------------------------- paths -------------------


def _same_path(a: str, b: str) -> bool:
    """Whether two paths name the same file or folder (through symlinks and hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _inside(path: str, folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _check_writable_folder(folder: str, what: str) -> None:
    """Creates and removes a probe file: os.access says yes to root even on a read-only mount."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".mole-kernels-probe-", dir=folder)
    except OSError as e:
        raise UsageError(f"{what}: cannot write into {folder!r} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def _check_parent(path: str, option: str) -> str:
    """The folder a new file or folder ``path`` goes into must exist and be writable."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path!r}: its folder {parent!r} does not exist")
    _check_writable_folder(parent, f"{option} {path!r}")
    return path


def _check_replaceable(path: str, option: str) -> None:
    """An output file's name must be free or hold a regular file: a FIFO or device (/dev/null) is
    never replaced (nor written through), and an empty path is not a path."""
    from ._files import check_replaceable

    try:
        check_replaceable(path, option)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_output_file(path: str, option: str) -> str:
    """A file the command will create or replace."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a folder; give a file name")
    _check_replaceable(path, option)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path!r} is read-only")
    return _check_parent(path, option)


def check_output_folder(path: str, option: str) -> str:
    """A folder the command will create (or whose model files it will replace)."""
    if not path:
        raise UsageError(f"{option}: the output path is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a file, not a folder")
    if os.path.isdir(path):
        for name in MODEL_FILES:
            _check_replaceable(os.path.join(path, name), option)
        _check_writable_folder(path, f"{option} {path!r}")
        return path
    return _check_parent(path, option)


# ---------------------------------------------------------------- demo --------------------


def check_model_memory(args, copies: int) -> None:
    """UsageError when the model the size options describe cannot fit this machine's memory:
    ``copies`` float32 copies of its LUT, twice its weights (the command's baselines), the logits
    and KV cache of its tokens: a lower bound, checked before anything is built."""
    V, D, L, E = args.vocab, args.hidden, args.layers, args.experts
    F = getattr(args, "ffn", None) or 4 * D
    weights = 2 * V * D + L * (3 * D * D + 2 * D * F * (1 + E) + D * E)
    tokens = args.batch * (getattr(args, "prompt_len", 0) + getattr(args, "new_tokens", 0) + getattr(args, "seq_len", 0))
    need = 4 * (2 * weights + copies * V * L * E * D + tokens * (V + 2 * L * D))  # + logits and KV cache
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform says
        return
    if need > have:
        raise UsageError(f"--vocab {V} --hidden {D} --layers {L} --experts {E}: the model needs at least "
                         f"{_human(need)} of memory, this machine has {_human(have)}")


def cmd_demo(args) -> int:
    if args.save_model is not None:
        check_output_folder(args.save_model, "--save-model")
    check_model_memory(args, copies=4)
    if args.tensor_parallel is not None:  # every torchrun rank runs this; rank 0 prints
        from ._demo_tp import run_tensor_parallel_demo

        return run_tensor_parallel_demo(args)
    from ._demo import demo_config, run_demo

    cfg = demo_config(args)  # a bad combination of sizes fails here, before any work
    return run_demo(args, cfg)


# ---------------------------------------------------------------- reparameterize ----------


def _check_reparameterize_paths(args) -> None:
    """Nothing is written into the input folder, and the LUT file is none of the output's own files.
    Checked before the output folders are probed (a probe file must not land in the input either)."""
    src, dst = args.src, args.dst
    for option, value in (("--from", src), ("--to", dst), ("--lut-file", args.lut_file)):
        if value == "":
            raise UsageError(f"{option}: the path is empty")
    if not os.path.isdir(src):
        raise UsageError(f"--from {src!r} is not a folder (expected a train-form model folder with config.json)")
    if _same_path(src, dst) or _inside(dst, src):
        raise UsageError(f"--to {dst!r} is (or is inside) --from {src!r}: nothing is written into the train-form folder")
    inputs = [os.path.join(src, n) for n in os.listdir(src)]
    for name in MODEL_FILES:  # an output file may already be a link to an input file
        if any(_same_path(os.path.join(dst, name), f) for f in inputs):
            raise UsageError(f"--to {dst!r}: its {name} is the same file as one in --from {src!r}")
    if args.lut_file:
        lut = args.lut_file
        if _inside(lut, src):
            raise UsageError(f"--lut-file {lut!r} is inside --from {src!r}: nothing is written into the "
                             "train-form folder")
        same = next((f for f in inputs if _same_path(lut, f)), None)
        if same is not None:
            raise UsageError(f"--lut-file {lut!r} is the same file as {same!r} of --from")
        for name in MODEL_FILES:
            if _same_path(lut, os.path.join(dst, name)):
                raise UsageError(f"--lut-file {lut!r} is the output's own {name}; choose another file name")
    check_output_folder(dst, "--to")
    if args.lut_file:
        check_output_file(args.lut_file, "--lut-file")


def _lut_plan(text: str, hidden: Optional[int]):
    """The parsed mixed plan of --lut-format (mole_kernels.mixed.parse_plan), or None for one format."""
    from .mixed import is_plan, parse_plan

    if not is_plan(text):
        return None
    try:
        return parse_plan(text, hidden, where="--lut-format")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _gate_error(e: ValueError) -> UsageError:
    """The library's gate refusal (QualityError included) in the command's own words."""
    return UsageError(str(e).replace("max_cost=", "--max-cost").replace("quality_text=", "--quality-text")
                      .replace("check_quality=False", "--no-quality-check").replace("counts=", "--counts-text"))


def cmd_reparameterize(args) -> int:
    if args.block_size is not None and args.lut_format is None:
        raise UsageError("--block-size needs --lut-format (a float LUT has no blocks)")
    if args.lut_format is not None and not args.lut_file:
        raise UsageError("--lut-format needs --lut-file: the official layout has no quantized form, so the "
                         "quantized LUT is written there (the folder keeps the float LUT)")
    if args.tensor_parallel is not None and not args.lut_file:
        raise UsageError("--tensor-parallel needs --lut-file: the base name of the per-rank tables "
                         "(FILE.tp{r}-of-{N}.safetensors)")
    mixed = args.lut_format is not None and _lut_plan(args.lut_format, None) is not None  # syntax: before any path
    if mixed and args.block_size is not None:
        raise UsageError(f"--block-size does not apply to the mixed plan {args.lut_format!r} (it names each part's "
                         "block: FORMAT/BLOCK)")
    if mixed and args.tensor_parallel is not None:
        raise UsageError(f"--tensor-parallel: the mixed plan {args.lut_format!r} is served by MoLEForCausalLM on a "
                         "CPU only (host or disk tier); per-rank tables take one format")
    if args.counts_text is not None and not mixed:
        raise UsageError("--counts-text ranks the ids of a mixed --lut-format plan ([norm:]FORMAT@N+...+FORMAT)")
    if mixed and args.counts_text is None and args.quality_text is None:
        raise UsageError(f"--lut-format {args.lut_format!r} is a mixed plan, which ranks ids by their count in a text: "
                         "give --counts-text FILE, or the quality gate's --quality-text FILE (with --max-cost), whose "
                         "text then ranks them")
    if args.counts_text is not None and not os.path.isfile(args.counts_text):
        raise UsageError(f"--counts-text {args.counts_text!r} is not a file")
    _check_reparameterize_paths(args)
    from .model import MoLEForCausalLM

    dtype = _torch_dtype(args.dtype)
    model = MoLEForCausalLM.from_pretrained(args.src)
    if model.is_reparameterized:
        raise UsageError(f"--from {args.src!r} is already re-parameterized (it holds model.moe_table.weight)")
    if args.tensor_parallel is not None:  # sizes N ranks cannot split, or a block D/N cannot take: before computing
        from .model.tensor_parallel import check_tensor_parallel

        check_tensor_parallel(model.config, args.tensor_parallel, lut_format=args.lut_format,
                              block_size=args.block_size)
        from .model.tensor_parallel import shard_file

        for r in range(args.tensor_parallel):  # the per-rank files' names, before the long computation
            check_output_file(shard_file(args.lut_file, r, args.tensor_parallel), "--lut-file")
    elif mixed:  # block sizes and ranks that do not fit the model, counts beyond the vocabulary: before computing
        from .mixed import check_plan

        plan = _lut_plan(args.lut_format, model.config.hidden_size)
        try:
            check_plan(plan, model.config.vocab_size, f"--lut-format {args.lut_format!r}")
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif args.lut_format is not None:  # a block size that does not fit the model fails before the long computation
        _check_block(args.lut_format, args.block_size, model.config.hidden_size, "--lut-format/--block-size")
    if (args.max_cost is None) != (args.quality_text is None):
        raise UsageError("the quality gate needs both --max-cost and --quality-text")
    if args.max_cost is not None and args.lut_format is None:
        raise UsageError("--max-cost needs --lut-format: the gate measures a quantized format's cost")
    text = None
    if args.quality_text is not None:
        text = _text_windows(args.src, args.quality_text, args.quality_seq_len, None, "--quality-text")
    max_cost = None if args.max_cost is None else args.max_cost / 100
    try:  # before the long computation: the gate (or its refusal) of a format below 4 bits
        model._quality_gate(args.lut_format, args.block_size, max_cost, text, not args.no_quality_check,
                            not args.quiet)
    except ValueError as e:
        raise _gate_error(e) from None
    counts = None
    if mixed:  # ids ranked by their count in --counts-text (every token of it), else in --quality-text
        from .mixed import token_counts

        ids = _text_ids(args.src, args.counts_text, "--counts-text") if args.counts_text is not None else text
        counts = token_counts(ids, model.config.vocab_size)
    t0 = time.perf_counter()
    inf = model.reparameterize(placement="host", dtype=dtype, device="cpu", chunk_size=args.chunk_size,
                               progress=not args.quiet)
    m = gate = None
    if mixed:  # made (and measured by the gate) before anything is written: a refusal leaves no file
        try:
            m, gate = model._mixed_lut(inf.lut.read(), plan, counts, max_cost, text, not args.quiet)
        except ValueError as e:
            raise _gate_error(e) from None
    inf.save_pretrained(args.dst)
    _copy_tokenizer(args.src, args.dst)
    V, L, E, D = inf.config.lut_shape
    note = ""
    if args.tensor_parallel is not None:
        from .model.tensor_parallel import write_sharded_tables

        paths = write_sharded_tables(inf.lut, args.lut_file, args.tensor_parallel, lut_format=args.lut_format,
                                     block_size=args.block_size)
        note = (f"; {len(paths)} per-rank tables {paths[0]}, ... ({_human(os.path.getsize(paths[0]))} each"
                + (f", {args.lut_format}" if args.lut_format else "") + f"), for TPMoLEForCausalLM.from_pretrained("
                f"{args.dst!r}, lut_shards={args.lut_file!r}) on {len(paths)} ranks")
    elif m is not None:
        from .mixed import save_mixed

        save_mixed(args.lut_file, m)
        note = (f"; mixed LUT {m.plan} ({m.describe()}) = {m.bits_per_value:.3f} bits/value, {_human(m.nbytes)} in "
                f"{args.lut_file} (ids ranked by their count in {args.counts_text or args.quality_text}"
                + ("" if gate is None else f"; quality gate: {100 * gate['cost']:+.3f} % perplexity on "
                   f"{args.quality_text}, at most {args.max_cost:g} %") + ")")
    elif args.lut_format is not None:
        from .table import LookupTable

        # Quantized chunk by chunk straight into the file: never a second copy of the table in RAM.
        with LookupTable.build(inf.lut.shape, inf.lut.dtype, lambda a, b, out: out.copy_(inf.lut.read(a, b)), "disk",
                               "cpu", path=args.lut_file, format=args.lut_format, block_size=args.block_size,
                               desc="quantizing LUT", progress=not args.quiet) as q:
            note = (f"; quantized LUT ({q.format}, block {q.block_size}) = {_human(q.nbytes)} "
                    f"({_human(q.row_bytes)} per token) in {args.lut_file}")
    elif args.lut_file:
        inf.lut.save(args.lut_file)
        note = f"; standalone LUT file {args.lut_file}"
    print(f"wrote {args.dst}: LUT [V={V}, L={L}, E={E}, D={D}] {LUT_DTYPES[args.dtype]} = {_human(inf.lut.nbytes)} "
          f"({_human(inf.lut.row_bytes)} per token) as model.moe_table.weight [{V}, {L * E * D}]"
          + note + f" in {time.perf_counter() - t0:.1f} s")
    return 0


def _check_block(fmt: str, block: Optional[int], hidden: int, option: str) -> None:
    """UsageError unless ``fmt`` is a quantization format and ``block`` (None: its default) fits ``hidden``."""
    from .quant import canonical_format, default_block_size, row_layout

    try:
        name = canonical_format(fmt)
        row_layout(name, hidden, default_block_size(name, hidden) if block is None else block)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


# ---------------------------------------------------------------- quality -----------------

DEFAULT_QUALITY_VARIANTS = "fp32,fp16,int8,fp8-128,nf4-64,nf4-128,nf4-768"


def _parse_variant(v: str):
    """'nf4-64' -> ('nf4', 64); 'int8' -> ('int8', None); 'fp32' -> ('fp32', None) (syntax only)."""
    name, _, block = v.strip().partition("-")
    try:
        b = int(block) if block else None
    except ValueError:
        raise UsageError(f"--variants: {v!r}: the block size after '-' must be an int") from None
    if name in LUT_DTYPES and b is not None:
        raise UsageError(f"--variants: {v!r}: a float LUT has no block size")
    return name, b


def quality_variants(spec: Optional[str], hidden: int):
    """(variants [(float dtype name | format, block)], notes). The default list drops, with a note, the
    blocks that do not divide ``hidden``; a list the user gave must fit as it is."""
    variants, notes = [], []
    for item in (spec or DEFAULT_QUALITY_VARIANTS).split(","):
        if not item.strip():
            continue
        name, block = _parse_variant(item)
        if name not in LUT_DTYPES:
            try:
                _check_block(name, block, hidden, f"--variants {item.strip()!r}")
            except UsageError:
                if spec is not None:
                    raise
                notes.append(f"{item.strip()} skipped: block {block} does not divide --hidden {hidden}")
                continue
        variants.append((name, block))
    if not variants:
        raise UsageError("--variants: no variant given")
    return variants, notes


def lut_quality(train, input_ids, variants, *, base_dtype="bf16", progress: bool = False) -> list:
    """Each LUT variant's model against the model with the ``base_dtype`` LUT, on one batch.

    ``train``: a train-form :class:`MoLEForCausalLM`; its LUT is computed once in float32, rounded
    to ``base_dtype`` (the reference), and each variant is either a float dtype (a torch dtype or
    a name in :data:`LUT_DTYPES`: the float32 LUT rounded to it) or ``(format, block_size)``, the
    reference LUT quantized (dequantized rows in ``base_dtype``, as the gather returns them).
    Logits are teacher-forced on ``input_ids`` ``[B, S]``. Returns one dict per variant (the
    reference first): ``bytes_per_token`` (LUT bytes one token's rows take, all layers),
    ``ratio`` (vs the reference), ``max_dlogit``/``mean_dlogit`` (|logits - reference logits|),
    ``kl`` (mean over positions of KL(reference || variant) of the next-token distributions,
    nats, float64), ``agree`` (fraction of positions whose greedy next token equals the
    reference's). ``progress``: a bar over the variants on stderr.
    """
    import torch

    from ._progress import progress_bar
    from .table import LookupTable

    names = {getattr(torch, v): k for k, v in LUT_DTYPES.items()}
    base = _torch_dtype(base_dtype) if isinstance(base_dtype, str) else base_dtype
    with torch.no_grad():
        lut32 = train.compute_lut(dtype=torch.float32, progress=progress)
        ref_lut = lut32.to(base)

        def run(table):
            inf = train._inference_form(table)
            try:
                return inf(input_ids).logits.double()
            finally:
                table.close()

        ref = run(LookupTable.from_tensor(ref_lut, "host", device=train.device))
        ref_logp = torch.log_softmax(ref, -1)
        ref_tok = ref.argmax(-1)
        ref_bytes = ref_lut[0].numel() * ref_lut.element_size()
        rows = [dict(name=f"{names[base]} (reference)", bytes_per_token=ref_bytes, ratio=1.0, max_dlogit=0.0,
                     mean_dlogit=0.0, kl=0.0, agree=1.0)]
        with progress_bar(len(variants), "quality: LUT variants", enabled=progress) as bar:
            for fmt, block in variants:
                dtype = _torch_dtype(fmt) if fmt in LUT_DTYPES else fmt if isinstance(fmt, torch.dtype) else None
                if dtype is not None:
                    table = LookupTable.from_tensor(lut32.to(dtype), "host", device=train.device)
                    name = names[dtype]
                else:
                    table = LookupTable.from_tensor(ref_lut, "host", device=train.device, format=fmt, block_size=block)
                    name = table.format if table.format == "int8" else f"{table.format} (block {table.block_size})"
                nbytes = table.row_bytes
                logits = run(table)
                d = (logits - ref).abs()
                logp = torch.log_softmax(logits, -1)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
                rows.append(dict(name=name, bytes_per_token=nbytes, ratio=nbytes / ref_bytes,
                                 max_dlogit=d.max().item(), mean_dlogit=d.mean().item(), kl=kl,
                                 agree=(logits.argmax(-1) == ref_tok).double().mean().item()))
                bar.update(1)
    return rows


def _quality_table(rows) -> str:
    lines = ["| LUT | bytes/token | vs bf16 | max abs dlogits | mean abs dlogits | KL (nats) | greedy agreement |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bytes_per_token']:,} | {r['ratio']:.3f} | {r['max_dlogit']:.3e} | "
                     f"{r['mean_dlogit']:.3e} | {r['kl']:.3e} | {100 * r['agree']:.2f}% |")
    return "\n".join(lines)


QUALITY_NOTES = """Columns:
- bytes/token: one token's LUT rows for all layers as stored (quantized rows include their float32
  scales and the padding to 16-byte rows); what a prefetch moves over PCIe or reads from disk.
- vs bf16: bytes/token over the bf16 LUT's.
- max/mean abs dlogits: |logits - the bf16 LUT model's logits|, over every position and vocabulary entry.
- fp32 and fp16 rows are the float32 LUT rounded to that dtype: the differences bf16 rounding alone
  makes, for scale. int8/fp8/nf4 rows are the bf16 LUT quantized, dequantized in the gather.
- KL: mean over positions of KL(p_bf16 || p_variant) of the next-token distributions, in float64.
  Greedy agreement: share of positions whose argmax next token equals the bf16 LUT model's.
- The model has random weights, so its next-token distributions are flatter than a trained
  model's and close calls between the top two tokens are common: greedy agreement here is a
  pessimistic stand-in for a trained model's. The paper's accuracy numbers need trained weights.
"""


DEFAULT_MODEL_VARIANTS = "int8,nf4/64,q3/128,q2/64,norm:int8@64+f48x6,norm:int8@64+f36x5"


def _parse_model_variant(item: str, hidden: int):
    """A --variants item of `quality --model`: 'FORMAT[/BLOCK]' (also 'FORMAT-BLOCK'), or a mixed plan
    '[norm:]FORMAT[/BLOCK]@N+...+FORMAT[/BLOCK]' (mole_kernels.mixed.parse_plan, the grammar --lut-format of
    `reparameterize` takes too). Returns what mole_kernels.quality.format_costs takes."""
    from .mixed import is_plan, parse_plan

    text = item.strip()
    if is_plan(text):
        try:
            return parse_plan(text, hidden, where="--variants")
        except ValueError as e:
            raise UsageError(str(e)) from None
    fmt, sep, block = text.replace("-", "/").partition("/")
    try:
        b = int(block) if sep else None
    except ValueError:
        raise UsageError(f"--variants {item!r}: the block size after '/' must be an int") from None
    from .factored import parse_factored_format

    if parse_factored_format(fmt) is not None:
        if b is not None:
            raise UsageError(f"--variants {item!r}: a factored part ({fmt}) has no block size")
        return fmt
    _check_block(fmt, b, hidden, f"--variants {item!r}")
    return fmt if b is None else f"{fmt}/{b}"


def _text_ids(tok_dir: str, path: str, option: str = "--text") -> "torch.Tensor":
    """Every token id of the file's text, by the folder's tokenizer (tokenizer.json)."""
    tok_file = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise UsageError(f"{tok_dir!r} has no tokenizer.json: pass --tokenizer DIR naming a folder that has one")
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path!r} is not a file")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("`mole-kernels quality --model` needs tokenizers: pip install tokenizers") from None
    import torch

    with open(path, encoding="utf-8", errors="replace") as f:
        return torch.tensor(Tokenizer.from_file(tok_file).encode(f.read()).ids, dtype=torch.long)


def _text_windows(tok_dir: str, path: str, seq_len: int, max_windows: Optional[int], option: str = "--text"):
    """The file's text as token windows [N, seq_len] of the folder's tokenizer (tokenizer.json)."""
    ids = _text_ids(tok_dir, path, option)
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    if n < 1:
        raise UsageError(f"{option} {path!r} holds {len(ids)} tokens, fewer than one window of {seq_len} tokens")
    return ids[:n * seq_len].view(n, seq_len)


def cmd_quality_of_model(args) -> int:
    """`quality --model DIR --text FILE`: each format's perplexity cost on the user's model and text."""
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model!r} is not a model folder (it has no config.json)")
    if args.text is None:
        raise UsageError("--model needs --text FILE: the text the perplexity is measured on")
    if not os.path.isfile(args.text):
        raise UsageError(f"--text {args.text!r} is not a file")
    from .mixed import token_counts
    from .model import MoLEForCausalLM
    from .quality import format_costs

    model = MoLEForCausalLM.from_pretrained(args.model)
    if model.is_reparameterized:
        raise UsageError(f"--model {args.model!r} is re-parameterized (it holds model.moe_table.weight, not the "
                         "experts): the quality gate quantizes the LUT computed from the train-form folder")
    variants = []
    for item in (args.variants or DEFAULT_MODEL_VARIANTS).split(","):
        if not item.strip():
            continue
        try:
            variants.append(_parse_model_variant(item, model.config.hidden_size))
        except UsageError as e:
            if args.variants is not None:  # the user's own list must fit as it is
                raise
            print(f"{item} skipped: {e}")  # a default whose block does not fit this model
    if not variants:
        raise UsageError("--variants: no variant given")
    text = _text_windows(args.tokenizer or args.model, args.text, args.seq_len, args.max_windows)
    counts = token_counts(text, model.config.vocab_size)  # mixed plans rank ids by their frequency in the text
    print(f"{len(variants)} LUT formats on {text.shape[0]} windows of {text.shape[1]} tokens of {args.text} ...",
          flush=True)
    t0 = time.perf_counter()
    rows = format_costs(model, text, variants, counts=counts, progress=not args.quiet)
    table = "\n".join(["| LUT | bits/value | perplexity | cost |", "|---|---:|---:|---:|"] + [
        f"| {r['name']} | {r['bits']:.3f} | {r['ppl']:.4f} | {100 * r['cost']:+.3f} % |" for r in rows])
    print(table)
    print(f"({time.perf_counter() - t0:.1f} s; cost: perplexity vs the {rows[0]['name']} LUT; mixed plans rank "
          "ids by their count in the text)")
    if args.markdown is not None:
        with open(args.markdown, "w") as f:
            f.write(f"# LUT formats on {args.model}\n\n- command: `{shlex.join(sys.argv)}`\n- text: {args.text} "
                    f"({text.shape[0]} windows of {text.shape[1]} tokens)\n\n{table}\n")
    return 0


def cmd_quality(args) -> int:
    import datetime
    import platform

    if args.markdown is not None:
        check_output_file(args.markdown, "--markdown")
    if args.model is not None:
        return cmd_quality_of_model(args)
    if args.text is not None:
        raise UsageError("--text needs --model: the seeded model has random weights (no text to measure on)")
    check_model_memory(args, copies=3)
    variants, notes = quality_variants(args.variants, args.hidden)
    import torch

    from .model import MoLEConfig, MoLEForCausalLM

    cfg = MoLEConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     num_key_value_heads=max(1, args.heads // 2), num_experts=args.experts)
    for note in notes:
        print(note)
    print(f"building a seeded V={cfg.vocab_size} L={cfg.num_hidden_layers} E={cfg.num_experts} "
          f"D={cfg.hidden_size} model and {len(variants)} LUT variants ...", flush=True)
    torch.manual_seed(args.seed)
    train = MoLEForCausalLM(cfg, init_std=args.init_std).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    t0 = time.perf_counter()
    rows = lut_quality(train, ids, variants, progress=not args.quiet)
    with torch.no_grad():
        ref_std = train(ids[:1]).logits.float().std().item()
    took = time.perf_counter() - t0
    desc = (f"Reference model: MoLE, V={cfg.vocab_size}, L={cfg.num_hidden_layers}, E={cfg.num_experts}, "
            f"D={cfg.hidden_size}, FFN={cfg.intermediate_size}, random weights (seed {args.seed}, init std "
            f"{args.init_std}), float32 compute; batch {args.batch} x {args.seq_len} random tokens, logits "
            f"teacher-forced at every position ({args.batch * args.seq_len} positions, logit std {ref_std:.3f}). "
            "Every quantized LUT is the bf16 LUT quantized; every row compares with the model using the bf16 LUT.")
    table = _quality_table(rows)
    print(f"\n{desc}\n\n{table}\n\n{QUALITY_NOTES}\n({took:.1f} s)")
    if args.markdown is not None:
        from ._files import atomic_write

        with atomic_write(args.markdown, "w", encoding="utf-8") as f:
            f.write("".join([
                "# Quantized LUT quality on the reference model\n\n",
                f"- date: {datetime.date.today().isoformat()}\n",
                f"- machine: {platform.node() or 'unknown'} ({platform.machine()}, {os.cpu_count()} CPUs, "
                f"{platform.system()}), torch {torch.__version__}, CPU only\n",
                f"- command: `{args.command_line}`\n\n",
                desc + "\n\n" + table + "\n\n" + QUALITY_NOTES]))
        print(f"wrote {args.markdown}")
    return 0


# ---------------------------------------------------------------- generate ----------------

# The files a Hugging Face tokenizer folder holds (any one of them makes AutoTokenizer try).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")
HF_PIN = "transformers>=5.16.1,<5.20"


def _copy_tokenizer(src: str, dst: str) -> None:
    """A converted folder keeps the tokenizer of the folder it came from (text in, text out still works)."""
    import shutil

    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def describe_table(table) -> str:
    """What a model's LUT stores, in the words every command uses: a mixed table by its plan and bits per
    value, a quantized one by format and block, a float one by dtype."""
    if getattr(table, "format", None) == "mixed":  # a MixedLookupTable
        return f"mixed {table.lut.plan} ({table.lut.describe()}), {table.bits_per_value:.3f} bits/value"
    if getattr(table, "quantized", False):
        return f"{table.format} (block {table.block_size})"
    return str(table.dtype).replace("torch.", "")


def cmd_generate(args) -> int:
    """Text in, text out through transformers: the folder's tokenizer, MoleForCausalLM.generate with a
    TextStreamer (tokens reach the terminal as they are made), the LUT on the tier asked for."""
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model!r} is not a model folder (it has no config.json)")
    tok_dir = args.tokenizer or args.model
    if not any(os.path.isfile(os.path.join(tok_dir, n)) for n in TOKENIZER_FILES):
        raise UsageError(f"{'--tokenizer' if args.tokenizer else '--model'} {tok_dir!r} has no tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES[:2])}, ...): pass --tokenizer DIR naming a folder that has one "
                         "(`mole-kernels demo --save-model DIR` writes one; tokenizer.save_pretrained(DIR) saves "
                         "yours)")
    if not args.prompt:
        raise UsageError("--prompt is empty: give the text to continue")
    sampling = args.temperature is not None or args.top_p is not None or args.top_k is not None
    if args.temperature == 0 and (args.top_p is not None or args.top_k is not None):
        raise UsageError("--temperature 0 is greedy decoding; --top-p/--top-k need a temperature > 0")
    try:
        import torch
        from transformers import AutoTokenizer, TextStreamer

        from .integrations.hf import MoleForCausalLM
    except ImportError as e:
        raise ImportError(f"{e}; `mole-kernels generate` needs transformers and tokenizers: "
                          f"pip install '{HF_PIN}' tokenizers") from None
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = MoleForCausalLM.from_pretrained(args.model, lut_placement=args.placement, lut_file=args.lut_file,
                                            device=device)
    enc = tokenizer(args.prompt, return_tensors="pt").to(device)
    if enc["input_ids"].shape[1] == 0:
        raise UsageError(f"--prompt {args.prompt!r} encodes to no tokens")
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling and args.temperature != 0)
    if options["do_sample"]:
        options.update(temperature=args.temperature or 1.0, top_p=args.top_p or 1.0, top_k=args.top_k or 0)
        torch.manual_seed(args.seed)
    tier = model.lut.placement if model.lut is not None else "none (train form: experts computed)"
    print(f"{args.model}: LUT tier {tier}, {'sampling' if options['do_sample'] else 'greedy'}, "
          f"{args.max_new_tokens} new tokens at most" + ("" if model.lut is None else
                                                         f"; LUT {describe_table(model.lut)}"),
          file=sys.stderr, flush=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)  # as the text a pipeline returns
    out = model.generate(**enc, streamer=streamer, pad_token_id=pad, **options)
    took = time.perf_counter() - t0
    new = out.shape[1] - enc["input_ids"].shape[1]
    print(f"{new} tokens in {took:.2f} s ({new / took:.1f} tokens/s)", file=sys.stderr)
    return 0


def _generate_parser(command) -> None:
    g = command("generate", "text in, text out: continue a prompt with a model folder through transformers",
                "Loads a model folder (train form or re-parameterized; ours or the official layout) with its "
                "tokenizer through transformers (MoleForCausalLM, mole_kernels.integrations.hf) and streams the "
                f"continuation of --prompt to stdout as it is generated. Needs {HF_PIN} and tokenizers. Greedy "
                "unless --temperature, --top-p or --top-k is given.")
    g.add_argument("--model", required=True, metavar="DIR", help="model folder (config.json + weights)")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: --model)")
    g.add_argument("--placement", default=None, choices=["device", "host", "disk"],
                   help="the LUT's tier (default: host for a re-parameterized folder; a train-form folder is "
                        "re-parameterized into the tier given, or else runs its experts)")
    g.add_argument("--lut-file", default=None, metavar="FILE",
                   help="a LookupTable file to use as the LUT (e.g. a quantized one from `reparameterize --lut-file`)")
    g.add_argument("--max-new-tokens", type=_int_at_least(0), default=32, help="tokens to generate at most")
    g.add_argument("--temperature", type=_non_negative_float, default=None,
                   help="sample with this temperature (0: greedy)")
    g.add_argument("--top-p", type=_probability, default=None, help="sample from the smallest set of tokens with "
                                                                    "this much probability")
    g.add_argument("--top-k", type=POSITIVE, default=None, help="sample from the K most likely tokens")
    g.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the sampler")
    g.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    g.set_defaults(func=cmd_generate)


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _probability(text):
    value = _non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# ---------------------------------------------------------------- info --------------------


def cmd_info(args) -> int:
    import torch

    from . import __version__, build_info

    facts = {"mole_kernels": __version__, "python": sys.version.split()[0], **build_info()}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory": _human(p.total_memory)})
    facts["cuda_devices"] = devices
    facts["lut_tiers"] = (["device"] if devices else []) + ["host", "disk"]
    facts["cpu_threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        for k, v in facts.items():
            print(f"{k:24s} {v}")
    return 0


# ---------------------------------------------------------------- arguments ---------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message}{_suggestion(message)}\n")


def _suggestion(message: str) -> str:
    """" (did you mean 'demo'?)" for a mistyped command or choice (argparse suggests only from Python 3.14 on)."""
    import difflib
    import re

    m = re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)", message)
    if m is None or "did you mean" in message:
        return ""
    choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
    close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" where there is a default to show (not for flags or optional values)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


LUT_FORMATS = ("int8", "fp8", "fp8_e4m3", "nf4", "q3", "q2", "q1")


def _lut_format_arg(text):
    """--lut-format: a format name, or text written as a mixed plan (its parts are checked by the command)."""
    from .mixed import is_plan

    if text in LUT_FORMATS or is_plan(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a format ({', '.join(LUT_FORMATS)}) nor a mixed plan "
                                     "[norm:]FORMAT[/BLOCK]@N+...+FORMAT[/BLOCK] nor a factored format f<rank>x<bits>")


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _int_in(low, high):
    """An int in [low, high] (sizes and thread counts are bounded: beyond, torch would abort)."""
    at_least = _int_at_least(low)

    def parse(text):
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    parse.__name__ = f"int in [{low}, {high}]"
    return parse


POSITIVE = _int_in(1, 2 ** 31 - 1)  # sizes: token ids and counts are int32-addressable
THREADS = _int_in(1, 4 * (os.cpu_count() or 1))


def _model_options(p, *, vocab, hidden, layers, experts, heads, ffn=None):
    p.add_argument("--vocab", type=POSITIVE, default=vocab, help="vocabulary size V")
    p.add_argument("--hidden", type=POSITIVE, default=hidden, help="hidden size D")
    if ffn is not None:
        p.add_argument("--ffn", type=POSITIVE, default=ffn, help="shared and expert MLP hidden size")
    p.add_argument("--layers", type=POSITIVE, default=layers, help="decoder layers L")
    p.add_argument("--experts", type=POSITIVE, default=experts, help="routed experts per layer E")
    p.add_argument("--heads", type=POSITIVE, default=heads,
                   help="attention heads (key/value heads: half as many); must divide --hidden")
    p.add_argument("--seed", type=_int_in(0, 2 ** 63 - 1), default=0, help="seed of the random weights and tokens")


def _parser(prog: str) -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog=prog, description="Mixture-of-Lookup-Experts inference kernels: a demo, checkpoint "
                                       "conversion, LUT quantization quality, text generation and build facts.",
                formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name, help, description):
        return sub.add_parser(name, help=help, description=description, formatter_class=_Help)

    d = command("demo", "build a small seeded MoLE model, re-parameterize it, time generation on every LUT tier",
                "Builds a small MoLE model with random weights (no download), re-parameterizes its experts into a "
                "LUT, and times greedy generation with the LUT on every tier this machine has (and bf16/int8/nf4 "
                "tables), next to the train form, a dense and an MoE-with-offloaded-experts baseline. Runs are "
                "interleaved and repeated; the table shows medians and explains every column.")
    _model_options(d, vocab=2048, hidden=128, layers=4, experts=4, heads=4)
    d.add_argument("--batch", type=POSITIVE, default=1, help="sequences generated at once")
    d.add_argument("--prompt-len", type=POSITIVE, default=16, help="prompt tokens per sequence")
    d.add_argument("--new-tokens", type=_int_in(2, 2 ** 31 - 1), default=32,
                   help="tokens generated per sequence (at least 2: one from the prefill, one decode step)")
    d.add_argument("--repeats", type=POSITIVE, default=5, help="timed runs per model (interleaved; medians shown)")
    d.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    d.add_argument("--threads", type=THREADS, default=None,
                   help="CPU threads (default: 1 on the CPU, where one thread is fastest for a model this small; "
                        "torch's default when a GPU runs the model)")
    d.add_argument("--quiet", action="store_true",
                   help="no progress bars (bars are drawn only when stderr is a terminal in any case)")
    d.add_argument("--save-model", metavar="DIR", default=None,
                   help="also save the train-form model (config.json + model.safetensors) into DIR: the input "
                        "of `mole-kernels reparameterize --from DIR`")
    d.add_argument("--tensor-parallel", type=POSITIVE, default=None, metavar="N",
                   help="run the models tensor-parallel over N processes, launched by torchrun: `torchrun --standalone "
                        "--nproc-per-node N -m mole_kernels demo --tensor-parallel N` (rank 0 prints the table, each "
                        "rank's LUT bytes and whether the greedy tokens equal the single-process model's)")
    d.set_defaults(func=cmd_demo)

    r = command("reparameterize", "turn a train-form checkpoint folder into the re-parameterized form",
                "Reads a train-form model folder (config.json + weights, official MoLE names), evaluates every "
                "expert for every vocabulary entry and writes the inference form: the official layout with "
                "model.moe_table.weight [V, L*E*D]. Nothing is written into --from.")
    r.add_argument("--from", dest="src", required=True, metavar="DIR", help="train-form folder (config.json + weights)")
    r.add_argument("--to", dest="dst", required=True, metavar="DIR",
                   help="output folder (official re-parameterized layout); created if missing")
    r.add_argument("--dtype", default="fp16", choices=list(LUT_DTYPES),
                   help="LUT dtype (fp16: as the official code stores it)")
    r.add_argument("--chunk-size", type=POSITIVE, default=4096, help="vocabulary entries per step")
    r.add_argument("--lut-file", default=None, metavar="FILE",
                   help="also write the LUT as a standalone LookupTable safetensors file, openable on any tier (required "
                        "with --lut-format); load it with MoLEForCausalLM.from_pretrained(TO, lut_file=FILE)")
    r.add_argument("--lut-format", default=None, type=_lut_format_arg, metavar="FORMAT|PLAN",
                   help="quantize the LUT written to --lut-file: one format for every row (int8: per-row scale; "
                        "fp8 (e4m3) / nf4: per-block scales; q3/q2/q1: 3/2/1-bit codes with error-minimising fp16 "
                        "block scales, refused unless the quality gate passes or --no-quality-check), or a mixed plan "
                        "[norm:]FORMAT[/BLOCK]@N+...+FORMAT[/BLOCK] (as `quality --variants`; e.g. norm:int8@64+f36x5: "
                        "column-normalised, the 64 most frequent ids in int8, the rest 36 5-bit coefficients on a "
                        "factored basis), ids ranked by their count in --counts-text (default --quality-text), gated "
                        "as q3/q2/q1 when a part is below 4 bits; load it with MoLEForCausalLM.from_pretrained(TO, "
                        "lut_file=FILE, placement='host'|'disk'). The official layout has no quantized form, so --to "
                        "keeps the float LUT in --dtype and the quantized one goes to --lut-file")
    r.add_argument("--max-cost", type=_positive_float, default=None, metavar="PCT",
                   help="quality gate: refuse --lut-format if it raises perplexity on --quality-text by more than "
                        "PCT percent (vs the bf16 LUT); see `mole-kernels quality --model`")
    r.add_argument("--quality-text", default=None, metavar="FILE",
                   help="quality gate: the text (tokenized by --from's tokenizer.json) the cost is measured on")
    r.add_argument("--counts-text", default=None, metavar="FILE",
                   help="a mixed --lut-format plan: the text (tokenized by --from's tokenizer.json, every token) whose "
                        "id counts rank the ids, most frequent in the first part (default: --quality-text)")
    r.add_argument("--quality-seq-len", type=POSITIVE, default=64, metavar="S", help="quality gate: tokens per window")
    r.add_argument("--no-quality-check", action="store_true",
                   help="use a format below 4 bits (q3/q2/q1, or a mixed plan with such a part or a factored one) "
                        "without measuring its cost")
    r.add_argument("--block-size", type=POSITIVE, default=None,
                   help="values per scale for --lut-format (must divide the hidden size; default: fp8 128, nf4 64, "
                        "or the hidden size where those do not divide it; int8 is always per row)")
    r.add_argument("--tensor-parallel", type=POSITIVE, default=None, metavar="N",
                   help="also write the LUT as N per-rank tables for tensor-parallel loading, --lut-file naming them "
                        "(FILE.tp{r}-of-{N}.safetensors: columns [r*D/N, (r+1)*D/N) of every row; quantized per rank "
                        "with --lut-format, whose --block-size must divide D/N)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_reparameterize)

    q = command("quality", "quantized LUTs vs the bf16 LUT on a seeded model: bytes per token, |dlogits|, KL, "
                           "greedy agreement",
                "Builds a seeded MoLE model, computes its LUT and compares the model with each LUT variant "
                "(float dtypes, int8, fp8, nf4 blocks) against the same model with the bf16 LUT.")
    _model_options(q, vocab=1024, hidden=768, layers=4, experts=4, heads=12, ffn=1536)
    q.add_argument("--batch", type=POSITIVE, default=8, help="sequences of random tokens")
    q.add_argument("--seq-len", type=POSITIVE, default=64, help="tokens per sequence")
    q.add_argument("--init-std", type=_positive_float, default=0.05,
                   help="weight init std (large enough that logits are peaked)")
    q.add_argument("--variants", default=None, metavar="LIST",
                   help="comma-separated FORMAT[-BLOCK] list: fp32, fp16 (float LUTs), int8, fp8-BLOCK, nf4-BLOCK "
                        f"(default: {DEFAULT_QUALITY_VARIANTS}, skipping the blocks that do not divide --hidden)")
    q.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the table (with date, machine, command) to this file")
    q.add_argument("--model", default=None, metavar="DIR",
                   help="measure on this train-form model folder instead (with --text): each format's perplexity "
                        "cost against the bf16 LUT; --variants then takes FORMAT[/BLOCK] (int8, fp8, nf4, q3, q2, "
                        "q1) and mixed plans [norm:]FORMAT[/BLOCK]@N+...+FORMAT (e.g. norm:int8@64+f36x5: the 64 "
                        f"most frequent ids in int8, the rest 36 5-bit coefficients; default {DEFAULT_MODEL_VARIANTS})")
    q.add_argument("--text", default=None, metavar="FILE", help="with --model: the text file measured on")
    q.add_argument("--tokenizer", default=None, metavar="DIR", help="with --model: tokenizer folder (default --model)")
    q.add_argument("--max-windows", type=POSITIVE, default=None, metavar="N",
                   help="with --model: at most N windows of --seq-len tokens of the text (default: all)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quality)

    _generate_parser(command)

    i = command("info", "build and device facts", "What the extension was built with and what this machine has.")
    i.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None, prog: str = PROG) -> int:
    """Runs one command; returns the exit status (0, 1 when the package cannot load, 2 for a user error,
    130 when interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(prog).parse_args(argv)
    args.command_line = " ".join([prog] + [shlex.quote(a) for a in argv])
    where = f"{prog} {args.command}"
    # SIGTERM unwinds like Ctrl-C, so temporary files are removed on that exit path too (only the
    # main thread may set a handler; a caller running main() elsewhere keeps its own).
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main else None
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe (`info | head -1`) shows up here, inside the handlers below
        return status
    except UsageError as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:  # a bad checkpoint or config, named by the library
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # the extension is not built, or was built against another torch
        print(f"{where}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away: nothing left to say. Point stdout at /dev/null so that the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
