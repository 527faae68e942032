"""bench/report.py renders a pytest-benchmark JSON (a CPU run: GPU rows listed as not measured)."""
import importlib.util
import json
import re

import pytest

import report


def _bench(op, shape, provider, median, nbytes, device="cpu", **extra):
    info = dict(dict(op=op, shape=shape, provider=provider, device=device, bytes=nbytes, torch="2.x", cuda=None,
                     gpu=None, commit="abc123"), **extra)
    return {"name": f"test[{provider}-{shape}]", "fullname": f"bench/bench_x.py::test[{provider}-{shape}]",
            "group": f"{op}-{shape}", "extra_info": info, "stats": {"median": median}}


def test_render_cpu_run(tmp_path):
    data = {
        "machine_info": {"node": "box", "cpu": {"brand_raw": "Some CPU", "count": 2}},
        "commit_info": {"id": "unversioned"}, "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            _bench("host-copy", "512MiB", "limit", 0.1, 512 << 20),
            _bench("lut_gather-fused", "160M-4E-T1", "mole", 1e-5, 6144),
            _bench("lut_gather-fused", "160M-4E-T16", "mole", 2e-5, 16 * 6144),
            _bench("lut_gather-fused", "160M-4E-T16", "torch-eager", 8e-5, 16 * 6144),
            _bench("e2e-decode", "160M-4E-T1", "mole-host", 3e-3, 73728, scaled_from="L=12,V=50304", layers=4,
                   vocab=4096, context=128),
            _bench("e2e-decode", "160M-4E-T1", "dense", 2.5e-3, 0),
        ],
    }
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    runs = report.render([str(path)], str(out), str(tmp_path / "plots"))
    text = out.read_text()
    assert "GPU: not measured" in text and "commit abc123" in text
    assert "| 160M-4E-T16 | **mole** | cpu | 20 us | 1.00x |" in text
    assert "| torch-eager | cpu | 80 us | 4.00x |" in text
    assert "L=4, V=4096" in text  # the scaled-down e2e shape is said
    if importlib.util.find_spec("matplotlib") is not None:  # figures need matplotlib (README installs it)
        assert sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "lut_gather-fused" in report.summary(runs)


def _run_data(*benches, cuda=None):
    return {"machine_info": {"node": "box", "cpu": {"brand_raw": "Some CPU", "count": 2}},
            "commit_info": {"id": "unversioned"}, "datetime": "2026-01-01T00:00:00", "benchmarks": list(benches)}


def test_stamp_says_cuda_only_when_a_gpu_ran():
    cpu = _run_data(_bench("lut_gather-fused", "160M-4E-T1", "mole", 1e-5, 6144, torch="2.14.1+cu130"))
    assert "| no GPU | torch 2.14.1+cu130 |" in report.stamp(cpu) and "CUDA" not in report.stamp(cpu)
    gpu = _run_data(_bench("lut_gather-fused", "160M-4E-T1", "mole", 1e-5, 6144, device="cuda"))
    gpu["benchmarks"][0]["extra_info"].update(cuda="13.0", gpu="H200")
    assert "| H200 | torch 2.x, CUDA 13.0 |" in report.stamp(gpu)


def test_above_the_limit_says_why():
    limit = _bench("host-copy", "512MiB", "limit", 0.1, 512 << 20)  # 5.4 GB/s
    fused = _bench("lut_gather-fused", "160M-4E-T16", "mole", 1e-5, 1 << 20)  # 105 GB/s
    rows = _bench("table-gather", "160M-4E-T16", "host-zero_copy", 1e-4, 1 << 20, unique_bytes=1 << 19)
    slow = _bench("lut_gather-rows", "160M-4E-T16", "mole", 1.0, 1 << 20)
    data = _run_data(limit, fused, rows, slow)
    limits = report.limits_of(data)
    [f] = report.group_rows([fused], False, limits)
    [r] = report.group_rows([rows], False, limits)
    [s] = report.group_rows([slow], False, limits)
    assert f["frac"] == "1953% host-copy (writes one row per E rows read; a copy writes all it reads)"
    assert r["frac"] == "195% host-copy (repeated ids: re-read rows come from cache)"
    assert s["frac"] == "0% host-copy"  # below the limit: no reason needed


