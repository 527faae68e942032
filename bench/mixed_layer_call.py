"""A decode step's layer call over a mixed-precision table against the bf16 table's, per call (issue 26).

    python bench/mixed_layer_call.py [--shape demo|reference] [--rounds 31] [--steps 64] [--evict-kb 1024]

What bench/mixed_decode.py's step spends in its LUT terms, without the rest of the step: per provider, the C++
layer call a decode step makes (``_C._lut_combine`` on the bf16 table in RAM; ``_C._lut_combine_mixed`` on a
``norm:int8@64+f36x5`` / ``+f48x6`` MixedLookupTable in RAM), for every layer of `--steps` steps of Zipf-like
ids at T = 1 and 32 tokens, one thread. Between two calls the benchmark reads `--evict-kb` of other memory,
as a step's attention and FFN weights would (0: every call finds the previous one's data in cache). Rounds
interleave the providers (each round starting one provider later); ``us/call``: the median over rounds of the
mean call time; ``paired``: the median of the per-round ratios against bf16 with its 90 % bootstrap interval
(bench/conftest.py ``paired_ratio``).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench/conftest.py's paired_ratio

from mole_kernels import _C  # noqa: E402
from mole_kernels.mixed import quantize_mixed  # noqa: E402
from mole_kernels.table import MixedLookupTable  # noqa: E402
from conftest import paired_ratio  # noqa: E402
from mixed_decode import PLANS, SHAPES, zipf_table  # noqa: E402  (the decode benchmark's tables)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--evict-kb", type=int, default=1024, help="KB of other memory read between two calls")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    V, L, D, _, _, _, E = SHAPES[args.shape]
    torch.manual_seed(0)
    lut, counts = zipf_table(V, L, E, D)
    providers = {"bf16": partial_call(_C._lut_combine, lut)}
    tables = {}
    for name, plan in PLANS.items():
        tables[name] = MixedLookupTable(quantize_mixed(lut, counts, plan, normalize=True))
        providers[name] = partial_call(_C._lut_combine_mixed, tables[name]._handle)
    evict = torch.randn(max(1, args.evict_kb * 256))
    p = counts.double() / counts.sum()
    print(f"shape {args.shape}: V={V}, L={L}, E={E}, D={D}; {args.steps} steps x {L} layers per round, "
          f"{args.rounds} rounds, {args.evict_kb} KB read between calls, 1 thread")
    for T in (1, 32):
        ids = torch.multinomial(p, T * args.steps, replacement=True).view(args.steps, T)
        xs = torch.randn(args.steps, L, T, D)
        rw = torch.randn(L, E, D) / D ** 0.5
        res, sh = torch.randn(T, D), torch.randn(T, D)

        def run(call):
            spent = 0
            for i in range(args.steps):
                for l in range(L):
                    if args.evict_kb:
                        evict.sum()
                    t0 = time.perf_counter_ns()
                    call(ids[i], l, xs[i, l], res, sh, rw[l])
                    spent += time.perf_counter_ns() - t0
            return spent / (args.steps * L) / 1e3

        for c in providers.values():
            run(c)  # warm-up
        times = {k: [] for k in providers}
        order = list(providers)
        for _ in range(args.rounds):
            for k in order:
                times[k].append(run(providers[k]))
            order.append(order.pop(0))
        print(f"\nT = {T}\n| table | us/call | vs bf16 | paired [90 % interval] |\n|---|---:|---:|---|")
        ref = statistics.median(times["bf16"])
        for k, t in times.items():
            pm, lo, hi = paired_ratio(t, times["bf16"])
            print(f"| {k} | {statistics.median(t):.2f} | {statistics.median(t) / ref:.3f}x | {pm:.3f} [{lo:.3f}, "
                  f"{hi:.3f}] |")
    for t in tables.values():
        t.close()


def partial_call(fn, table):
    """The layer call ``call(ids, l, x, residual, shared, router_weight)`` of a table's C++ function."""
    return lambda ids, l, x, res, sh, rw: fn(table, ids, l, x, res, sh, rw)


if __name__ == "__main__":
    main()
