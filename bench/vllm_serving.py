"""vLLM serving a MoLE folder against the same-shape dense model: output tokens/s at concurrency 1, 8
and 32 with the LUT on host and on disk, the engines' RSS, and their KV-cache budget.

    python bench/vllm_serving.py [--vocab 50304 --hidden 256 --layers 4 ...] [--repeats 5]

Needs vLLM (the environment of .ci/run's vLLM stage / the README's "Serve with vLLM" set-up) and
this package installed there. The three engines (dense = ``MoleDenseForCausalLM``: the folder's
attention and MLP weights, no router, no LUT term; MoLE with the LUT on host; MoLE on disk, served
in place from the weight file, its page cache warm after loading) live in this process together and
take turns, the order rotating, ``--repeats`` times per concurrency: the figures are medians and
ratios against the dense engine measured in the same rounds. Concurrency c = c requests submitted at
once (vLLM batches them), each a ``--prompt``-token prompt generating ``--new-tokens`` tokens
(ignore_eos); tokens/s counts generated tokens. RSS: the engine's processes (the engine core and
its worker), after warm-up; the LUT's size is printed next to it. Prints a Markdown section for
bench/RESULTS.md.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4, help="attention heads (head size hidden/heads: 32..256 on CPU)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--lut-dtype", default="float16", help="the LUT's dtype in the folder (the official layout's fp16)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE per engine (GiB)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's default, torch.compile)")
    p.add_argument("--json", help="also write the measurements here")
    p.add_argument("--markdown", help="also write the section here (bench/results/vllm.md: report.py appends it to "
                                      "bench/RESULTS.md)")
    return p.parse_args(argv)


def make_folders(args, root):
    """(MoLE folder, dense folder, LUT bytes): a seeded model, re-parameterized, saved in the official layout."""
    import torch

    from mole_kernels import MoLEConfig, MoLEForCausalLM

    torch.manual_seed(0)
    cfg = MoLEConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads, num_experts=args.experts,
                     max_position_embeddings=4096)
    model = MoLEForCausalLM(cfg).reparameterize(placement="host", dtype=getattr(torch, args.lut_dtype))
    mole = os.path.join(root, "mole")
    model.save_pretrained(mole)
    lut_bytes = model.lut.nbytes
    del model
    dense = os.path.join(root, "dense")
    os.makedirs(dense)
    for name in os.listdir(mole):
        if name != "config.json":
            os.symlink(os.path.join(mole, name), os.path.join(dense, name))
    with open(os.path.join(mole, "config.json")) as f:
        c = json.load(f)
    c["architectures"] = ["MoleDenseForCausalLM"]
    with open(os.path.join(dense, "config.json"), "w") as f:
        json.dump(c, f)
    return mole, dense, lut_bytes


def engine_rss(pids):
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    import psutil
    import torch
    from vllm import LLM, SamplingParams

    root = tempfile.mkdtemp(prefix="mole_vllm_bench_")
    try:
        mole, dense, lut_bytes = make_folders(args, root)
        me = psutil.Process()
        common = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=args.prompt + args.new_tokens + 16,
                      seed=0, enforce_eager=args.eager)
        setups = {"dense": dict(model=dense), "MoLE, LUT on host": dict(model=mole),
                  "MoLE, LUT on disk": dict(model=mole, hf_overrides={"mole_lut_placement": "disk"})}
        engines, rss, kv = {}, {}, {}
        g = torch.Generator().manual_seed(1)
        prompts = {c: [{"prompt_token_ids": torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist()}
                       for _ in range(c)] for c in args.concurrency}
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
        for name, kw in setups.items():
            before = {p.pid for p in me.children(recursive=True)}
            t0 = time.perf_counter()
            llm = LLM(**kw, **common)
            print(f"{name}: engine up in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            pids = [p.pid for p in me.children(recursive=True) if p.pid not in before]
            llm.generate(prompts[max(args.concurrency)], params, use_tqdm=False)  # warm-up: every batch size compiled
            engines[name] = (llm, pids)
            kv[name] = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        for name, (llm, pids) in engines.items():
            rss[name] = engine_rss(pids)
        times = {(n, c): [] for n in engines for c in args.concurrency}
        names = list(engines)
        for c in args.concurrency:
            for r in range(args.repeats):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    t0 = time.perf_counter()
                    engines[name][0].generate(prompts[c], params, use_tqdm=False)
                    times[(name, c)].append(time.perf_counter() - t0)
                print(f"concurrency {c}: round {r + 1}/{args.repeats}", file=sys.stderr)
        tps = {k: c * args.new_tokens / statistics.median(v) for k, v in times.items() for c in [k[1]]}
        spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
        load = os.getloadavg()
        text = report(args, names, tps, spread, rss, kv, lut_bytes, load)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "tokens_per_s": {f"{n}|{c}": v for (n, c), v in tps.items()},
                           "seconds": {f"{n}|{c}": v for (n, c), v in times.items()}, "rss": rss, "kv_blocks": kv,
                           "lut_bytes": lut_bytes, "loadavg": load}, f, indent=1)
        engines.clear()  # the engines shut down as their LLM objects go
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(args, names, tps, spread, rss, kv, lut_bytes, load):
    import torch
    import vllm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mib = 1 << 20
    lines = []  # the Markdown section
    lines.append(f"\n## vLLM serving: MoLE vs the same-shape dense model ({now})\n")
    lines.append(f"Machine: {platform.machine()}, {os.cpu_count()} cores (vLLM binds its worker to one), load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the end, shared with other work. "
          f"vLLM {vllm.__version__}, torch {torch.__version__}, commit {commit}, "
          f"{'enforce_eager' if args.eager else 'torch.compile (vLLM default)'}. Model: V={args.vocab}, D={args.hidden}, "
          f"FFN={args.ffn}, L={args.layers}, heads={args.heads}, E={args.experts}, float32 weights, LUT "
          f"{args.lut_dtype} ({lut_bytes / mib:.1f} MiB). Requests: {args.prompt}-token prompts, {args.new_tokens} "
          f"generated tokens each, c submitted at once; medians of {args.repeats} rounds, engines in rotating order.\n")
    lines.append("| concurrency | engine | generated tokens/s | vs dense | spread |")
    lines.append("| --- | --- | --- | --- | --- |")
    for c in args.concurrency:
        for n in names:
            lines.append(f"| {c} | {n} | {tps[(n, c)]:.1f} | {tps[(n, c)] / tps[('dense', c)]:.3f} | "
                  f"{100 * spread[(n, c)]:.0f} % |")
    lines.append("\n| engine | RSS (MiB) | minus dense, in LUTs | KV-cache blocks |")
    lines.append("| --- | --- | --- | --- |")
    for n in names:
        lines.append(f"| {n} | {rss[n] / mib:.0f} | {(rss[n] - rss['dense']) / lut_bytes:+.3f} | {kv[n]} |")
    lines.append("\nspread: (slowest - fastest) / median of a cell's rounds. RSS: the engine core's and worker's "
          "resident memory after warm-up (the LLM's own process, equal for all, not counted).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
