"""Issue 15: the extra peak RSS of loading or re-parameterizing a LUT, as a multiple of the LUT.

Goals (extra peak RSS over the process before the call / the LUT's bytes): disk tier <= 0.25,
host tier <= 1.15, for from_pretrained (single-file and sharded official folders, float and int8
LookupTable files) and for reparameterize. Each call runs in a fresh child process that reads its
own high-water mark (VmHWM, reset through /proc/self/clear_refs); see bench/memory_peaks.py, which
also builds the synthetic checkpoints (once per module, 128 MiB fp16 LUT: the table dominates, the
other weights are ~2 % of it) and times the disk tier's open (bench/bench_memory.py records it).
"""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PEAKS = os.path.join(os.path.dirname(HERE), "bench", "memory_peaks.py")
SIZE_MIB = 128


def _load_peaks():
    spec = importlib.util.spec_from_file_location("memory_peaks", PEAKS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if not os.path.isfile(PEAKS):
    pytest.skip(f"needs the checkout's bench/memory_peaks.py ({PEAKS} not found)", allow_module_level=True)
peaks = _load_peaks()
if not peaks.status_available():
    pytest.skip("needs /proc/self/status with VmHWM (Linux) to read a process's peak RSS", allow_module_level=True)

CASES = [(c, p) for c in peaks.CASES for p in peaks.PLACEMENTS]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Every case x placement, measured once (checkpoints built once; a fresh child per measurement)."""
    tmp = str(tmp_path_factory.mktemp("memory_peaks"))
    rows = peaks.measure_many([(c, SIZE_MIB, p) for c, p in CASES], tmp)
    return {(r["case"], r["placement"]): r for r in rows}


@pytest.mark.parametrize("case,placement", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_extra_peak_rss(measured, case, placement):
    r = measured[(case, placement)]
    mib = 1 << 20
    assert r["hwm_reset"] or not r["upper_bound"], r
    assert r["ratio"] <= peaks.GOALS[placement], (
        f"{case} on {placement}: extra peak RSS {r['extra_peak_bytes'] / mib:.1f} MiB = {r['ratio']:.3f}x the LUT "
        f"({r['lut_bytes'] / mib:.1f} MiB), goal <= {peaks.GOALS[placement]}x; baseline RSS "
        f"{r['baseline_rss_bytes'] / mib:.0f} MiB, peak {r['peak_rss_bytes'] / mib:.0f} MiB, after the call "
        f"{r['rss_after_bytes'] / mib:.0f} MiB (file-backed {(r['rss_after_file_bytes'] or 0) / mib:.0f} MiB), "
        f"{r['seconds']:.2f} s")
