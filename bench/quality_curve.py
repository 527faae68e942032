"""Perplexity cost of LUT formats from 1 to 8 bits per value on the trained reference MoLE (issue 26).

    python bench/quality_curve.py [--tokens N] [--all] [--markdown bench/QUANT_QUALITY.md]   # N = 0: the whole split

The model, its tokenizer and its validation text come from bench/reference_model.py (cached).
Every variant is the bf16 LUT quantized and dequantized (mole_kernels.dequantize: what the gathers
return), evaluated teacher-forced on the first N validation tokens in 64-token windows; cost =
ppl / ppl(bf16 LUT) - 1. Bits per value count every code, scale, padding byte and (mixed tables)
the 4-byte rank of each id, and (normalised tables, "norm(...)") the float32 column offset and scale.
Mixed tables rank ids by their frequency in the training split. Runs on one thread: ~10 CPU-minutes for the whole
validation split (most of it the low-bit formats' scale search and the factorisations); --all ~2x.
"""
import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_model  # noqa: E402

from mole_kernels.quality import format_costs  # noqa: E402

CURVE = ("int8", "nf4/64", "q3/128", "q2/64", "q1/64")  # the single formats measured without --all
SINGLE = ["int8", "fp8_e4m3/128", "nf4/64", "q3/128", "q3/64", "q2/64", "q2/32", "q1/128", "q1/64", "q1/32"]
MIXED = [
    [("int8", 64, None), ("q2", None, 64)],
    [("nf4", 256, 64), ("q2", None, 64)],
    [("nf4", 512, 64), ("q1", None, 64)],
    [("int8", 256, None), ("q1", None, 64)],
    [("q3", 512, 128), ("q1", None, 128)],
    [("int8", 64, None), ("q3", None, 128)],
    [("nf4", 128, 64), ("q3", None, 128)],
    [("int8", 128, None), ("q2", 1024, 64), ("q1", None, 64)],
]

# Column-normalised tables (mole_kernels.mixed, normalize=True; "f<rank>x<bits>": factored parts,
# mole_kernels.factored). A plan of one part is a single format.
NORMALISED = [
    [("q3", None, 128)], [("q2", None, 64)], [("q1", None, 64)], [("nf4", None, 64)],
    [("int8", 64, None), ("q3", None, 128)],
    [("nf4", 128, 64), ("q3", None, 128)],
    [("int8", 64, None), ("q2", None, 64)],
    [("int8", 32, None), ("f16x6", None, None)],
    [("int8", 32, None), ("f24x5", None, None)],
    [("int8", 64, None), ("f36x5", None, None)],
    [("int8", 32, None), ("f40x5", None, None)],
    [("int8", 64, None), ("f48x6", None, None)],
    [("int8", 64, None), ("f56x6", None, None)],
    [("int8", 64, None), ("f64x5", None, None)],
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=0, help="validation tokens evaluated (default 0: all of them)")
    ap.add_argument("--markdown", help="append the dated table to this file")
    ap.add_argument("--all", action="store_true", help="also the single formats' other block sizes and the "
                    "un-normalised mixed plans (another ~15 minutes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # see reference_model.RECIPE: one thread is faster on a loaded machine
    model, val, counts = reference_model.load()
    text = reference_model.windows(val, max_tokens=args.tokens or None)
    with torch.no_grad():
        lut = model.compute_lut(dtype=torch.float32, progress=False)
    normalised = [{"plan": plan, "normalize": True} for plan in NORMALISED]
    single = SINGLE if args.all else [v for v in SINGLE if v in CURVE]
    rows = format_costs(model, text, single + (MIXED if args.all else []) + normalised, counts=counts, lut=lut,
                        progress=True)
    zero = format_costs(model, text, [], lut=torch.zeros_like(lut))[0]["ppl"]
    rows.sort(key=lambda r: -r["bits"])
    r = reference_model.RECIPE
    lines = [f"\n## Low-bit and mixed-precision LUTs on the trained reference model ({datetime.date.today()}, issue 26)\n",
             f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), torch {torch.__version__}, CPU only",
             f"- command: `python bench/quality_curve.py --tokens {args.tokens}{' --all' if args.all else ''}`",
             f"- model: bench/reference_model.py (cache {reference_model.cache_dir()}): MoLE V={r['vocab']} (byte-level BPE "
             f"on the Python standard library's source), D={r['hidden']}, L={r['layers']}, E={r['experts']}, "
             f"{r['steps']} steps of {r['batch']}x{r['seq']} tokens",
             f"- text: the first {text.numel()} validation tokens ({text.shape[0]} windows of {text.shape[1]}); "
             f"bf16-LUT perplexity {rows[0]['ppl']:.3f}; with the LUT zeroed {zero:.3f} "
             f"({100 * (zero / rows[0]['ppl'] - 1):+.1f} %: the table carries signal)",
             "", "| LUT | bits/value | perplexity | cost |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['bits']:.3f} | {row['ppl']:.4f} | {100 * row['cost']:+.3f} % |")
    out = "\n".join(lines) + "\n"
    print(out)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(out)


if __name__ == "__main__":
    main()
