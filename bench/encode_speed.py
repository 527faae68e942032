"""Encoding time of the low-bit scale search and the factorisation, before vs after (issue 26).

    python bench/encode_speed.py [--reps 5] [--vocab 4096]

The table is the quality gate's size (``[V, 4, 4, 128]`` float32, random rows of different
magnitudes). Providers, interleaved call by call in one process (median of --reps calls each):
``q3/128`` and ``q2/64`` through :func:`mole_kernels.quantize` with the current scale search
(sorted values and prefix sums) and with the one it replaced (one pass over the values per
candidate scale: ``_fit_lowbit_by_passes`` of python_tests/test_lowbit.py, which checks that both
pick the same scales); ``f36x5``: :func:`mole_kernels.factored.factorize` with its basis from the
Gram matrix's eigenvectors (current) and from the SVD it replaced (``_top_directions_by_svd`` of the
same test file).
One thread, as bench/quality_curve.py runs.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))

import mole_kernels.factored as factored  # noqa: E402
import mole_kernels.quant as quant  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="calls per provider (median reported; default 5)")
    ap.add_argument("--vocab", type=int, default=4096, help="rows of the table (default 4096)")
    args = ap.parse_args(argv)
    from test_lowbit import _fit_lowbit_by_passes, _top_directions_by_svd

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lut = torch.randn(args.vocab, 4, 4, 128) * torch.rand(args.vocab, 4, 4, 1) * 3
    counts = torch.randint(0, 1000, (args.vocab,))
    def using(module, name, impl, fn):
        """``fn`` run with ``module.name`` replaced by ``impl``."""
        def run():
            current = getattr(module, name)
            setattr(module, name, impl)
            try:
                fn()
            finally:
                setattr(module, name, current)
        return run

    def with_search(search, fmt, block):
        return using(quant, "_fit_lowbit", search, lambda: quant.quantize(lut, fmt, block))

    def factorize_with(top):
        return using(factored, "_top_directions", top, lambda: factored.factorize(lut, 36, 5, counts=counts))

    providers = {
        "q3/128 current": with_search(quant._fit_lowbit, "q3", 128),
        "q3/128 before": with_search(_fit_lowbit_by_passes, "q3", 128),
        "q2/64 current": with_search(quant._fit_lowbit, "q2", 64),
        "q2/64 before": with_search(_fit_lowbit_by_passes, "q2", 64),
        "f36x5 current": factorize_with(factored._top_directions),
        "f36x5 before": factorize_with(_top_directions_by_svd),
    }
    times = {k: [] for k in providers}
    for _ in range(args.reps):
        for name, fn in providers.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(f"table [{args.vocab}, 4, 4, 128] float32, {args.reps} interleaved calls each, median seconds "
          f"(load {os.getloadavg()[0]:.1f})")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, m in med.items():
        base = med.get(name.split()[0] + " before")
        print(f"  {name:18s} {m:7.3f} s" + (f"   before/current {base / m:.2f}x" if base and "current" in name else ""))


if __name__ == "__main__":
    main()