def test_figures_plain_ticks_bars_for_one_size_scaled_titles(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    figures = []
    make = report._figure

    def recording(plt, title, *args):
        fig, ax = make(plt, title, *args)
        figures.append((title, fig, ax))
        return fig, ax

    monkeypatch.setattr(report, "_figure", recording)
    scaled = dict(scaled_from="L=12,V=50304", layers=4, vocab=4096, context=128)
    data = _run_data(
        _bench("e2e-prefill", "160M-4E-S128-T128", "mole-host", 0.087, 0, **scaled),
        _bench("e2e-prefill", "160M-4E-S128-T128", "mole-disk", 0.087, 0, **scaled),
        _bench("e2e-prefill", "160M-4E-S128-T128", "dense", 0.085, 0, **scaled),
        *[_bench("e2e-decode", f"160M-4E-T{t}", p, 0.01 * t, 0, **scaled)
          for t in (1, 8, 32) for p in ("mole-host", "mole-disk")])
    data["_path"] = str(tmp_path / "x.json")
    report.plots(data, str(tmp_path / "plots"), "cpu")
    by_title = {t.splitlines()[0]: (t, fig, ax) for t, fig, ax in figures}
    prefill = next(v for k, v in by_title.items() if k.startswith("e2e-prefill"))
    decode = next(v for k, v in by_title.items() if k.startswith("e2e-decode"))
    for title, _, _ in (prefill, decode):
        assert "scaled: L=4, V=4096 (paper L=12,V=50304)" in title
    _, _, ax = prefill  # one size: a bar per provider, none hidden
    assert len(ax.patches) == 3 and not ax.get_lines()
    _, fig, ax = decode  # equal values of two providers stay side by side
    host, disk = ax.get_lines()
    assert list(host.get_ydata()) == list(disk.get_ydata()) and all(host.get_xdata() != disk.get_xdata())
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
    assert labels and all(re.fullmatch(r"[0-9.]+ (ms|us|s)", t) for t in labels), labels
    assert {t.get_text() for t in ax.get_xticklabels() if t.get_text()} >= {"1", "8", "32"}


def test_decode_table_and_goals(tmp_path):
    """bench_decode's interleaved rows get their own table, and every goal the run measured is listed
    with its value, bound and verdict (GPU goals from a GPU run's rows and limits)."""
    decode = _bench("decode-vs-dense", "demo-B1", "interleaved", 0.1, 0, rounds=9,
                    ms_per_token={"dense": 1.0, "mole-host": 1.03, "mole-disk": 1.05},
                    vs_dense={"dense": 1.0, "mole-host": 1.03, "mole-disk": 1.05, "disk/host": 1.019})
    decode["fullname"] = "bench/bench_decode.py::test_decode_vs_dense[demo-B1]"
    data = {"machine_info": {"node": "box", "cpu": {"brand_raw": "Some CPU", "count": 2}},
            "commit_info": {"id": "x"}, "datetime": "2026-01-01T00:00:00", "benchmarks": [decode]}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    report.render([str(path)], str(out), None)
    text = out.read_text()
    assert "| demo-B1 | dense | 1.000 | 1.000x | 9 |" in text and "|  | **mole-host** | 1.030 | 1.030x |  |" in text
    assert "| CPU decode, MoLE (LUT on host) / dense, demo shape | 1.030 | <= 1.05 | met |" in text
    assert "| CPU decode, disk / host (page cache warm), demo shape | 1.019 | <= 1.02 | met |" in text
    assert "160M-4E" not in text.split("### Goals")[1].split("###")[0]  # not measured: not listed
    big = _bench("decode-vs-dense", "410M-4E-B1", "interleaved", 0.1, 0, rounds=9,
                 ms_per_token={"dense": 1.0, "mole-host": 1.01}, vs_dense={"dense": 1.0, "mole-host": 1.01})
    cpu_goals = [w for w, *_ in report.goal_lines({"benchmarks": [decode, big]})]
    assert "CPU decode, MoLE (host) / dense, 410M-4E" in cpu_goals
    assert not any(w.startswith("GPU") for w in cpu_goals)  # a CPU run's mole-host rows are not GPU figures

    gpu = [_bench("zero-copy-sm-read", "512MiB", "limit", 0.01, 400_000_000, device="cuda", gpu="H200"),
           _bench("h2d-pinned", "512MiB", "limit", 0.01, 500_000_000, device="cuda", gpu="H200"),
           _bench("lut_gather-rows", "410M-4E-T256", "mole-cuda-zero_copy", 0.01, 380_000_000, device="cuda"),
           _bench("table-gather", "410M-4E-T256", "host-dma", 0.01, 600_000_000, device="cuda",
                  unique_bytes=400_000_000),
           _bench("table-gather", "410M-4E-T16", "host-dma", 0.01, 600_000_000, device="cuda",
                  unique_bytes=490_000_000)]  # fewer than 64 rows: not counted
    goals = dict((w, (round(v, 3), m)) for w, v, _, m in report.goal_lines({"benchmarks": gpu}))
    assert goals["GPU zero-copy row fetch / SM-load zero-copy limit"] == (0.95, "met")
    assert goals["GPU DMA path (>= 64 unique rows) / h2d-pinned limit"] == (0.8, "NOT met")


def test_memory_table_and_goals(tmp_path):
    """bench_memory's rows get their own table (extra peak RSS / LUT per case and tier, the open
    time) and the issue-15 goals: the worst ratio per tier, and the open-time ratio."""
    mib = 1 << 20

    def mem(case, tier, extra, lut=400 * mib, seconds=0.5):
        b = _bench("memory-peak", tier, case, 1.0, 0, lut_bytes=lut, extra_peak_bytes=extra, ratio=extra / lut,
                   seconds=seconds, goal=0.25 if tier == "disk" else 1.15)
        b["fullname"] = f"bench/bench_memory.py::test_memory_peak[{case}-{tier}]"
        return b

    open_time = _bench("memory-peak", "disk", "open-time", 1.0, 0, ratio=1.2, seconds_small=0.04,
                       seconds_big=0.048, lut_bytes_small=64 * mib, lut_bytes=512 * mib, goal=1.5)
    data = _run_data(mem("from_pretrained-single", "host", 420 * mib), mem("from_pretrained-single", "disk", 8 * mib),
                     mem("reparameterize", "disk", 160 * mib), mem("reparameterize", "host", 440 * mib), open_time)
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    report.render([str(path)], str(out), None)
    text = out.read_text()
    assert "| from_pretrained-single | disk | 400.0 MiB | 8.0 MiB | 0.020x | <= 0.25 | 500 ms |" in text
    assert "| reparameterize | host | 400.0 MiB | 440.0 MiB | 1.100x | <= 1.15 | 500 ms |" in text
    assert "| open-time (64 -> 512 MiB LUT) | disk | | 40 ms -> 48 ms | 1.20x | <= 1.5 | |" in text
    assert "| Load/reparameterize extra peak RSS / LUT, disk tier (worst case) | 0.400 | <= 0.25 | NOT met |" in text
    assert "| Load/reparameterize extra peak RSS / LUT, host tier (worst case) | 1.100 | <= 1.15 | met |" in text
    assert "| Disk-tier open of an official folder, time at 8x the LUT / time at 1x | 1.200 | <= 1.5 | met |" in text
    assert "memory-peak" not in report.summary(report.pool([dict(data, _path=str(path))])).split("goal:")[0]


# From the root the whole smoke run (the README's command); from elsewhere one suite: the same code
# decides what is imported, and a second full run would double the time this test takes.
@pytest.mark.parametrize("where, subset", [("clone root", []), ("elsewhere", ["--pytest-args", "-k limits"])])
def test_run_smoke_benchmarks_the_package_python_imports(tmp_path, where, subset):
    """`python bench/report.py --run --smoke` as the README gives it, from the clone's root and from
    another folder: it runs the suites against the mole_kernels that Python imports outside the clone
    (after `pip install .`: the installed package; in development: the in-place build), never the
    uncompiled source folder the clone's root would put first on sys.path."""
    import glob
    import os
    import subprocess
    import sys

    import mole_kernels

    root = os.path.dirname(report.HERE)
    folder, source_tree = report.package_under_test()
    if not source_tree:  # installed (CI: .ci/run does `pip install .`): the very package these tests import
        assert folder == os.path.dirname(os.path.dirname(os.path.abspath(mole_kernels.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOLE_BENCH_SMOKE")}  # as a user runs it
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, os.path.join(report.HERE, "report.py"), "--run", "--smoke",
                          "--out", str(out), "--plots", "", *subset],
                         cwd=root if where == "clone root" else tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"benchmarking {os.path.join(folder, 'mole_kernels')}" in res.stdout
    assert "SMOKE sizes" in out.read_text()
    smoke = report.load(os.path.join(report.RESULTS_DIR, "cpu-smoke.json"))
    measured = {report.info_of(b).get("package") for b in smoke["benchmarks"]}
    assert measured == {os.path.join(folder, "mole_kernels")}, measured
    files = {b["fullname"].split("::")[0] for b in smoke["benchmarks"]}
    suites = glob.glob(os.path.join(report.HERE, "bench_*.py"))
    assert len(files) == (1 if subset else len(suites)), files  # every suite ran (a missing one: an import failed)


def test_a_crowded_figure_is_split_by_table_format():
    many = {f"{p}{f} [cpu]": [(1, 1.0)] for p in ("host-zero_copy", "host-dedup", "disk-staged")
            for f in ("", "-int8", "-nf4")}
    figures = dict(report._by_format({"160M-4E": many}))
    assert sorted(figures) == ["160M-4E-bf16", "160M-4E-int8", "160M-4E-nf4"]
    assert all(len(series) == 3 for series in figures.values())
    few = {k: v for k, v in many.items() if "disk" in k}  # three series: one figure
    assert dict(report._by_format({"160M-4E": few})) == {"160M-4E": few}
