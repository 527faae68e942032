"""Decode steps over mixed-precision tables against the bf16 table (issue 26's decode goal), CPU, host and disk.

    python bench/mixed_decode.py [--shape demo|reference] [--rounds 21] [--steps 31] [--phases]

Providers (one process, interleaved rounds, each round starting one provider later; medians of the
ms per decode step, wall clock and this thread's CPU time; ratios against the bf16 table of the same tier): `bf16 host` (a bf16 LookupTable in
RAM, read in place by the fused C++ op), `bf16 disk` (its file, the page cache warm: each step's unique
rows read with pread) and one MixedLookupTable per plan and tier (column-normalised,
`quantize_mixed(..., normalize=True)`; disk: its save_mixed file, each part's rows of a step read with
pread; the tables are built from the bf16 table's random values: speed does not depend on them). Each step is
what generate's loop runs per token (`model._decode_step` over a static KV cache with 64 earlier tokens);
B = 1 and 32, one thread. Shapes: `demo` (the `mole-kernels demo` model: V=2048, L=4, E=4, D=128,
FFN=512) and `reference` (bench/reference_model.py's: V=4096, L=4, E=4, D=128, FFN=512). Zipf-like ids.
Files go to a temporary folder (deleted at the end). ``--phases``: also each provider's thread CPU time
per step in its reader's ``start`` (the disk tier's row reads) and in its layer calls (the LUT term of every
layer), measured around each call (which adds its own ~1 us per call to every provider alike).
``paired``: the median of the per-round wall-clock ratios with its 90 % bootstrap interval (bench/conftest.py
``paired_ratio``): a bound is shown met when the interval lies under it.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench/conftest.py's paired_ratio

from mole_kernels import LookupTable, MoLEConfig, MoLEForCausalLM  # noqa: E402
from mole_kernels.mixed import quantize_mixed, save_mixed  # noqa: E402
from mole_kernels.model.layers import StaticKVCache  # noqa: E402
from mole_kernels.table import MixedLookupTable  # noqa: E402
from conftest import paired_ratio  # noqa: E402

SHAPES = {"demo": (2048, 4, 128, 512, 4, 2, 4), "reference": (4096, 4, 128, 512, 4, 2, 4)}
PLANS = {
    "norm(int8 x 64 + f36x5)": [("int8", 64), ("f36x5", None)],
    "norm(int8 x 64 + f48x6)": [("int8", 64), ("f48x6", None)],
}
CONTEXT = 64


def zipf_table(V, L, E, D):
    """(lut, counts): a bf16 table [V, L, E, D] whose columns differ in scale and offset (what the normalised
    plans are for), and Zipf-like token counts [V] over a random order of the ids. Draws from torch's RNG."""
    lut = (torch.randn(V, L, E, D) * torch.rand(1, L, E, D) * 3 + torch.randn(1, L, E, D)).to(torch.bfloat16)
    counts = (1e6 * (1.0 / torch.arange(1, V + 1).double())).long()[torch.randperm(V)]
    return lut, counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps", type=int, default=31)
    ap.add_argument("--phases", action="store_true", help="also time the reader's start and layer calls per step")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    V, L, D, F, H, Hkv, E = SHAPES[args.shape]
    cfg = MoLEConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                     num_key_value_heads=Hkv, num_experts=E, max_position_embeddings=CONTEXT + args.steps + 1)
    torch.manual_seed(0)
    base = MoLEForCausalLM(cfg, reparameterized=True).eval()
    lut, counts = zipf_table(V, L, E, D)
    tmp = tempfile.TemporaryDirectory()
    tables = {"bf16 host": LookupTable.from_tensor(lut, "host", "cpu"),
              "bf16 disk": LookupTable.from_tensor(lut, "disk", "cpu", path=f"{tmp.name}/bf16.safetensors")}
    for i, (name, plan) in enumerate(PLANS.items()):
        m = quantize_mixed(lut, counts, plan, normalize=True)
        tables[name + " host"] = MixedLookupTable(m)
        save_mixed(f"{tmp.name}/mixed{i}.safetensors", m)
        tables[name + " disk"] = MixedLookupTable.open(f"{tmp.name}/mixed{i}.safetensors", "disk")
    models = {}
    for name, table in tables.items():
        m = MoLEForCausalLM(cfg, reparameterized=True)
        m.load_state_dict(base.state_dict(), strict=True, assign=True)  # shares the weights
        m.set_lut(table)
        models[name] = m.eval()
    p = counts.double() / counts.sum()
    print(f"shape {args.shape}: V={V}, L={L}, E={E}, D={D}, FFN={F}; {args.steps} steps per round, "
          f"{args.rounds} rounds, 1 thread")
    for B in (1, 32):
        ids = torch.multinomial(p, B * args.steps, replacement=True).view(args.steps, B, 1)

        def stepper(model):
            cache = StaticKVCache(cfg, B, CONTEXT + args.steps + 1, device="cpu", dtype=model.dtype)
            cache.valid[:, :CONTEXT] = True

            @torch.no_grad()
            def run():
                idx, pos = torch.tensor([CONTEXT]), torch.full((B,), CONTEXT)
                for i in range(args.steps):
                    model._decode_step(cache, ids[i].view(B), idx, pos)
                    idx += 1
                    pos += 1
            return run

        runs = {k: stepper(m) for k, m in models.items()}
        for r in runs.values():
            r()  # warm-up
        phases = {k: _time_phases(m) for k, m in models.items()} if args.phases else {}
        times = {k: [] for k in runs}
        cpu = {k: [] for k in runs}  # this thread's CPU time: less moved by other processes on a shared machine
        order = list(runs)
        for _ in range(args.rounds):
            for k in order:
                c0, t0 = time.thread_time(), time.perf_counter()
                runs[k]()
                times[k].append((time.perf_counter() - t0) / args.steps * 1e3)
                cpu[k].append((time.thread_time() - c0) / args.steps * 1e3)
            order.append(order.pop(0))
        print(f"\nB = {B}: decode step (median ms per step; ratio against the bf16 table of the same tier)")
        print("| table | tier | bits/value | ms/step | vs bf16 | vs bf16 (thread CPU time) | paired [90 % interval] |\n"
              "|---|---|---:|---:|---:|---:|---|")
        for k, t in tables.items():
            name, tier = k.rsplit(" ", 1)
            bits = 16.0 if name == "bf16" else t.bits_per_value
            med, ref = statistics.median(times[k]), statistics.median(times["bf16 " + tier])
            c = statistics.median(cpu[k]) / statistics.median(cpu["bf16 " + tier])
            pm, lo, hi = paired_ratio(times[k], times["bf16 " + tier])
            print(f"| {name} | {tier} | {bits:.3f} | {med:.3f} | {med / ref:.3f}x | {c:.3f}x | {pm:.3f} [{lo:.3f}, "
                  f"{hi:.3f}] |")
        if phases:
            n = args.rounds * args.steps
            print("\n| table | tier | start us/step | layer calls us/step |\n|---|---|---:|---:|")
            for k, ph in phases.items():
                name, tier = k.rsplit(" ", 1)
                print(f"| {name} | {tier} | {ph['start'] / n / 1e3:.2f} | {ph['layers'] / n / 1e3:.2f} |")
    for t in tables.values():
        t.close()
    tmp.cleanup()


def _time_phases(model):
    """Thread CPU ns spent in the model's reader's start and in its layer calls (wraps both, from now on)."""
    reader = model._reader or model._new_reader()
    start, spent = reader.start, {"start": 0, "layers": 0}

    def timed_start(ids):
        t0 = time.thread_time_ns()
        combine = start(ids)
        spent["start"] += time.thread_time_ns() - t0

        def timed_combine(*a):
            t1 = time.thread_time_ns()
            out = combine(*a)
            spent["layers"] += time.thread_time_ns() - t1
            return out
        return timed_combine
    reader.start = timed_start
    return spent


if __name__ == "__main__":
    main()
