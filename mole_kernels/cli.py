"""The ``mole-kernels`` command: ``demo``, ``reparameterize``, ``quality``, ``info``.

    mole-kernels demo                                   # no download, no arguments needed
    mole-kernels reparameterize --from TRAIN_DIR --to REP_DIR [--dtype bf16]
                                [--lut-format nf4 --block-size 64 --lut-file LUT.safetensors]
    mole-kernels quality [--markdown FILE]              # quantized LUTs vs the bf16 LUT
    mole-kernels info                                   # build and device facts
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import List, Optional

import torch


def _human(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------- demo --------------------


def _timed_generate(model, prompt, new_tokens, dev, reset=None, **kw):
    model.generate(prompt, max_new_tokens=2, **kw)  # warm-up: lazy buffers, kernel compiles
    _sync(dev)
    if reset is not None:
        reset()  # byte counters cover the timed run only
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, **kw)
    _sync(dev)
    return out, time.perf_counter() - t0


def cmd_demo(args) -> int:
    from .model import DenseForCausalLM, MoEForCausalLM, MoLEConfig, MoLEForCausalLM
    from .table import LookupTable

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif dev.type == "cpu":
        # Decoding a small model is a chain of tiny ops: waking a thread pool for each costs more
        # than the op (on a busy machine, milliseconds), so one thread is both faster and steadier.
        torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cfg = MoLEConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     num_key_value_heads=max(1, args.heads // 2), num_experts=args.experts)
    print(f"MoLE demo on {dev}: V={cfg.vocab_size} L={cfg.num_hidden_layers} E={cfg.num_experts} "
          f"D={cfg.hidden_size} FFN={cfg.intermediate_size} heads={cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens "
          f"(seed {args.seed}, random weights, {torch.get_num_threads()} CPU thread(s))")
    train = MoLEForCausalLM(cfg, init_std=0.1).to(dev).eval()

    t0 = time.perf_counter()
    inf = train.reparameterize(placement="host", dtype=torch.float32, device=dev, progress=True)
    print(f"re-parameterized into a [V, L, E, D] = {list(cfg.lut_shape)} LUT "
          f"({_human(inf.lut.nbytes)}, {_human(inf.lut.row_bytes)} per token) in {time.perf_counter() - t0:.2f} s")

    tmp = tempfile.mkdtemp(prefix="mole_demo_")
    lut_file = os.path.join(tmp, "lut.safetensors")
    inf.lut.save(lut_file)
    print(f"saved the LUT to {lut_file}")

    B, S, N = args.batch, args.prompt_len, args.new_tokens
    prompt = torch.randint(0, cfg.vocab_size, (B, S), device=dev)
    rows = []
    with torch.no_grad():
        ref_seq, t_train = _timed_generate(train, prompt, N, dev)
        ref_logits = train(ref_seq).logits
        rows.append(dict(name="train form (experts computed)", t=t_train, moved=0, vram=None, ram=None, delta=0.0,
                         same=True))

        tiers = (["device"] if dev.type == "cuda" else []) + ["host", "disk"]
        # (tier, dtype, quantization format): the fp32 LUT on every tier, then smaller host tables
        # (quantized ones hold and move packed rows; the gather dequantizes them to fp32).
        variants = [(t, torch.float32, None) for t in tiers] + [("host", torch.bfloat16, None),
                                                               ("host", torch.float32, "int8"),
                                                               ("host", torch.float32, "nf4")]
        processed = B * (S + N - 1)  # tokens that passed through the model (prefill + decode)
        for tier, dtype, fmt in variants:
            if dtype == torch.float32 and fmt is None:
                table = LookupTable.open(lut_file, placement=tier, device=dev)
            else:
                src = LookupTable.open(lut_file, placement="disk", device=dev)
                table = LookupTable.from_tensor(src.read().to(dtype), placement=tier, device=dev, format=fmt)
                src.close()
            inf.set_lut(table)
            seq, t = _timed_generate(inf, prompt, N, dev, reset=table.reset_stats)
            moved = sum(table.stats.bytes_read.values())
            delta = (inf(ref_seq).logits - ref_logits).abs().max().item()
            name = f"MoLE, LUT on {tier}" + ("" if dtype == torch.float32 else f" ({str(dtype)[6:]})")
            if fmt is not None:
                name += f" ({fmt}, block {table.block_size})"
            vram = table.nbytes if tier == "device" else 0
            ram = table.nbytes if tier == "host" else 0
            rows.append(dict(name=name, t=t, moved=moved, vram=vram, ram=ram, delta=delta,
                             same=torch.equal(seq, ref_seq)))
            table.close()

        dense = DenseForCausalLM.from_mole(train)
        _, t = _timed_generate(dense, prompt, N, dev)
        rows.append(dict(name="dense baseline", t=t, moved=0, vram=None, ram=None, delta=None, same=None))

        moe = MoEForCausalLM(cfg, init_std=0.1).to(dev).eval()
        moe.offload_experts()
        _, t = _timed_generate(moe, prompt, N, dev, reset=lambda: setattr(moe, "offload_stats", type(moe.offload_stats)()))
        st = moe.offload_stats
        rows.append(dict(name=f"MoE top-{cfg.moe_top_k}/{cfg.moe_num_experts}, experts offloaded", t=t,
                         moved=st.bytes_h2d, vram=None, ram=moe.host_bytes, delta=None, same=None))

    print()
    head = f"{'model':40s} {'tokens/s':>9s} {'ms/token':>9s} {'LUT/expert bytes per token':>27s} " \
           f"{'VRAM held':>10s} {'RAM held':>10s} {'max|dlogits|':>13s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        tps = B * N / r["t"]
        ms = 1000 * r["t"] / N
        per_tok = r["moved"] / processed
        delta = "-" if r["delta"] is None else f"{r['delta']:.2e}"
        if r["same"] is False:
            delta += " *"
        print(f"{r['name']:40s} {tps:9.1f} {ms:9.2f} {_human(per_tok):>27s} {_human(r['vram']):>10s} "
              f"{_human(r['ram']):>10s} {delta:>13s}")
    print()
    print("tokens/s: generated tokens of the whole batch per second; ms/token: time per generation step (both "
          "include the prompt's prefill).\nLUT/expert bytes per token: table (or expert weight) bytes read, over "
          "every token the model processed (quantized tables: packed rows with their scales).\nmax|dlogits|: logits of the train form's greedy continuation, each model vs the train form"
          " ('*': greedy tokens differed).\nThe disk tier's LUT is memory-mapped (held by the page cache, not counted);"
          " the MoE baseline is a different random model with MoLE's activated parameters.")
    try:
        os.unlink(lut_file)
        os.rmdir(tmp)
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- reparameterize ----------


def cmd_reparameterize(args) -> int:
    from .model import MoLEForCausalLM, parse_dtype

    dtype = parse_dtype(args.dtype, "--dtype")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"--dtype must be fp32, fp16 or bf16, got {args.dtype!r}")
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise ValueError("--to must differ from --from (the train-form folder is not overwritten)")
    if args.block_size is not None and args.lut_format is None:
        raise ValueError("--block-size needs --lut-format (a float LUT has no blocks)")
    if args.lut_format is not None and not args.lut_file:
        raise ValueError("--lut-format needs --lut-file: the official layout has no quantized form, so the "
                         "quantized LUT is written there (the folder keeps the float LUT)")
    model = MoLEForCausalLM.from_pretrained(args.src)
    if model.is_reparameterized:
        raise ValueError(f"--from {args.src!r} is already re-parameterized (it holds model.moe_table.weight)")
    if args.lut_format is not None:  # fail on a bad format or block size before the long computation
        from .model import _check_lut_format

        _check_lut_format(args.lut_format, args.block_size, model.config.hidden_size, "--lut-format/--block-size")
    t0 = time.perf_counter()
    inf = model.reparameterize(placement="host", dtype=dtype, device="cpu", chunk_size=args.chunk_size,
                               progress=not args.quiet)
    inf.save_pretrained(args.dst)
    V, L, E, D = inf.config.lut_shape
    note = ""
    if args.lut_format is not None:
        from .table import LookupTable

        with LookupTable.from_tensor(inf.lut.read(), "host", device="cpu", format=args.lut_format,
                                     block_size=args.block_size) as q:
            q.save(args.lut_file)
            note = (f"; quantized LUT ({q.format}, block {q.block_size}) = {_human(q.nbytes)} "
                    f"({_human(q.row_bytes)} per token) in {args.lut_file}")
    elif args.lut_file:
        inf.lut.save(args.lut_file)
        note = f"; standalone LUT file {args.lut_file}"
    print(f"wrote {args.dst}: LUT [V={V}, L={L}, E={E}, D={D}] {str(dtype)[6:]} = {_human(inf.lut.nbytes)} "
          f"({_human(inf.lut.row_bytes)} per token) as model.moe_table.weight [{V}, {L * E * D}]"
          + note + f" in {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------- quality -----------------

DEFAULT_QUALITY_VARIANTS = "fp32,fp16,int8,fp8-128,nf4-64,nf4-128,nf4-768"


def _parse_variant(v: str):
    """'nf4-64' -> ('nf4', 64); 'int8' -> ('int8', None); 'fp32' -> (torch.float32, None)."""
    from .model import parse_dtype

    name, _, block = v.strip().partition("-")
    try:
        b = int(block) if block else None
    except ValueError:
        raise ValueError(f"--variants: {v!r}: the block size after '-' must be an int") from None
    if name in ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16"):
        if b is not None:
            raise ValueError(f"--variants: {v!r}: a float LUT has no block size")
        return parse_dtype(name), None
    from .quant import canonical_format

    return canonical_format(name), b


@torch.no_grad()
def lut_quality(train, input_ids: torch.Tensor, variants, *, base_dtype=torch.bfloat16) -> list:
    """Each LUT variant's model against the model with the ``base_dtype`` LUT, on one batch.

    ``train``: a train-form :class:`MoLEForCausalLM`; its LUT is computed once in float32, rounded
    to ``base_dtype`` (the reference), and each variant is either a float dtype (the float32 LUT
    rounded to it) or ``(format, block_size)``, the reference LUT quantized (dequantized rows in
    ``base_dtype``, as the gather returns them). Logits are teacher-forced on ``input_ids``
    ``[B, S]``. Returns one dict per variant (the reference first): ``bytes_per_token`` (LUT bytes
    one token's rows take, all layers), ``ratio`` (vs the reference), ``max_dlogit``/``mean_dlogit``
    (|logits - reference logits|), ``kl`` (mean over positions of KL(reference || variant) of the
    next-token distributions, nats, float64), ``agree`` (fraction of positions whose greedy next
    token equals the reference's).
    """
    from .table import LookupTable

    lut32 = train.compute_lut(dtype=torch.float32, progress=False)
    ref_lut = lut32.to(base_dtype)
    base_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[base_dtype]

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
    rows = [dict(name=f"{base_name} (reference)", bytes_per_token=ref_bytes, ratio=1.0, max_dlogit=0.0,
                 mean_dlogit=0.0, kl=0.0, agree=1.0)]
    for fmt, block in variants:
        if isinstance(fmt, torch.dtype):
            table = LookupTable.from_tensor(lut32.to(fmt), "host", device=train.device)
            name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[fmt]
        else:
            table = LookupTable.from_tensor(ref_lut, "host", device=train.device, format=fmt, block_size=block)
            name = fmt if fmt == "int8" else f"{fmt} (block {table.block_size})"
        nbytes = table.row_bytes
        logits = run(table)
        d = (logits - ref).abs()
        logp = torch.log_softmax(logits, -1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
        rows.append(dict(name=name, bytes_per_token=nbytes, ratio=nbytes / ref_bytes, max_dlogit=d.max().item(),
                         mean_dlogit=d.mean().item(), kl=kl, agree=(logits.argmax(-1) == ref_tok).double().mean().item()))
    return rows


def _quality_table(rows) -> str:
    lines = ["| LUT | bytes/token | vs bf16 | max abs dlogits | mean abs dlogits | KL (nats) | greedy agreement |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bytes_per_token']:,} | {r['ratio']:.3f} | {r['max_dlogit']:.3e} | "
                     f"{r['mean_dlogit']:.3e} | {r['kl']:.3e} | {100 * r['agree']:.2f}% |")
    return "\n".join(lines)


_QUALITY_NOTES = """Notes:
- bytes/token: one token's LUT rows for all layers as stored (quantized rows include their float32
  scales and the padding to 16-byte rows); what a prefetch moves over PCIe or reads from disk.
- fp32 and fp16 rows are the float32 LUT rounded to that dtype: the differences bf16 rounding alone
  makes, for scale. int8/fp8/nf4 rows are the bf16 LUT quantized, dequantized in the gather.
- KL: mean over positions of KL(p_bf16 || p_variant) of the next-token distributions, in float64.
  Greedy agreement: share of positions whose argmax next token equals the bf16 LUT model's.
- The model has random weights, so its next-token distributions are flatter than a trained
  model's and close calls between the top two tokens are common: greedy agreement here is a
  pessimistic stand-in for a trained model's. The paper's accuracy numbers need trained weights.
"""


def cmd_quality(args) -> int:
    import datetime
    import platform
    import shlex

    from .model import MoLEConfig, MoLEForCausalLM

    variants = [_parse_variant(v) for v in args.variants.split(",") if v.strip()]
    torch.manual_seed(args.seed)
    cfg = MoLEConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     num_key_value_heads=max(1, args.heads // 2), num_experts=args.experts)
    train = MoLEForCausalLM(cfg, init_std=args.init_std).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    t0 = time.perf_counter()
    rows = lut_quality(train, ids, variants)
    with torch.no_grad():
        ref_std = train(ids[:1]).logits.float().std().item()
    took = time.perf_counter() - t0
    desc = (f"Reference model: MoLE, V={cfg.vocab_size}, L={cfg.num_hidden_layers}, E={cfg.num_experts}, "
            f"D={cfg.hidden_size}, FFN={cfg.intermediate_size}, random weights (seed {args.seed}, init std "
            f"{args.init_std}), float32 compute; batch {args.batch} x {args.seq_len} random tokens, logits "
            f"teacher-forced at every position ({args.batch * args.seq_len} positions, logit std {ref_std:.3f}). "
            "Every quantized LUT is the bf16 LUT quantized; every row compares with the model using the bf16 LUT.")
    table = _quality_table(rows)
    print(desc)
    print()
    print(table)
    print(f"\n({took:.1f} s)")
    if args.markdown:
        cmd = "python -m mole_kernels quality " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if len(sys.argv) > 1 and sys.argv[1] == "quality" else "python -m mole_kernels quality"
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("# Quantized LUT quality on the reference model\n\n")
            f.write(f"- date: {datetime.date.today().isoformat()}\n")
            f.write(f"- machine: {platform.node() or 'unknown'} ({platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{platform.system()}), torch {torch.__version__}, CPU only\n")
            f.write(f"- command: `{cmd}`\n\n")
            f.write(desc + "\n\n" + table + "\n\n" + _QUALITY_NOTES)
        print(f"wrote {args.markdown}")
    return 0


# ---------------------------------------------------------------- info --------------------


def cmd_info(args) -> int:
    from . import build_info

    info = build_info()
    facts = {"mole_kernels": _version(), "python": sys.version.split()[0], **info}
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


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------- entry point -------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mole-kernels", description="Mixture-of-Lookup-Experts inference kernels")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build a small seeded MoLE model, re-parameterize it, generate on every LUT tier")
    d.add_argument("--vocab", type=int, default=2048)
    d.add_argument("--hidden", type=int, default=128)
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--experts", type=int, default=4)
    d.add_argument("--heads", type=int, default=4)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--prompt-len", type=int, default=16)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    d.add_argument("--threads", type=int, default=0, help="CPU threads (default: 1 on the CPU, torch's default on a GPU)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("reparameterize", help="turn a train-form checkpoint folder into the re-parameterized form")
    r.add_argument("--from", dest="src", required=True, help="train-form folder (config.json + weights)")
    r.add_argument("--to", dest="dst", required=True, help="output folder (official re-parameterized layout)")
    r.add_argument("--dtype", default="fp16", help="LUT dtype: fp32, fp16 (default, as the official code) or bf16")
    r.add_argument("--chunk-size", type=int, default=4096, help="vocabulary entries per step")
    r.add_argument("--lut-file", default=None,
                   help="also write the LUT as a standalone mmap-able LookupTable safetensors file (required with "
                        "--lut-format); load it with MoLEForCausalLM.from_pretrained(TO, lut_file=...)")
    r.add_argument("--lut-format", default=None, choices=["int8", "fp8", "fp8_e4m3", "nf4"],
                   help="quantize the LUT written to --lut-file (int8: per-row scale; fp8 e4m3 / nf4: per-block "
                        "scales). The official layout has no quantized form, so --to keeps the float LUT in "
                        "--dtype and the quantized one goes to --lut-file")
    r.add_argument("--block-size", type=int, default=None,
                   help="values per scale for --lut-format (must divide the hidden size; default fp8 128, nf4 64, "
                        "or the hidden size where those do not divide it; int8 is always per row)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_reparameterize)

    q = sub.add_parser("quality", help="quantized LUTs vs the bf16 LUT on a seeded reference model: bytes per token, "
                                       "|dlogits|, KL, greedy agreement")
    q.add_argument("--vocab", type=int, default=1024)
    q.add_argument("--hidden", type=int, default=768, help="hidden size (768: the paper's 160M; nf4 block 768 fits)")
    q.add_argument("--ffn", type=int, default=1536, help="shared and expert MLP hidden size")
    q.add_argument("--layers", type=int, default=4)
    q.add_argument("--experts", type=int, default=4)
    q.add_argument("--heads", type=int, default=12)
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--seq-len", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--init-std", type=float, default=0.05, help="weight init std (large enough that logits are peaked)")
    q.add_argument("--variants", default=DEFAULT_QUALITY_VARIANTS,
                   help="comma-separated FORMAT[-BLOCK] list (fp32 and fp16 are unquantized float LUTs)")
    q.add_argument("--markdown", default=None, help="also write the table (with date, machine, command) to this file")
    q.set_defaults(func=cmd_quality)

    i = sub.add_parser("info", help="build and device facts")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mole-kernels {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
