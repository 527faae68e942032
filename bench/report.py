"""Turn pytest-benchmark JSON into bench/RESULTS.md (tables) and bench/plots/*.png (figures).

One command, on this CPU machine (runs the whole suite, then renders; a few minutes):

    python bench/report.py --run                 # -> bench/results/cpu.json, bench/RESULTS.md, bench/plots/
    python bench/report.py --run --smoke         # the same at smoke sizes (seconds; numbers meaningless),
                                                 # -> bench/results/cpu-smoke.json, RESULTS-smoke.md, plots-smoke/

The suite benchmarks the mole_kernels that Python imports outside the clone (after `pip install .`,
the installed one), else this clone's in-place build; it says which before it starts.
    python bench/report.py                       # re-render from bench/results/*.json only

Other JSON files (e.g. the GPU run that bench/gpu_check.sh writes; put it at
bench/results/gpu.json) are rendered next to the CPU run:

    python bench/report.py bench/results/cpu.json bench/results/gpu.json --out bench/RESULTS.md --plots bench/plots
    python bench/report.py a.json b.json --merge-to all.json   # one JSON from several partial runs

Files from the same machine (node + GPU) are pooled into one section headed by the machine,
date, torch/CUDA versions and git commit; every figure carries the same line. Rows are grouped
op x shape; each provider's median is shown with its time ratio to ours (the fastest of our providers
on the same device and group: above 1x ours is faster, below 1x slower; ours = names starting with "mole", every
LookupTable path in table-gather, the quantized formats against bf16), its GB/s (from
extra_info["bytes"]) and the fraction of the relevant machine limit measured in the same run
(bench_limits.py: host-copy for CPU rows, h2d-pinned for rows whose bytes cross PCIe, d2d for
VRAM rows). Without a GPU run, the GPU providers of each op are listed as not measured.
`--summary` prints one line per group (ours vs the best baseline); gpu_check.sh shows it last.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_VOCAB = 50304
RESULTS_DIR = os.path.join(HERE, "results")
OURS = "mole"
DECODE_OP = "decode-vs-dense"  # bench_decode.py: one row per (shape, batch), providers interleaved inside
MEMORY_OP = "memory-peak"  # bench_memory.py: extra peak RSS per (case, tier) as a multiple of the LUT
# Suites whose every provider is ours (tiers/paths of LookupTable), and suites whose baseline is
# not named as a peer but as our own reference format (quant: bf16 is the reference).
ALL_OURS_OPS = ("table-gather",)
REFERENCE_PROVIDERS = {"bf16"}
# GPU-only providers per op, listed as "not measured" when no GPU run is given. Keep in step with
# the suites (a missing name only costs a line in the report).
GPU_PROVIDERS = {
    "limits": ["h2d-pinned", "d2d", "dma-from-alias", "zero-copy-sm-read"],
    "lut_gather-fused": ["mole-cuda-device", "mole-cuda-zero_copy", "torch-eager-cuda-device"],  # fbgemm: CPU only
    "lut_gather-rows": ["mole-cuda-device", "mole-cuda-zero_copy", "official-cuda"],
    "table-gather": ["device-device", "host-zero_copy", "host-dma", "disk-staged"],
    "e2e-decode": ["dense", "mole-device", "mole-host", "mole-disk", "moe-offload", "dense-graph",
                   "mole-device-graph", "mole-host-graph"],
    "e2e-prefill": ["dense", "mole-device", "mole-host", "mole-disk", "moe-offload"],
    "combine": ["mole_combine (Triton)", "eager", "mole-lut_combine (VRAM)", "mole-lut_combine-pinned"],
    DECODE_OP: ["dense", "mole-device", "mole-host", "dense-graph", "mole-device-graph", "mole-host-graph"],
}


# ---------------------------------------------------------------- reading ---------------------


def load(path):
    with open(path) as f:
        data = json.load(f)
    data["_path"] = path
    return data


def info_of(b):
    return b.get("extra_info", {}) or {}


def provider_of(b):
    return str(info_of(b).get("provider") or b.get("param") or b["name"])


def is_ours(b):
    provider = provider_of(b)
    if provider.startswith(OURS):
        return True
    op = op_of(b)
    if op in ALL_OURS_OPS:
        return True
    return op.startswith("lut_gather_quant") and provider not in REFERENCE_PROVIDERS


def op_of(b):
    info = info_of(b)
    if info.get("op"):
        return "limits" if info.get("provider") == "limit" else info["op"]
    m = re.search(r"bench_(\w+)\.py", b.get("fullname", ""))  # suites that set no op: the file name
    return m.group(1) if m else b.get("group") or "misc"


def device_of(b, run_has_gpu):
    """'cpu' or 'cuda' (bench_combine records a device *name*; anything not a CPU is the GPU)."""
    d = str(info_of(b).get("device", "cpu"))
    if d in ("cpu", "cuda"):
        return d
    return "cpu" if d.startswith("cpu") or not run_has_gpu else "cuda"


def run_has_gpu(data):
    return any(info_of(b).get("gpu") or info_of(b).get("device") == "cuda" for b in data["benchmarks"])


def machine_key(data):
    gpu = next((info_of(b).get("gpu") for b in data["benchmarks"] if info_of(b).get("gpu")), None)
    return data.get("machine_info", {}).get("node", "?"), gpu


def pool(datas):
    """Files from one machine -> one run: benchmarks concatenated, the first file's metadata."""
    runs = {}
    for d in datas:
        key = machine_key(d)
        if key not in runs:
            runs[key] = dict(d, benchmarks=list(d["benchmarks"]), _paths=[d["_path"]])
        else:
            runs[key]["benchmarks"] += d["benchmarks"]
            runs[key]["_paths"].append(d["_path"])
    return list(runs.values())


