"""The ``mole-kernels`` command: ``demo``, ``reparameterize``, ``info``.

    mole-kernels demo                                   # no download, no arguments needed
    mole-kernels reparameterize --from TRAIN_DIR --to REP_DIR [--dtype bf16]
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
        variants = [(t, torch.float32) for t in tiers] + [("host", torch.bfloat16)]
        processed = B * (S + N - 1)  # tokens that passed through the model (prefill + decode)
        for tier, dtype in variants:
            if dtype == torch.float32:
                table = LookupTable.open(lut_file, placement=tier, device=dev)
            else:
                src = LookupTable.open(lut_file, placement="disk", device=dev)
                table = LookupTable.from_tensor(src.tensor.to(dtype), placement=tier, device=dev)
                src.close()
            inf.set_lut(table)
            seq, t = _timed_generate(inf, prompt, N, dev, reset=table.reset_stats)
            moved = sum(table.stats.bytes_read.values())
            delta = (inf(ref_seq).logits - ref_logits).abs().max().item()
            name = f"MoLE, LUT on {tier}" + ("" if dtype == torch.float32 else f" ({str(dtype)[6:]})")
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
          "every token the model processed.\nmax|dlogits|: logits of the train form's greedy continuation, each model vs the train form"
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
    model = MoLEForCausalLM.from_pretrained(args.src)
    if model.is_reparameterized:
        raise ValueError(f"--from {args.src!r} is already re-parameterized (it holds model.moe_table.weight)")
    t0 = time.perf_counter()
    inf = model.reparameterize(placement="host", dtype=dtype, device="cpu", chunk_size=args.chunk_size,
                               progress=not args.quiet)
    inf.save_pretrained(args.dst)
    if args.lut_file:
        inf.lut.save(args.lut_file)
    V, L, E, D = inf.config.lut_shape
    print(f"wrote {args.dst}: LUT [V={V}, L={L}, E={E}, D={D}] {str(dtype)[6:]} = {_human(inf.lut.nbytes)} "
          f"({_human(inf.lut.row_bytes)} per token) as model.moe_table.weight [{V}, {L * E * D}]"
          + (f"; standalone LUT file {args.lut_file}" if args.lut_file else "")
          + f" in {time.perf_counter() - t0:.1f} s")
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
    r.add_argument("--lut-file", default=None, help="also write the LUT as a standalone mmap-able safetensors file")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_reparameterize)

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
