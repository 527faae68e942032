"""Turn pytest-benchmark JSON into bench/RESULTS.md tables and PNG plots.

    pytest bench --benchmark-json=cpu.json
    python bench/report.py cpu.json [gpu.json ...] --out bench/RESULTS.md --plots bench/plots

Each JSON file becomes one section headed by its machine, date, torch/CUDA versions and git
commit. Benchmarks are grouped by their pytest-benchmark group (op x shape); in each group every
provider's median is shown with its ratio to ours (provider names starting with "mole"), its
GB/s (from extra_info["bytes"]) and the fraction of the relevant machine limit measured in the
same run (bench_limits.py: host-copy for CPU rows, h2d-pinned for zero-copy/host rows, d2d for
VRAM rows). A run without a GPU lists the GPU rows as not measured.
"""
import argparse
import json
import os
import re
from collections import defaultdict

OURS = "mole"


def load(path):
    with open(path) as f:
        data = json.load(f)
    data["_path"] = path
    return data


def provider_of(bench):
    info = bench.get("extra_info", {})
    return info.get("provider") or bench.get("param") or bench["name"]


def limits_of(data):
    """Machine limits measured in this run: op name -> bytes/s."""
    out = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("provider") == "limit" and info.get("bytes"):
            out[info["op"]] = info["bytes"] / b["stats"]["median"]
    return out


def limit_for(info, limits):
    """The ceiling a row is judged against, by where its bytes come from."""
    provider = str(info.get("provider", ""))
    tier = str(info.get("tier", "")) + " " + provider
    if "zero_copy" in tier or "host" in tier or "dma" in tier or "disk" in tier:
        if info.get("device") == "cuda" or "cuda" in provider:
            return "h2d-pinned", limits.get("h2d-pinned")
    if info.get("device") == "cuda" or "cuda" in provider:
        return "d2d", limits.get("d2d")
    return "host-copy", limits.get("host-copy")


def fmt_time(seconds):
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def header(data):
    m, c = data.get("machine_info", {}), data.get("commit_info", {})
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    extra = data["benchmarks"][0].get("extra_info", {}) if data["benchmarks"] else {}
    lines = [
        f"- date: {data.get('datetime', '?')}",
        f"- machine: {m.get('node', '?')} — {cpu}, {m.get('cpu', {}).get('count', '?')} CPUs"
        + (f", GPU: {extra['gpu']}" if extra.get("gpu") else ", no GPU"),
        f"- python {m.get('python_version', '?')}, torch {extra.get('torch', '?')}, CUDA {extra.get('cuda', 'none')}",
        f"- commit: {c.get('id', '?')[:12]}{' (dirty)' if c.get('dirty') else ''}",
        f"- source: `{os.path.basename(data['_path'])}`",
    ]
    return "\n".join(lines)


def group_table(benches, limits):
    ours = [b for b in benches if str(provider_of(b)).startswith(OURS)]
    best_ours = min((b["stats"]["median"] for b in ours), default=None)
    rows = ["| provider | median | vs ours | GB/s | of limit |", "| --- | ---: | ---: | ---: | ---: |"]
    for b in sorted(benches, key=lambda b: b["stats"]["median"]):
        info = b.get("extra_info", {})
        med = b["stats"]["median"]
        ratio = f"{med / best_ours:.2f}x" if best_ours else "—"
        gbs = info.get("bytes", 0) / med / 1e9 if info.get("bytes") else None
        name, lim = limit_for(info, limits)
        frac = f"{gbs * 1e9 / lim:.0%} {name}" if gbs and lim else "—"
        rows.append(f"| {provider_of(b)} | {fmt_time(med)} | {ratio} | {f'{gbs:.1f}' if gbs else '—'} | {frac} |")
    return "\n".join(rows)


def plot(data, plot_dir, tag):
    """Latency vs tokens per provider, one PNG per op/shape family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    series = defaultdict(lambda: defaultdict(list))
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        m = re.search(r"-T(\d+)", str(info.get("shape", "")))
        if not m or info.get("provider") == "limit":
            continue
        family = f"{info.get('op', b['group'])}-{re.sub(r'-T\d+', '', info['shape'])}"
        series[family][provider_of(b)].append((int(m.group(1)), b["stats"]["median"]))
    os.makedirs(plot_dir, exist_ok=True)
    written = []
    for family, providers in sorted(series.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider, points in sorted(providers.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] * 1e3 for p in points], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per call")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{family} ({tag})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(plot_dir, f"{tag}-{family}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def section(data, plot_dir, out_dir):
    has_gpu = any(b.get("extra_info", {}).get("device") == "cuda" for b in data["benchmarks"])
    tag = "gpu" if has_gpu else "cpu"
    limits = limits_of(data)
    parts = [f"## {'GPU' if has_gpu else 'CPU'} run", header(data), ""]
    if limits:
        parts.append("Machine limits (same run): " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in sorted(limits.items())))
        parts.append("")
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        if b.get("extra_info", {}).get("provider") != "limit":
            groups[b["group"] or b["name"]].append(b)
    for name in sorted(groups):
        parts += [f"### {name}", "", group_table(groups[name], limits), ""]
    if plot_dir:
        for path in plot(data, plot_dir, tag):
            parts.append(f"![{os.path.basename(path)}]({os.path.relpath(path, out_dir)})")
        parts.append("")
    return "\n".join(parts), has_gpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    ap.add_argument("--plots", default=None, help="folder for PNG plots (none if omitted)")
    ap.add_argument("--preamble", default=None, help="markdown file placed above the generated sections")
    args = ap.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    sections, any_gpu = [], False
    for path in args.json:
        text, has_gpu = section(load(path), args.plots, out_dir)
        sections.append(text)
        any_gpu |= has_gpu
    doc = ["# Benchmark results", "",
           "Generated by `bench/report.py` from pytest-benchmark JSON; ratios are provider median / our "
           "median in the same run (above 1x: ours is faster).", ""]
    if args.preamble:
        with open(args.preamble) as f:
            doc += [f.read().rstrip(), ""]
    if not any_gpu:
        doc += ["GPU rows: **not measured** (no GPU run in these files; see `bench/gpu_check.sh`).", ""]
    doc += sections
    with open(args.out, "w") as f:
        f.write("\n".join(doc).rstrip() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