def limits_of(data):
    """Machine limits measured in this run: op name -> bytes/s."""
    out = {}
    for b in data["benchmarks"]:
        info = info_of(b)
        if info.get("provider") == "limit" and info.get("bytes"):
            out[info["op"]] = info["bytes"] / b["stats"]["median"]
    return out


def limit_for(b, device, limits):
    """The ceiling a row is judged against, by where its bytes come from (None: not a bandwidth row)."""
    info, provider = info_of(b), provider_of(b)
    op = op_of(b)
    if op.startswith("e2e") and not (provider.startswith(OURS) and device == "cuda" and info.get("tier") != "device"):
        return None, None  # a model step is not a copy; only the off-GPU LUT tiers are judged by PCIe
    where = f"{info.get('tier', '')} {provider}"
    if device == "cuda":
        if any(k in where for k in ("zero_copy", "host", "dma", "disk", "official", "offload")):
            return "h2d-pinned", limits.get("h2d-pinned")
        return "d2d", limits.get("d2d")
    return "host-copy", limits.get("host-copy")


# ---------------------------------------------------------------- formatting -------------------


def fmt_time(seconds):
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def stamp(data):
    """One line naming machine, date, versions and commit: on every table section and figure."""
    m, c = data.get("machine_info", {}), data.get("commit_info", {})
    extra = next((info_of(b) for b in data["benchmarks"] if info_of(b).get("torch")), {})
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    gpu = extra.get("gpu") or "no GPU"
    commit = extra.get("commit") or (c.get("id", "?")[:12] + ("+dirty" if c.get("dirty") else ""))
    # "CUDA x" only when a GPU ran: a CUDA build of torch on a machine without one says "no GPU" once
    cuda = f", CUDA {extra['cuda']}" if extra.get("cuda") else ""
    return (f"{m.get('node', '?')} | {cpu} ({m.get('cpu', {}).get('count', '?')} CPUs) | {gpu} | "
            f"torch {extra.get('torch', '?')}{cuda} | {str(data.get('datetime', '?'))[:16]} | commit {commit}")


def sort_key_shape(shape):
    """Natural order: 160M-4E-T8 before 160M-4E-T32."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(shape))]


def group_rows(benches, has_gpu, limits):
    """Rows of one op: (shape, provider, device, median, time vs ours, GB/s, of limit)."""
    by_group = defaultdict(list)
    for b in benches:
        by_group[b.get("group") or b["name"]].append(b)
    rows = []
    for group in sorted(by_group, key=sort_key_shape):
        members = [(b, device_of(b, has_gpu)) for b in by_group[group]]
        ref = {}
        for b, d in members:
            if is_ours(b):
                ref[d] = min(ref.get(d, float("inf")), b["stats"]["median"])
        any_ref = min(ref.values(), default=None)
        for b, d in sorted(members, key=lambda x: (x[1], x[0]["stats"]["median"])):
            info, med = info_of(b), b["stats"]["median"]
            base = ref.get(d, any_ref)
            gbs = info["bytes"] / med / 1e9 if info.get("bytes") else None
            lname, lim = limit_for(b, d, limits)
            frac = "—"
            if gbs and lim:
                frac = f"{gbs * 1e9 / lim:.0%} {lname}"
                if gbs * 1e9 > lim:
                    frac += f" ({over_limit_reason(b)})"
            rows.append(dict(
                shape=str(info.get("shape", group)), provider=provider_of(b), device=d, median=med,
                ratio=med / base if base else None, gbs=gbs, frac=frac, group=group, ours=is_ours(b),
            ))
    return rows


def over_limit_reason(b):
    """Why a row can move more than the machine's copy limit (the limit counts the bytes a copy
    reads, and a copy writes as many again)."""
    info, op = info_of(b), op_of(b)
    if info.get("unique_bytes") and info["unique_bytes"] < 0.9 * info["bytes"]:
        return "repeated ids: re-read rows come from cache"
    if op.endswith("fused") or op == "combine":
        return "writes one row per E rows read; a copy writes all it reads"
    return "reads reach memory, the small output stays in cache"


# Notes printed under an op's table in a CPU run (what a figure there is made of).
CPU_NOTES = {
    "table-gather": (
        "The step from 16 to 256 tokens at 410M-4E (3 MiB to 48 MiB returned per call) is the output "
        "allocation, not the gather: the rows form allocates its result on every call, and glibc's malloc "
        "returns blocks above its 32 MiB mmap threshold to the kernel when they are freed, so each such call "
        "maps fresh memory and page-faults all of it in (12,288 faults of 4 KiB at 48 MiB: about 16 ms of a "
        "24 ms call measured on the 2-CPU VM; how slow a fault is depends on the machine's memory state, "
        "73 ms in one run). Below 32 MiB the freed block is reused. A decoder does not pay it: the "
        "prefetcher gathers into buffers it keeps."),
}


# ---------------------------------------------------------------- decode vs dense, goals ---------
def decode_table(benches):
    """bench_decode.py rows: per shape and batch, each provider's median ms/token and its ratio."""
    out = ["| shape | provider | ms/token | vs dense | rounds |", "| --- | --- | ---: | ---: | ---: |"]
    for b in sorted(benches, key=lambda b: sort_key_shape(info_of(b)["shape"])):
        info = info_of(b)
        first = True
        for p, ms in info["ms_per_token"].items():
            name = f"**{p}**" if p.startswith(OURS) else p
            out.append(f"| {info['shape'] if first else ''} | {name} | {ms:.3f} | {info['vs_dense'][p]:.3f}x | "
                       f"{info['rounds'] if first else ''} |")
            first = False
        extra = {k: v for k, v in info["vs_dense"].items() if "/" in k}
        if extra:
            out.append(f"| | {', '.join(extra)} | | {', '.join(f'{v:.3f}x' for v in extra.values())} | |")
    return "\n".join(out)


