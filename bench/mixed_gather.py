"""Fused gather of frequency-mixed, column-normalised and factored tables against the bf16 table (issue 26).

    python bench/mixed_gather.py [--vocab 50304] [--rounds 15]

Mixed tables (mole_kernels.mixed) are gathered by mixed_lut_gather: on a CPU one call of the fused C++
op (torch.ops.mole_kernels.lut_gather_mixed); "(torch reference)" rows time mixed_lut_gather_reference
(each part its own gather, then the column scale, offset and expert sum in torch). This measures the
fused gather of one layer (``sum_e w_e * row``) through the op, not a decode step (bench/bench_decode.py). Shape: the
reference model's L = 4, E = 4, D = 128 with a larger vocabulary (a random Zipf-like table: speed only).
Providers run interleaved, one call each per round in a rotating order; medians over the rounds of
the mean of 200 calls; ratios against the bf16 table's fused gather (mole_kernels.lut_gather). One thread.
"""
import argparse
import sys
import statistics
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree (as bench/reference_model.py)

from mole_kernels import lut_gather  # noqa: E402
from mole_kernels.mixed import mixed_lut_gather, mixed_lut_gather_reference, quantize_mixed  # noqa: E402
from mole_kernels.quant import quantize, quantized_lut_gather  # noqa: E402

PLANS = {
    "norm(int8 x 64 + q3/128)": [("int8", 64), ("q3", None)],
    "norm(int8 x 64 + f36x5)": [("int8", 64), ("f36x5", None)],
    "norm(int8 x 32 + f40x5)": [("int8", 32), ("f40x5", None)],
    "norm(int8 x 64 + f48x6)": [("int8", 64), ("f48x6", None)],
}
REFERENCE = "norm(int8 x 64 + f36x5)"  # also timed through the torch reference


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    V, L, E, D = args.vocab, 4, 4, 128
    lut = (torch.randn(V, L, E, D) * torch.rand(1, L, E, D) * 3 + torch.randn(1, L, E, D)).to(torch.bfloat16)
    counts = (1e6 / torch.arange(1, V + 1).double()).long()[torch.randperm(V)]
    tables = {"bf16": lut, "q3/128": quantize(lut, "q3", 128)}
    for name, plan in PLANS.items():
        tables[name] = quantize_mixed(lut, counts, plan, normalize=True)
    tables[REFERENCE + " (torch reference)"] = tables[REFERENCE]
    p = counts.double() / counts.sum()
    for B in (1, 32):
        ids = torch.multinomial(p, B * args.calls, replacement=True).view(args.calls, B)
        w = torch.softmax(torch.randn(args.calls, B, E), -1)

        def run(k):
            t = tables[k]
            for i in range(args.calls):
                if k.endswith("(torch reference)"):
                    mixed_lut_gather_reference(t, ids[i], w[i], layer=1)
                elif isinstance(t, torch.Tensor):
                    lut_gather(t, ids[i], w[i], layer=1)
                elif hasattr(t, "rank"):
                    mixed_lut_gather(t, ids[i], w[i], layer=1)
                else:
                    quantized_lut_gather(t, ids[i], w[i], layer=1)

        times = {k: [] for k in tables}
        order = list(tables)
        for k in order:
            run(k)  # warm-up
        for _ in range(args.rounds):
            for k in order:
                t0 = time.perf_counter()
                run(k)
                times[k].append((time.perf_counter() - t0) / args.calls * 1e6)
            order.append(order.pop(0))
        base = statistics.median(times["bf16"])
        print(f"\nB = {B}, V = {V}, L = {L}, E = {E}, D = {D}: fused gather of one layer (median of {args.rounds} rounds)")
        print("| table | bits/value | us/call | vs bf16 |\n|---|---:|---:|---:|")
        for k, t in tables.items():
            bits = 16.0 if k == "bf16" else t.bits_per_value
            med = statistics.median(times[k])
            print(f"| {k} | {bits:.3f} | {med:.1f} | {med / base:.2f}x |")
        _decode_calls(tables, ids, w, args, B, D)


def _decode_calls(tables, ids, w, args, B, D):
    """The decode step's layer call itself (what generate runs per layer on a CPU, past the dispatcher):
    _C._lut_combine over the bf16 table against _C._lut_combine_mixed over a MixedLookupTable's handle
    (residual + shared + the softmax-weighted rows). Min and median over the rounds: on a loaded machine a
    round that lost its time slice shows in the median, not in the min."""
    from mole_kernels import _C
    from mole_kernels.table import MixedLookupTable

    logits = torch.log(w)  # softmax(log w) = w
    res, sh = torch.randn(B, D), torch.randn(B, D)
    calls = {"bf16": partial(_C._lut_combine, tables["bf16"])}
    for k, t in tables.items():
        if hasattr(t, "rank") and not k.endswith("(torch reference)"):
            calls[k] = partial(_C._lut_combine_mixed, MixedLookupTable(t)._handle)
    times = {k: [] for k in calls}
    for _ in range(args.rounds):
        for k, f in calls.items():
            t0 = time.perf_counter()
            for i in range(args.calls):
                f(ids[i], 1, logits[i], res, sh, None)
            times[k].append((time.perf_counter() - t0) / args.calls * 1e6)
    lo, med = min(times["bf16"]), statistics.median(times["bf16"])
    print(f"\nB = {B}: the decode step's layer call (_C._lut_combine / _C._lut_combine_mixed), us per call")
    print("| table | min | vs bf16 | median | vs bf16 |\n|---|---:|---:|---:|---:|")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {min(v):.2f} | {min(v) / lo:.2f}x | {m:.2f} | {m / med:.2f}x |")


if __name__ == "__main__":
    main()
