"""Issue 15: extra peak RSS of loading / re-parameterizing a LUT, and the disk tier's open time.

Each benchmark is one measurement of bench/memory_peaks.py in a fresh child process (its own
VmHWM, reset through /proc/self/clear_refs before the call): `from_pretrained` of a single-file
and a sharded official folder, of a float and an int8 LookupTable file, and `reparameterize`, each
with the LUT on the host and the disk tier. The checkpoints are synthetic (fp16 LUT of ~400 MiB,
4 MiB in smoke mode; hidden 128, 8 layers, 4 experts: the LUT dominates) and built once per module.
The benchmark's time is the child's whole run (start, imports, the call); the call's own time is
extra_info["seconds"].

extra_info: op="memory-peak", provider=case, shape=placement, lut_bytes, extra_peak_bytes, ratio
(= extra_peak_bytes / lut_bytes), seconds, goal; bench/report.py prints them as a table and checks
the worst ratio per tier against the issue's goals (disk <= 0.25, host <= 1.15).

open-time (provider "open-time", shape "disk"): from_pretrained(official folder, placement="disk")
at a 64 and a 512 MiB LUT (16 and 128 MiB in smoke mode) that differ only in the number of experts,
so every other weight is the same; best of 5 interleaved calls each after a warm-up; ratio =
t_big / t_small. The goal is <= 1.5: an open that reads only headers (and the first and last
token rows it validates) does the same work at both sizes, so the ideal is 1.0; the margin covers
timing noise of a call of some tens of ms on a shared machine. An open that reads or copies the
table scales with it (8x the bytes: a ratio of several).
"""
import os
import shutil
import sys
import tempfile

import pytest

from conftest import SMOKE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_peaks as peaks

SIZE_MIB = 4 if SMOKE else 400
OPEN_SIZES = (16, 128) if SMOKE else peaks.OPEN_TIME_SIZES
CASES = [(c, p) for c in peaks.CASES for p in peaks.PLACEMENTS]
pytestmark = pytest.mark.skipif(not peaks.status_available(),
                                reason="needs /proc/self/status with VmHWM (Linux) to read a process's peak RSS")


@pytest.fixture(scope="module")
def workdir():
    tmp = tempfile.mkdtemp(prefix="mole_bench_mem_")
    peaks.build(SIZE_MIB, tmp, open_sizes=OPEN_SIZES)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _one(benchmark, fn):
    out = {}
    benchmark.pedantic(lambda: out.update(r=fn()), rounds=1, iterations=1, warmup_rounds=0)
    return out["r"]


@pytest.mark.parametrize("case,placement", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_memory_peak(benchmark, workdir, case, placement):
    r = _one(benchmark, lambda: peaks.measure(case, SIZE_MIB, workdir, placement))
    benchmark.group = "memory-peak"
    benchmark.extra_info.update(
        op="memory-peak", provider=case, shape=placement, lut_bytes=r["lut_bytes"],
        extra_peak_bytes=r["extra_peak_bytes"], ratio=round(r["ratio"], 4), seconds=round(r["seconds"], 4),
        goal=r["goal"], size_mib=SIZE_MIB, other_bytes=r["other_bytes"], hwm_reset=r["hwm_reset"],
        lut_shape=r["lut_shape"])


def test_memory_open_time(benchmark, workdir):
    r = _one(benchmark, lambda: peaks.measure("open-time", OPEN_SIZES, workdir))
    benchmark.group = "memory-peak"
    benchmark.extra_info.update(
        op="memory-peak", provider="open-time", shape="disk", ratio=round(r["ratio"], 4),
        seconds_small=round(r["seconds_small"], 5), seconds_big=round(r["seconds_big"], 5),
        lut_bytes_small=r["lut_bytes_small"], lut_bytes=r["lut_bytes_big"], goal=r["goal"],
        sizes_mib=list(OPEN_SIZES))