# The "decode at dense speed" goals: (what, bound, how to read it off a run). Each reader returns the
# measured value or None when the run has no such row (a CPU run has no GPU goals, and the reverse).
def _decode_ratio(data, shape, key):
    for b in data["benchmarks"]:
        info = info_of(b)
        if op_of(b) == DECODE_OP and info.get("shape") == shape:
            return info["vs_dense"].get(key)
    return None


def _median_ratio(data, op, shape, provider, baseline):
    """median(provider) / median(baseline) among `op` rows of `shape` (one run: same machine, same process)."""
    med = {provider_of(b): b["stats"]["median"] for b in data["benchmarks"]
           if op_of(b) == op and info_of(b).get("shape") == shape}
    return med[provider] / med[baseline] if provider in med and baseline in med else None


def _best_fraction(data, op, provider, limit, min_T=0, bytes_key="bytes"):
    """The best GB/s of `provider` rows of `op` (tokens >= min_T) over the run's `limit` bandwidth."""
    lim = limits_of(data).get(limit)
    fracs = [info_of(b)[bytes_key] / b["stats"]["median"] / lim for b in data["benchmarks"]
             if lim and op_of(b) == op and provider_of(b) == provider and info_of(b).get(bytes_key)
             and int(re.search(r"T(\d+)", info_of(b)["shape"]).group(1)) >= min_T]
    return max(fracs, default=None)


def _combine_fraction(data):
    """bench_combine's lut_combine on a VRAM table: bytes moved over the device copy's (read + write)."""
    fr = [info_of(b)["fraction_of_copy_bw"] for b in data["benchmarks"] if op_of(b) == "combine"
          and provider_of(b) == "mole-lut_combine" and device_of(b, True) == "cuda"
          and info_of(b).get("fraction_of_copy_bw")]
    return max(fr, default=None)


