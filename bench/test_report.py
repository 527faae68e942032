"""bench/report.py renders a pytest-benchmark JSON (a CPU run: GPU rows listed as not measured)."""
import importlib.util
import json

import report


def _bench(op, shape, provider, median, nbytes, device="cpu", **extra):
    info = dict(op=op, shape=shape, provider=provider, device=device, bytes=nbytes, torch="2.x", cuda=None,
                gpu=None, commit="abc123", **extra)
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
