"""Shared benchmark helpers: smoke mode, realistic ids, timing that syncs, GB/s bookkeeping.

Every benchmark records in `benchmark.extra_info`: `bytes` (bytes of table rows read or
moved per call), `provider` (ours or a named baseline), `shape`, and after the run `GB/s`.
`bench/report.py` turns the JSON (`--benchmark-json`) into bench/RESULTS.md.

MOLE_BENCH_SMOKE=1 shrinks every suite to one or two tiny cases (CI runs it with
--benchmark-disable, so a broken benchmark fails CI without costing minutes).
MOLE_BENCH_GPU_QUICK=1 (set by bench/gpu_check.sh) trims the grids that honour it so the whole
suite fits a short GPU loan; the shapes stay the paper's.

An autouse fixture adds `commit`, `torch`, `cuda`, `gpu`, `cpu_threads`, `smoke` and `load1` to
every benchmark's extra_info, so each row of the JSON says what it ran on and how busy the
machine was (bench/report.py prints them on every table and figure).
"""
import contextlib
import json
import os
import subprocess

import pytest
import torch

import mole_kernels

SMOKE = os.environ.get("MOLE_BENCH_SMOKE") == "1"
GPU_QUICK = os.environ.get("MOLE_BENCH_GPU_QUICK") == "1"
HAS_CUDA = torch.cuda.is_available()

# The paper's shapes (DESIGN section 7): name -> (L, E, D).
MODEL_SHAPES = {"160M-4E": (12, 4, 768), "160M-16E": (12, 16, 768), "410M-4E": (24, 4, 1024)}
# Vocabulary scaled so that the largest bf16 table stays ~1.6 GB on a 24 GB machine
# (the real vocabulary is 50,304); the table is still far larger than any CPU cache.
BENCH_VOCAB = 512 if SMOKE else 8192


def pick(full, smoke):
    """The parameter list for a full run, or the tiny one for a smoke run."""
    return smoke if SMOKE else full


def zipf_ids(V: int, n: int, *, s: float = 1.1, batches: int = 1, seed: int = 0) -> torch.Tensor:
    """`batches` x `n` token ids drawn from a Zipf(s) law over a random permutation of [0, V).

    Natural-language token frequencies are roughly Zipfian, so batches repeat popular ids;
    the permutation spreads popular ids over the whole table rather than its first rows.
    """
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** s
    ranks = torch.multinomial(p, batches * n, replacement=True, generator=g)
    return torch.randperm(V, generator=g)[ranks].view(batches, n)


def uniform_ids(V: int, n: int, *, batches: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batches, n), generator=g)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run(benchmark, fn, *, device="cpu", rounds=None, warmup=1):
    """Times fn (device-synchronised inside the timed call) and returns its last result."""
    result = {}

    def timed():
        result["out"] = fn()
        sync(device)

    rounds = rounds or (1 if SMOKE else 20)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0 if SMOKE else warmup)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and benchmark.extra_info.get("bytes"):
        benchmark.extra_info["GB/s"] = benchmark.extra_info["bytes"] / stats.stats.median / 1e9
    return result.get("out")


def paired_ratio(num, den, *, level: float = 0.9, resamples: int = 2000, seed: int = 0) -> tuple:
    """(median, lo, hi) of the per-round ratios ``num[i] / den[i]`` of two providers timed in the same
    interleaved rounds: load that drifts between rounds hits both sides of a round's ratio and cancels,
    which it does not in a ratio of the two medians. ``lo..hi``: a bootstrap interval of that median
    at ``level`` (rounds resampled with replacement), the spread a goal's verdict must clear."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio: needs the same number (>= 1) of rounds on both sides, got {len(num)} "
                         f"and {len(den)}")
    return median_interval([a / b for a, b in zip(num, den)], level=level, resamples=resamples, seed=seed)


def median_interval(values, *, level: float = 0.9, resamples: int = 2000, seed: int = 0) -> tuple:
    """(median, lo, hi) of ``values``, ``lo..hi`` a bootstrap interval of that median at ``level``: of one
    process's per-round ratios (paired_ratio), or of several processes' medians (bench/across_processes.py)."""
    if not len(values):
        raise ValueError("median_interval: needs at least one value")
    r = torch.tensor(list(values), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    boot = r[torch.randint(0, len(r), (resamples, len(r)), generator=g)].quantile(0.5, dim=1)
    tail = (1 - level) / 2
    lo, hi = boot.quantile(torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return r.quantile(0.5).item(), lo, hi


class Rotation:
    """Cycles through pre-made inputs, so repeated calls do not find the same rows in cache."""

    def __init__(self, items):
        self.items, self.i = list(items), 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


@contextlib.contextmanager
def num_threads(n):
    """torch's CPU thread count set to `n` (None: left as it is) inside the block and restored after it, so
    a suite's setting does not leak into the next; the block gets the count in effect."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="session")
def memcpy_bytes():
    """Size of the buffers used for the machine's copy bandwidth."""
    return (16 if SMOKE else 512) << 20


def _source_commit():
    """The commit of the tree these benchmarks come from (pytest-benchmark reads the cwd's, which
    gpu_check.sh moves out of the tree so that the installed package is the one measured)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip()[:12] + ("+dirty" if dirty.stdout.strip() else "")


ENV_INFO = {
    "commit": _source_commit(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda if HAS_CUDA else None,  # None: no GPU in this run (whatever the build)
    "gpu": torch.cuda.get_device_name() if HAS_CUDA else None,
    "cpu_threads": torch.get_num_threads(),
    "smoke": SMOKE,
    "package": os.path.dirname(os.path.abspath(mole_kernels.__file__)),  # which mole_kernels was measured
}


# MOLE_BENCH_JSONL=path: each benchmark appends one JSON line there as soon as it finishes (pytest-benchmark
# writes its --benchmark-json only at the end of the session, so a run killed by a time box would lose
# every finished case; bench/gpu_check.sh relies on this).
JSONL = os.environ.get("MOLE_BENCH_JSONL")


def _append_jsonl(request, benchmark) -> None:
    stats = getattr(benchmark, "stats", None)
    row = {"name": request.node.name, "fullname": request.node.nodeid, "group": benchmark.group,
           "extra_info": benchmark.extra_info}
    if stats is not None:
        s = stats.stats
        row["stats"] = {"median": s.median, "min": s.min, "mean": s.mean, "rounds": s.rounds}
    with open(JSONL, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


@pytest.fixture(autouse=True)
def _record_environment(request):
    """Stamps every benchmark with the versions and devices it ran on (tests set the rest); with
    MOLE_BENCH_JSONL, writes its result as one JSON line as soon as it finishes."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    # load1: the 1-minute load average as the test starts (other work on the machine shows here)
    benchmark.extra_info.update(ENV_INFO, load1=round(os.getloadavg()[0], 2))
    yield
    if JSONL:
        _append_jsonl(request, benchmark)