def memory_table(benches):
    """bench_memory.py rows: per case and tier, the extra peak RSS over the LUT; then the open time."""
    mib = 1 << 20
    out = ["| case | tier | LUT | extra peak RSS | / LUT | goal | call |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = sorted(benches, key=lambda b: (provider_of(b) == "open-time", provider_of(b), info_of(b).get("shape", "")))
    for b in rows:
        info = info_of(b)
        if provider_of(b) == "open-time":
            out.append(f"| open-time ({info['lut_bytes_small'] / mib:.0f} -> {info['lut_bytes'] / mib:.0f} MiB LUT) | "
                       f"disk | | {fmt_time(info['seconds_small'])} -> {fmt_time(info['seconds_big'])} | "
                       f"{info['ratio']:.2f}x | <= {info['goal']:g} | |")
            continue
        out.append(f"| {provider_of(b)} | {info['shape']} | {info['lut_bytes'] / mib:.1f} MiB | "
                   f"{info['extra_peak_bytes'] / mib:.1f} MiB | {info['ratio']:.3f}x | <= {info['goal']:g} | "
                   f"{fmt_time(info['seconds'])} |")
    return "\n".join(out)


def _memory_worst(data, tier):
    """The worst extra-peak-RSS / LUT ratio of bench_memory's load/reparameterize rows on `tier`."""
    return max((info_of(b)["ratio"] for b in data["benchmarks"] if op_of(b) == MEMORY_OP
                and provider_of(b) != "open-time" and info_of(b).get("shape") == tier), default=None)


def _memory_open_time(data):
    return next((info_of(b)["ratio"] for b in data["benchmarks"] if op_of(b) == MEMORY_OP
                 and provider_of(b) == "open-time"), None)


GOALS = [
    ("CPU decode, MoLE (LUT on host) / dense, demo shape", "<=", 1.05, lambda d: _decode_ratio(d, "demo-B1", "mole-host")),
    ("CPU decode, MoLE (host) / dense, 160M-4E", "<=", 1.02, lambda d: _decode_ratio(d, "160M-4E-B1", "mole-host")),
    ("CPU decode, MoLE (host) / dense, 410M-4E", "<=", 1.02, lambda d: _decode_ratio(d, "410M-4E-B1", "mole-host")),
    ("CPU decode, disk / host (page cache warm), demo shape", "<=", 1.02, lambda d: _decode_ratio(d, "demo-B1", "disk/host")),
    ("CPU decode, disk / host, 160M-4E", "<=", 1.02, lambda d: _decode_ratio(d, "160M-4E-B1", "disk/host")),
    ("CPU decode, disk / host, 410M-4E", "<=", 1.02, lambda d: _decode_ratio(d, "410M-4E-B1", "disk/host")),
    ("GPU decode (graph), pinned host / VRAM, 410M-4E batch 1", "<=", 1.01,
     lambda d: _decode_ratio(d, "410M-4E-B1", "host/device-graph")),
    ("GPU decode (graph), pinned host / VRAM, 410M-4E batch 32", "<=", 1.03,
     lambda d: _decode_ratio(d, "410M-4E-B32", "host/device-graph")),
    ("GPU decode (eager), pinned host / VRAM, 410M-4E batch 1", "<=", 1.01,
     lambda d: _decode_ratio(d, "410M-4E-B1", "host/device")),
    ("GPU decode (eager), pinned host / VRAM, 410M-4E batch 32", "<=", 1.03,
     lambda d: _decode_ratio(d, "410M-4E-B32", "host/device")),
    ("GPU decode (eager), MoLE (host) / dense, 410M-4E batch 1", "<=", 1.10,
     lambda d: _decode_ratio(d, "410M-4E-B1", "mole-host")),
    ("GPU prefill 8 x 512, pinned host / VRAM, 410M-4E", "<=", 1.15,
     lambda d: _median_ratio(d, "e2e-prefill", "410M-4E-S512-T4096", "mole-host", "mole-device")),
    ("GPU zero-copy row fetch / SM-load zero-copy limit", ">=", 0.90,
     lambda d: _best_fraction(d, "lut_gather-rows", "mole-cuda-zero_copy", "zero-copy-sm-read")),
    ("GPU DMA path (>= 64 unique rows) / h2d-pinned limit", ">=", 0.90,
     lambda d: _best_fraction(d, "table-gather", "host-dma", "h2d-pinned", min_T=64, bytes_key="unique_bytes")),
    ("GPU device-tier lut_combine / HBM copy bandwidth", ">=", 0.85, _combine_fraction),
    # issue 15: extra peak RSS of from_pretrained (official folders, LookupTable files) and reparameterize
    ("Load/reparameterize extra peak RSS / LUT, disk tier (worst case)", "<=", 0.25,
     lambda d: _memory_worst(d, "disk")),
    ("Load/reparameterize extra peak RSS / LUT, host tier (worst case)", "<=", 1.15,
     lambda d: _memory_worst(d, "host")),
    # the same weights, 8x the LUT: an open that reads only headers takes the same time (1.0 + noise)
    ("Disk-tier open of an official folder, time at 8x the LUT / time at 1x", "<=", 1.5, _memory_open_time),
]


def goal_lines(data):
    """(what, measured, bound text, 'met' / 'NOT met') for every goal this run measured: a "GPU ..." goal
    from a run with GPU rows only, a "CPU ..." goal from a run without (both measure providers of the same
    names, e.g. mole-host)."""
    rows = []
    gpu = run_has_gpu(data)
    for what, cmp, bound, read in GOALS:
        if what.startswith(("GPU", "CPU")) and what.startswith("GPU") != gpu:
            continue
        value = read(data)
        if value is not None:
            met = value <= bound if cmp == "<=" else value >= bound
            rows.append((what, value, f"{cmp} {bound:g}", "met" if met else "NOT met"))
    return rows


def op_table(rows):
    out = ["| shape | provider | device | median | time vs ours | GB/s | of limit |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    last = None
    for r in rows:
        shape = r["shape"] if r["shape"] != last else ""
        last = r["shape"]
        name = f"**{r['provider']}**" if r["ours"] else r["provider"]
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "—"
        gbs = f"{r['gbs']:.3g}" if r["gbs"] is not None else "—"
        out.append(f"| {shape} | {name} | {r['device']} | {fmt_time(r['median'])} | {ratio} | {gbs} | {r['frac']} |")
    return "\n".join(out)


# ---------------------------------------------------------------- plots -----------------------


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


MARKERS = "osD^vP<X>*"


def _series(data, has_gpu, value, ours_labels):
    """op -> family (shape without -T<n>) -> 'provider [device]' -> [(T, value)]; ours' labels into ours_labels."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for b in data["benchmarks"]:
        info = info_of(b)
        m = re.search(r"-T(\d+)$", str(info.get("shape", "")))
        if not m or info.get("provider") == "limit":
            continue
        v = value(b)
        if v is None:
            continue
        label = f"{provider_of(b)} [{device_of(b, has_gpu)}]"
        if is_ours(b):
            ours_labels.add(label)
        out[op_of(b)][family_of(info)][label].append((int(m.group(1)), v))
    return out


QUANT_FORMATS = ("int8", "fp8", "fp8_e4m3", "nf4")
MAX_SERIES = 6  # more lines than this on one figure cannot be told apart


def _by_format(families):
    """(family, providers) per figure: a family with more than MAX_SERIES series whose providers
    differ in table format (names ending in -int8, -nf4, ...) gets a figure per format."""
    for family, providers in families.items():
        formats = defaultdict(dict)
        for label, pts in providers.items():
            fmt = next((f for f in QUANT_FORMATS if label.split(" [")[0].endswith("-" + f)), "bf16")
            formats[fmt][label] = pts
        if len(providers) <= MAX_SERIES or len(formats) == 1:
            yield family, providers
        else:
            yield from ((f"{family}-{fmt}", subset) for fmt, subset in formats.items())


def family_of(info):
    return re.sub(r"-T\d+$", "", str(info.get("shape", "")))


def scale_note(info):
    """How a benchmark's shape differs from the paper's, in a few words (None: it does not)."""
    if info.get("scaled_from"):
        return f"scaled: L={info.get('layers')}, V={info.get('vocab')} (paper {info['scaled_from']})"
    if str(info.get("shape", "")).startswith("demo"):
        return None  # the demo's own small model, not one of the paper's
    if info.get("vocab") and info.get("vocab") != PAPER_VOCAB and info.get("op"):
        return f"scaled: V={info['vocab']} (paper {PAPER_VOCAB:,})"
    return None


def plain_number(x, unit):
    """Tick text in plain units: 60 ms, 800 us, 2.5 GB/s, 256."""
    if unit == "ms":
        return fmt_time(x / 1e3)
    if unit == "GB/s":
        return f"{x:.3g} GB/s"
    return f"{x:.4g}"


def _unit_formatter(unit, base=10):
    """A log-axis formatter that writes plain numbers with units (matplotlib's default: 6x10^1)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return plain_number(x, unit)

    return Plain(base=base, labelOnlyBase=False)


def _figure(plt, title, xlabel, ylabel, stamp_line):
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.text(0.01, 0.005, stamp_line, fontsize=5.5, color="0.35")
    return fig, ax


def _log_axes(ax, yunit):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(_unit_formatter("", base=2))
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(_unit_formatter(yunit))


def _lines(ax, providers, ours):
    """One line per provider; distinct hollow markers and a small sideways offset, so that equal
    values stay visible side by side instead of one provider hiding under another."""
    n = len(providers)
    for i, (label, pts) in enumerate(sorted(providers.items())):
        pts.sort()
        shift = 2 ** (0.05 * (i - (n - 1) / 2))  # a few percent along the log2 axis
        ax.plot([p[0] * shift for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)],
                markerfacecolor="none", label=label, linestyle="-" if label in ours else "--")


def _bars(ax, providers, ours, unit):
    """One measured size only: a bar per provider (a line through one point shows nothing)."""
    items = sorted(((pts[0][1], label) for label, pts in providers.items()), reverse=True)
    values = [v for v, _ in items]
    ax.barh(range(len(items)), values, color=["C0" if label in ours else "0.6" for _, label in items])
    ax.set_yticks(range(len(items)), [label for _, label in items], fontsize=7)
    if values[0] / max(values[-1], 1e-30) > 20:
        ax.set_xscale("log")
        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(_unit_formatter(unit))
    for y, v in enumerate(values):
        ax.annotate(plain_number(v, unit), (v, y), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=7)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.grid(False, axis="y")


def plots(data, plot_dir, tag):
    """Latency vs tokens (batch) per provider, and GB/s vs rows with the machine's limits drawn in."""
    plt = _plt()
    if plt is None or not plot_dir:
        return []
    os.makedirs(plot_dir, exist_ok=True)
    for old in os.listdir(plot_dir):  # figures of an earlier run of this kind would linger unlinked
        if old.startswith(f"{tag}-") and old.endswith(".png"):
            os.unlink(os.path.join(plot_dir, old))
    has_gpu, line, limits = run_has_gpu(data), stamp(data), limits_of(data)
    notes = {(op_of(b), family_of(info_of(b))): scale_note(info_of(b)) for b in data["benchmarks"]}
    written = []

    def title(op, family, what):
        note = notes.get((op, re.sub(r"-(bf16|%s)$" % "|".join(QUANT_FORMATS), "", family)))
        return f"{op} {family}: {what} ({tag})" + (f"\n{note}" if note else "")

    def save(fig, ax, name, legend=True):
        if legend:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(plot_dir, f"{tag}-{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    ours = set()  # ours solid (blue bars), baselines dashed (grey bars)
    latency = _series(data, has_gpu, lambda b: b["stats"]["median"] * 1e3, ours)
    for op, families in sorted(latency.items()):
        for family, providers in sorted(_by_format(families)):
            sizes = {t for pts in providers.values() for t, _ in pts}
            unit = "batch (decode tokens per step)" if op == "e2e-decode" else "tokens per call"
            if len(sizes) == 1:
                fig, ax = _figure(plt, title(op, family, f"median latency at {unit} = {sizes.pop()}"),
                                  "median latency", "", line)
                _bars(ax, providers, ours, "ms")
                save(fig, ax, f"latency-{op}-{family}", legend=False)
                continue
            fig, ax = _figure(plt, title(op, family, "median latency"), unit, "median latency", line)
            _log_axes(ax, "ms")
            _lines(ax, providers, ours)
            save(fig, ax, f"latency-{op}-{family}")

    bandwidth = _series(data, has_gpu, lambda b: info_of(b)["bytes"] / b["stats"]["median"] / 1e9
                        if info_of(b).get("bytes") and not op_of(b).startswith("e2e") else None, ours)
    for op, families in sorted(bandwidth.items()):
        for family, providers in sorted(_by_format(families)):
            fig, ax = _figure(plt, title(op, family, "GB/s of rows read"), "rows (tokens) per call", "GB/s", line)
            _log_axes(ax, "GB/s")
            _lines(ax, providers, ours)
            for name, bps in sorted(limits.items()):
                ax.axhline(bps / 1e9, color="0.5", linewidth=0.8, linestyle=":")
                ax.annotate(f"{name} {bps / 1e9:.0f} GB/s", (ax.get_xlim()[0], bps / 1e9), fontsize=6, color="0.4")
            save(fig, ax, f"bandwidth-{op}-{family}")
    return written


# ---------------------------------------------------------------- document --------------------


def scaling_notes(data):
    notes = set()
    for b in data["benchmarks"]:
        info = info_of(b)
        note = scale_note(info)
        if note:
            notes.add(f"`{info['op']}` {family_of(info)}: {note}"
                      + (f", context {info['context']}" if info.get("context") else ""))
        if str(info.get("op", "")).startswith("e2e") and info.get("threads"):
            notes.add(f"`e2e-*`: {info['threads']} CPU thread(s), {info.get('dtype')}")
    return sorted(notes)


def section(data, plot_dir, out_dir):
    has_gpu = run_has_gpu(data)
    tag = "gpu" if has_gpu else "cpu"
    limits = limits_of(data)
    smoke = any(info_of(b).get("smoke") for b in data["benchmarks"])
    parts = [f"## {'GPU' if has_gpu else 'CPU'} run — {machine_key(data)[0]}"
             + (" — SMOKE sizes: the numbers mean nothing" if smoke else ""), "",
             f"`{stamp(data)}`", "",
             "Sources: " + ", ".join(f"`{os.path.relpath(p, out_dir)}`" for p in data["_paths"]), ""]
    loads = [info_of(b)["load1"] for b in data["benchmarks"] if info_of(b).get("load1") is not None]
    if loads:
        cpus = data.get("machine_info", {}).get("cpu", {}).get("count", "?")
        parts += [f"1-minute load average as each benchmark started: {min(loads):.2f} to {max(loads):.2f} "
                  f"({cpus} CPUs; a load near the CPU count means other work shared the machine).", ""]
    if limits:
        parts += ["Machine limits (same run): " + ", ".join(f"{k} **{v / 1e9:.1f} GB/s**" for k, v in sorted(limits.items())), ""]
    notes = scaling_notes(data)
    if notes:
        parts += ["Scaled down on this machine:", ""] + [f"- {n}" for n in notes] + [""]
    goals = goal_lines(data)
    if goals:
        parts += ["### Goals: decode at dense speed, memory of loading", "", "| goal | measured | bound | |", "| --- | ---: | --- | --- |"]
        parts += [f"| {w} | {v:.3f} | {b} | {m} |" for w, v, b, m in goals] + [""]
    by_op = defaultdict(list)
    for b in data["benchmarks"]:
        if info_of(b).get("provider") != "limit":
            by_op[op_of(b)].append(b)
    for op in sorted(by_op):
        if op == DECODE_OP:
            parts += [f"### {op} (bench_decode.py: providers interleaved in each round, medians)", "",
                      decode_table(by_op[op]), ""]
            continue
        if op == MEMORY_OP:
            parts += [f"### {op} (bench_memory.py: extra peak RSS over the process before the call, each call "
                      "in a fresh process)", "", memory_table(by_op[op]), ""]
            continue
        parts += [f"### {op}", "", op_table(group_rows(by_op[op], has_gpu, limits)), ""]
        if not has_gpu and op in CPU_NOTES:
            parts += [CPU_NOTES[op], ""]
        if not has_gpu and op in GPU_PROVIDERS:
            parts += ["GPU (cuda) rows — **not measured** (no GPU run in these files): "
                      + ", ".join(GPU_PROVIDERS[op]), ""]
    if plot_dir:
        figs = plots(data, plot_dir, tag)
        if figs:
            parts += ["### Figures", ""]
            parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in figs] + [""]
    return "\n".join(parts), has_gpu


PREAMBLE = """\
Generated by `bench/report.py` from pytest-benchmark JSON — do not edit by hand; regenerate with
`python bench/report.py --run` (CPU) and add a GPU run's JSON from `bench/gpu_check.sh`.

How to read: **time vs ours** = provider median / the median of our fastest provider (names starting
with `mole`, in bold) on the same device in the same group: a time ratio, so 2.00x means the provider
takes twice our time (ours is faster) and 0.50x half of it (ours is slower). GB/s counts the
table (or expert) bytes a call must move (`bytes` in the JSON); *of limit* divides it by the
machine's own ceiling measured in the same run (host-copy counts the bytes a copy reads, and
a copy also writes as many, so a gather that mostly reads can pass 100%; so can Zipf ids, whose
popular rows stay in cache: every figure above 100% names its reason). Shapes named after the
paper's models (160M-4E, ...) keep their rows per token (L, E, D) but may be scaled down (fewer
layers, a smaller vocabulary): the list in each section and every figure's title say where.
End-to-end rows (`e2e-*`) are model steps: their
GB/s is the LUT bytes per step over the step time, shown for comparison only. Every number below
comes from the run named in its section; none is carried over from another machine."""


def render(paths, out, plot_dir, preamble=None):
    out_dir = os.path.dirname(os.path.abspath(out))
    runs = pool([load(p) for p in paths])
    runs.sort(key=run_has_gpu)  # CPU first
    doc = ["# Benchmark results", "", PREAMBLE, ""]
    if preamble:
        with open(preamble) as f:
            doc += [f.read().rstrip(), ""]
    texts = [section(r, plot_dir, out_dir) for r in runs]
    if not any(g for _, g in texts):
        doc += ["**GPU: not measured** — no GPU run in these files (run `bench/gpu_check.sh` on a GPU machine).", ""]
    doc += [t for t, _ in texts]
    # Sections that scripts run on their own write as markdown (dated inside; bench_hf_generate.py).
    results = os.path.join(HERE, "results")
    for name in sorted(os.listdir(results)) if os.path.isdir(results) else ():
        if name.endswith(".md"):
            with open(os.path.join(results, name)) as f:
                doc += [f.read().rstrip(), ""]
    with open(out, "w") as f:
        f.write("\n".join(doc).rstrip() + "\n")
    return runs


def summary(runs):
    """One line per group: ours (fastest mole*) vs the fastest baseline, on the run's main device."""
    lines = []
    for data in runs:
        has_gpu = run_has_gpu(data)
        dev = "cuda" if has_gpu else "cpu"
        lines.append(f"== {stamp(data)}")
        lines.append(f"{'op':18s} {'shape':24s} {'ours':24s} {'median':>9s} {'GB/s':>8s}   "
                     f"{'best baseline':24s} {'median':>9s} {'time/ours':>9s}")
        for lim, bps in sorted(limits_of(data).items()):
            lines.append(f"{'limits':18s} {lim:24s} {'':24s} {'':>9s} {bps / 1e9:8.1f}")
        for what, value, bound, met in goal_lines(data):
            lines.append(f"goal: {what}: {value:.3f} ({bound}) {met}")
        by_op = defaultdict(list)
        for b in data["benchmarks"]:
            if info_of(b).get("provider") != "limit" and op_of(b) not in (DECODE_OP, MEMORY_OP):
                by_op[op_of(b)].append(b)
        for op in sorted(by_op):
            rows = [r for r in group_rows(by_op[op], has_gpu, {}) if r["device"] == dev]
            groups = defaultdict(list)
            for r in rows:
                groups[r["group"]].append(r)
            for g in sorted(groups, key=sort_key_shape):
                ours = [r for r in groups[g] if r["ours"]]
                base = [r for r in groups[g] if not r["ours"]]
                o = min(ours, key=lambda r: r["median"]) if ours else None
                bb = min(base, key=lambda r: r["median"]) if base else None
                gbs = "%.1f" % o["gbs"] if o and o["gbs"] else "-"
                ratio = "%.2fx" % (bb["median"] / o["median"]) if o and bb else "-"
                lines.append(
                    f"{op[:18]:18s} {(o or bb)['shape'][:24]:24s} {(o['provider'] if o else '-')[:24]:24s} "
                    f"{fmt_time(o['median']) if o else '-':>9s} {gbs:>8s}   "
                    f"{(bb['provider'] if bb else '-')[:24]:24s} {fmt_time(bb['median']) if bb else '-':>9s} "
                    f"{ratio:>9s}")
    return "\n".join(lines)


def merge(paths, dest):
    datas = [load(p) for p in paths]
    merged = {k: v for k, v in datas[0].items() if k != "_path"}
    merged["benchmarks"] = [b for d in datas for b in d["benchmarks"]]
    with open(dest, "w") as f:
        json.dump(merged, f)
    return dest


def package_under_test():
    """(folder holding the mole_kernels package to benchmark, whether it is the clone's source tree).

    The package this Python imports from outside the clone: after `pip install .`, the installed
    one. Only when there is none, the source tree of this clone (built in place with
    `python setup.py build_ext --inplace`). The clone's root never comes first by accident: the
    suite runs with bench/ as its working folder, where `import mole_kernels` would otherwise find
    the uncompiled source folder and fail."""
    import importlib.machinery

    root = os.path.dirname(HERE)
    outside = [p for p in sys.path if p and os.path.abspath(p) not in (root, HERE)]
    spec = importlib.machinery.PathFinder.find_spec("mole_kernels", outside)
    if spec is not None and spec.submodule_search_locations:
        return os.path.dirname(list(spec.submodule_search_locations)[0]), False
    return root, True


def run_suite(smoke, extra):
    """Runs the whole suite with this Python and writes bench/results/cpu.json (or cpu-smoke.json)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    dest = os.path.join(RESULTS_DIR, "cpu-smoke.json" if smoke else "cpu.json")
    env = dict(os.environ)
    if smoke:
        env["MOLE_BENCH_SMOKE"] = "1"
    folder, source_tree = package_under_test()
    if source_tree:
        env["PYTHONPATH"] = os.pathsep.join([folder] + [p for p in [env.get("PYTHONPATH")] if p])
    # One import first, in the suite's own environment: a package that cannot load says why in one
    # message (not built, built against another torch), instead of an error per benchmark file.
    probe = subprocess.run([sys.executable, "-c", "import mole_kernels; print(mole_kernels.__file__)"],
                           env=env, cwd=HERE, capture_output=True, text=True)
    if probe.returncode:
        why = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        hint = ("install it (`pip install .` from the clone's root) or build it in place "
                "(`python setup.py build_ext --inplace`)" if source_tree else "reinstall it")
        sys.exit(f"cannot benchmark: mole_kernels from {folder} does not import: {why}\n{hint}")
    print(f"benchmarking {os.path.dirname(probe.stdout.strip())}"
          + (" (this clone's in-place build)" if source_tree else ""), flush=True)
    suites = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))  # not test_report.py: it runs this
    cmd = [sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider", f"--benchmark-json={dest}",
           "--benchmark-columns=median,rounds"] + extra
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env, cwd=HERE)
    if rc not in (0, 1) or not os.path.exists(dest):  # 1: some benchmark failed; render what ran
        sys.exit(f"the benchmark run failed (exit {rc}); nothing to render")
    return dest


def default_inputs(cpu=True):
    """bench/results/: every gpu*.json, and cpu.json (else cpu-smoke.json) when cpu."""
    if not os.path.isdir(RESULTS_DIR):
        return []
    names = sorted(os.listdir(RESULTS_DIR))
    out = [f for f in names if f.startswith("gpu") and f.endswith(".json")]
    if cpu:
        out = [f for f in ("cpu.json", "cpu-smoke.json") if f in names][:1] + out
    return [os.path.join(RESULTS_DIR, f) for f in out]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="pytest-benchmark JSON files (default: bench/results/*.json)")
    ap.add_argument("--run", action="store_true", help="run the suite first (this machine) into bench/results/")
    ap.add_argument("--smoke", action="store_true", help="with --run: smoke sizes (MOLE_BENCH_SMOKE=1)")
    ap.add_argument("--pytest-args", default="", help="with --run: extra pytest arguments (one string)")
    ap.add_argument("--out", default=None,
                    help="markdown file to write (default: bench/RESULTS.md; with --run --smoke "
                         "bench/results/RESULTS-smoke.md, so smoke numbers never replace the measured ones)")
    ap.add_argument("--plots", default=None,
                    help="folder for PNG figures, '' for none (default: bench/plots; with --run --smoke "
                         "bench/results/plots-smoke)")
    ap.add_argument("--preamble", default=None, help="markdown file placed above the generated sections")
    ap.add_argument("--summary", action="store_true", help="print one line per group (ours vs best baseline)")
    ap.add_argument("--merge-to", default=None, help="write the inputs as one JSON file and stop")
    args = ap.parse_args(argv)
    smoke_run = args.run and args.smoke
    if args.out is None:
        args.out = os.path.join(RESULTS_DIR, "RESULTS-smoke.md") if smoke_run else os.path.join(HERE, "RESULTS.md")
    if args.plots is None:
        args.plots = os.path.join(RESULTS_DIR, "plots-smoke") if smoke_run else os.path.join(HERE, "plots")
    paths = list(args.json)
    if args.run:
        fresh = run_suite(args.smoke, args.pytest_args.split())
        paths = paths or [fresh] + default_inputs(cpu=False)
    paths = paths or default_inputs()
    if not paths:
        ap.error("no JSON given and none in bench/results/ (use --run)")
    if args.merge_to:
        print(f"wrote {merge(paths, args.merge_to)}")
        return
    runs = render(paths, args.out, args.plots or None, args.preamble)
    print(f"wrote {args.out}" + (f" and figures under {args.plots}" if args.plots else ""))
    if args.summary:
        print(summary(runs))


if __name__ == "__main__":
    main()
