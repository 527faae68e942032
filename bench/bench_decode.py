"""MoLE decode against dense decode, interleaved in one process: the "decode at dense speed" goal.

One benchmark per (shape, batch, eager or compiled): each round runs every provider in turn for
as many decode steps as `generate` runs for the demo's 32 tokens (device-synchronised), so machine
noise hits all of them alike and each provider's code is as warm as in a real generation; each
round starts one provider later than the last, so none always runs right after the same other one.
The medians over the rounds and their ratios to the dense baseline go to
`extra_info["ms_per_token"]` / `["vs_dense"]` (bench/report.py prints them). The benchmark's own
time is one whole round. Rounds: 15, and 61 at the demo shape, whose rounds take ~0.15 s and whose
few-percent goal sits near this machine's round-to-round spread (a median of 15 moved by ±3 %).

Providers:
- CPU: `dense`, `mole-host` (LUT in RAM, read in place by the fused C++ op), `mole-disk` (LUT in a
  file the page cache holds: the step's rows are read with pread); at the demo shape also the same
  three through torch.compile (`*-compiled`: `generate(compile_step=True)`'s step), in a benchmark
  of their own (compiled code in the same rounds would evict the eager providers' caches).
- GPU: `dense`, `mole-device` (LUT in VRAM), `mole-host` (pinned host memory: rows prefetched over
  PCIe at the start of the step), eager and captured in a CUDA graph (`*-graph`); the goal there
  is host / device <= 1.01 at batch 1 and <= 1.03 at batch 32 (410M-4E), both in graphs.

Batches: B = 1 everywhere, and B = 8 and 32 at the demo shape (eager and compiled) on a CPU.

The paper's real vocabulary (`test_real_vocab_decode`, CPU): 160M-4E with V = 50,304 (a 3.7 GB bf16
LUT, built once with `LookupTable.build` into files under $MOLE_BENCH_TABLE_DIR, default /tmp, reused
by later runs with MOLE_BENCH_KEEP_TABLES=1, else deleted at the end), B = 1, 8 and 32, in phases
of rounds interleaved step by step (`_interleaved` says why): (1) dense, `mole-host`, `mole-disk` (page
cache warm) and `mole-disk-cold` (the file's pages dropped with posix_fadvise(DONTNEED) and the reader's
row cache emptied (`LookupTable.drop_cached_rows`) before each round's run of its steps; the bytes the
process read from storage, /proc/self/io read_bytes, go to `extra_info["cold_bytes_read_per_run"]`); (2) per quantized
format (int8, fp8_e4m3, nf4 with blocks of 64; MOLE_BENCH_REAL_FORMATS="q3/128,q2/64,q1/64" picks others),
`mole-host` against `mole-host-<format>`, one format's table in RAM at a time (peak ~5.6 GB: the bf16 table
and an int8 one); (3) compiled
(`generate(compile_step=True)`'s step), dense against MoLE host, at B = 1 (MOLE_BENCH_REAL_COMPILED=0
skips it). Each phase's ratios are against its own baseline of the same rounds; steps per round:
MOLE_BENCH_REAL_STEPS (8: a round of 160M-4E steps is long enough), rounds: MOLE_BENCH_REAL_ROUNDS
(5). Wall-clock and thread-CPU medians both go to extra_info (`ms_per_token`/`vs_dense` and
`cpu_ms_per_token`/`cpu_vs_dense`). MOLE_BENCH_DEMO_ROUNDS overrides the demo shape's 61 rounds.

Verdicts: every ratio also goes to `extra_info["paired"]` as [median, lo, hi] of the per-round ratios
(two providers of one round share its load) with a 90 % bootstrap interval; and the CPU eager phases run
`dense-again`, the dense model once more (an A/A control): its ratio to dense is the harness's own floor.
A bound is shown met when a ratio's interval lies under it, missed when above, else unresolved.

Shapes: `demo` (the `mole-kernels demo` model: V=2048, L=4, E=4, D=128, FFN=512, fp32 LUT) and the
paper's 160M-4E / 410M-4E with every layer (L = 12 / 24). On a CPU the vocabulary is scaled to
4,096 (the table rows and the per-layer work are the paper's; a smaller lm_head makes the MoLE
share of a step larger, so the ratio is if anything pessimistic), weights float32, LUT bf16, one
thread (a decode step is a chain of small ops; a shared machine's thread pool adds noise). On a GPU
the full vocabulary (50,304) and bf16 everywhere. Context: 64 earlier tokens (CPU), 512 (GPU).
"""
import contextlib
import os
import statistics
import time

import pytest
import torch

from conftest import GPU_QUICK, HAS_CUDA, SMOKE, num_threads, paired_ratio, sync, zipf_ids
from mole_kernels import DenseForCausalLM, LookupTable, MoLEConfig, MoLEForCausalLM
from mole_kernels.model.layers import StaticKVCache

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
# name -> (V on CPU, L, D, FFN, heads, kv heads, E, LUT dtype)
SHAPES = {
    "demo": (2048, 4, 128, 512, 4, 2, 4, torch.float32),
    "160M-4E": (4096, 12, 768, 3072, 12, 12, 4, torch.bfloat16),
    "410M-4E": (4096, 24, 1024, 4096, 16, 16, 4, torch.bfloat16),
}
if SMOKE:
    CASES, ROUNDS, STEPS, CONTEXT = [("demo", 1, "eager")], 1, 2, 8
elif HAS_CUDA:  # the goal's shape first; a short GPU loan (GPU_QUICK) measures only it
    CASES = [("410M-4E", 1, "eager"), ("410M-4E", 32, "eager")] + (
        [] if GPU_QUICK else [("160M-4E", 1, "eager"), ("160M-4E", 32, "eager"), ("demo", 1, "eager")])
    ROUNDS, STEPS, CONTEXT = (9 if GPU_QUICK else 15), 16, 512
else:  # STEPS: the decode steps of the demo's 32-token generation
    CASES = [("demo", B, mode) for B in (1, 8, 32) for mode in ("eager", "compiled")] + [
        ("160M-4E", 1, "eager"), ("410M-4E", 1, "eager")]
    ROUNDS, STEPS, CONTEXT = 15, 31, 64
DEMO_ROUNDS = ROUNDS if SMOKE or HAS_CUDA else int(os.environ.get("MOLE_BENCH_DEMO_ROUNDS", "61"))
REAL_BATCHES = [] if HAS_CUDA else [1] if SMOKE else [1, 8, 32]
REAL_STEPS, REAL_ROUNDS = (2, 1) if SMOKE else (int(os.environ.get("MOLE_BENCH_REAL_STEPS", "8")),
                                                int(os.environ.get("MOLE_BENCH_REAL_ROUNDS", "5")))
# MOLE_BENCH_REAL_FORMATS: the quantized formats of phase (2), "format[/block]" comma-separated (e.g.
# "q3/128,q2/64,q1/64" for the low-bit formats of issue 26; "" for none: phase (2) is skipped).
REAL_FORMATS = [(f, int(b) if b else None) for f, _, b in (
    spec.strip().partition("/") for spec in os.environ.get("MOLE_BENCH_REAL_FORMATS", "int8,fp8_e4m3,nf4/64").split(",")
    if spec.strip())]
REAL_COMPILED = os.environ.get("MOLE_BENCH_REAL_COMPILED", "1") == "1"  # 0: skip phase (3) (two big compiles)
CPU_THREADS = int(os.environ.get("MOLE_BENCH_E2E_THREADS", "1"))


def _providers(mode):
    if HAS_CUDA:
        return ["dense", "mole-device", "mole-host", "dense-graph", "mole-device-graph", "mole-host-graph"]
    base = ["dense", "mole-host", "mole-disk"]
    # dense-again: the dense model once more, its own cache and stepper (an A/A control): its ratio to
    # dense is what the harness measures between two identical providers, the floor under any verdict.
    return [p + "-compiled" for p in base] if mode == "compiled" else base + ["dense-again"]


_BUILT = {}  # shape -> (cfg, models): the latest shape's, kept for its next case (cases come grouped by shape)


def _close_built():
    for _, models in _BUILT.values():
        for m in models.values():
            if getattr(m, "lut", None) is not None:
                m.lut.close()
    _BUILT.clear()


@pytest.fixture(scope="module")
def built():
    """``built(shape)`` -> (cfg, models): consecutive cases of one shape (B = 1 and 32) share its models,
    so a 9.9 GB table is built once; a new shape closes the previous one's tables first."""
    def get(shape):
        if shape not in _BUILT:
            _close_built()
            _BUILT[shape] = _models(shape)
        return _BUILT[shape]
    yield get
    _close_built()


def _gpu_rows(dtype):
    """``fill(a, b, dst)`` for LookupTable.build: rows drawn on the GPU, seeded by their first token (the
    same values on every tier), copied into the tier's memory chunk by chunk. A 9.9 GB table fills in
    about a second this way; a CPU ``uniform_`` takes minutes."""
    def fill(a, b, dst):
        g = torch.Generator(device=DEV).manual_seed(a)
        dst.copy_(torch.empty(dst.shape, dtype=dtype, device=DEV).uniform_(-0.02, 0.02, generator=g))
    return fill


def _models(shape):
    V, L, D, F, H, Hkv, E, lut_dtype = SHAPES[shape]
    V = 50304 if HAS_CUDA and shape != "demo" else V
    cfg = MoLEConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                     num_key_value_heads=Hkv, num_experts=E, max_position_embeddings=CONTEXT + STEPS + 1)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    with torch.device(DEV):
        mole = MoLEForCausalLM(cfg, reparameterized=True).to(dtype).eval()
    dense = DenseForCausalLM.from_mole(mole).eval()
    lut = None if HAS_CUDA else torch.empty(cfg.lut_shape, dtype=lut_dtype).uniform_(-0.02, 0.02)
    tiers = ["device", "host"] if HAS_CUDA else ["host", "disk"]
    models = {"dense": dense}
    for tier in tiers:
        m = MoLEForCausalLM(cfg, reparameterized=True)
        m.load_state_dict(mole.state_dict(), strict=True, assign=True)  # shares the weights
        m.set_lut(LookupTable.build(tuple(cfg.lut_shape), lut_dtype, _gpu_rows(lut_dtype), tier, DEV) if HAS_CUDA
                  else LookupTable.from_tensor(lut, tier, DEV))
        models["mole-" + tier] = m.eval()
    return cfg, models


PAIRED_NOTE = ("paired: [median, lo, hi] of the per-round ratios (wall clock), lo..hi a 90 % bootstrap interval "
               "of that median")


def _paired(num, den):
    """paired_ratio(num, den) as extra_info stores it: [median, lo, hi], rounded."""
    return [round(x, 4) for x in paired_ratio(num, den)]


class _Stepper:
    """`steps` decode steps of `provider` (what generate's loop runs per token): calling it runs them all in a
    row, `step(i)` the i-th alone (at its own position; device-synchronised either way)."""

    def __init__(self, cfg, model, provider, B, ids, steps=STEPS):
        self.ids, self.steps, self.B = ids, steps, B
        cache = StaticKVCache(cfg, B, CONTEXT + steps + 1, device=DEV, dtype=model.dtype)
        cache.valid[:, :CONTEXT] = True
        if provider.endswith("-graph"):
            step = model._graph_step(cache, B)
            self._call = lambda tok, idx, pos: step(tok, idx, pos)  # noqa: E731
        elif provider.endswith("-compiled"):
            compiled = model._compiled_decode_step()
            self._call = lambda tok, idx, pos: compiled(cache, tok, idx, pos)  # noqa: E731
        else:
            self._call = lambda tok, idx, pos: model._decode_step(cache, tok, idx, pos)  # noqa: E731

    @torch.no_grad()
    def __call__(self):
        idx = torch.tensor([CONTEXT], device=DEV)
        pos = torch.full((self.B,), CONTEXT, device=DEV)
        for i in range(self.steps):
            self._call(self.ids[i], idx, pos)
            idx += 1
            pos += 1
        sync(DEV)

    @torch.no_grad()
    def step(self, i):
        self._call(self.ids[i], torch.tensor([CONTEXT + i], device=DEV), torch.full((self.B,), CONTEXT + i, device=DEV))
        sync(DEV)


@pytest.fixture(scope="module")
def threads():
    with num_threads(None if HAS_CUDA else CPU_THREADS) as n:
        yield n


@pytest.mark.parametrize("shape,B,mode", CASES, ids=[f"{s}-B{b}-{m}" for s, b, m in CASES])
def test_decode_vs_dense(benchmark, threads, built, shape, B, mode):
    cfg, models = built(shape)
    ids = zipf_ids(cfg.vocab_size, B, batches=STEPS, seed=B).to(DEV)
    runs = {}
    for p in _providers(mode):
        base = p.removesuffix("-graph").removesuffix("-compiled").removesuffix("-again")
        runs[p] = _Stepper(cfg, models[base], p, B, ids)
        runs[p]()  # warm-up: lazy buffers, graph capture, compilation
    times = {p: [] for p in runs}
    order = list(runs)
    rounds = DEMO_ROUNDS if shape == "demo" else ROUNDS

    def one_round():
        for p in order:  # interleaved: every provider once per round
            t0 = time.perf_counter()
            runs[p]()
            times[p].append((time.perf_counter() - t0) / STEPS * 1e3)
        order.append(order.pop(0))  # the next round starts with the next provider

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0 if SMOKE else 1)
    ms = {p: statistics.median(v) for p, v in times.items()}
    suffix = "-compiled" if mode == "compiled" else ""
    pairs = {p: (p, "dense-graph" if p.endswith("-graph") else "dense" + suffix) for p in ms}
    if HAS_CUDA:
        for graph in ("", "-graph"):
            pairs["host/device" + graph] = ("mole-host" + graph, "mole-device" + graph)
    else:
        pairs["disk/host" + suffix] = ("mole-disk" + suffix, "mole-host" + suffix)
    ratios = {k: ms[a] / ms[b] for k, (a, b) in pairs.items()}
    paired = {k: _paired(times[a], times[b]) for k, (a, b) in pairs.items() if a != b}
    V, L, D, F, H, Hkv, E, lut_dtype = SHAPES[shape]
    benchmark.group = "decode-vs-dense"
    benchmark.extra_info.update(
        provider="interleaved", op="decode-vs-dense", shape=f"{shape}-B{B}" + ("-compiled" if mode == "compiled" else ""),
        B=B, layers=cfg.num_hidden_layers,
        vocab=cfg.vocab_size, context=CONTEXT, steps=STEPS, rounds=rounds, threads=threads,
        lut_dtype=str(lut_dtype)[6:], model_dtype=str(models["dense"].dtype)[6:],
        scaled_from=None if shape == "demo" or cfg.vocab_size == 50304 else f"L={L},V=50304",
        ms_per_token={p: round(v, 4) for p, v in ms.items()}, vs_dense={p: round(v, 4) for p, v in ratios.items()},
        paired=paired, paired_note=PAIRED_NOTE,
    )


# ---------------------------------------------------------------- the real vocabulary (CPU) -------
# 160M-4E with the paper's vocabulary (smoke: a tiny model of the same form).
REAL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, num_experts=4) if SMOKE else dict(
    vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=12, num_experts=4)
TABLE_DIR = os.environ.get("MOLE_BENCH_TABLE_DIR", "/tmp")


def _fill(a, b, out):
    """Tokens [a, b)'s rows, the same whatever the chunking (a generator seeded per token)."""
    for t in range(a, b):
        out[t - a].uniform_(-0.02, 0.02, generator=torch.Generator().manual_seed(t))


@pytest.fixture(scope="module")
def real_tables():
    """{format or "bf16": path} of the real-vocabulary table files, built once (reused when present)."""
    cfg = MoLEConfig(**REAL, max_position_embeddings=CONTEXT + REAL_STEPS + 1)
    tag = "x".join(map(str, cfg.lut_shape))
    paths = {}
    for fmt, block in [("bf16", None)] + REAL_FORMATS:
        path = os.path.join(TABLE_DIR, f"mole_bench_lut_{tag}_{fmt}{block or ''}.safetensors")
        if not os.path.exists(path):
            LookupTable.build(cfg.lut_shape, torch.bfloat16, _fill, "disk", path=path + ".part",
                              format=None if fmt == "bf16" else fmt, block_size=block,
                              desc=f"building the {fmt} LUT").close()
            os.replace(path + ".part", path)
        paths[fmt] = path
    yield cfg, paths
    if os.environ.get("MOLE_BENCH_KEEP_TABLES") != "1":
        for path in paths.values():
            os.unlink(path)


def _drop_pages(path):
    """Evicts the file's pages from the page cache (clean pages: the next read goes to storage)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _storage_bytes_read():
    """Bytes this process has caused to be read from storage (/proc/self/io read_bytes)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def _interleaved(runs, rounds, before=None):
    """Each provider's median ms/token over `rounds` rounds, as (wall clock, this thread's CPU time, the
    wall-clock times of every round for :func:`paired_ratio`). A round runs every provider's REAL_STEPS
    steps interleaved: step i of every provider one after another, then step i + 1 in the reverse order
    (each round starts one provider later than the last), so the providers' step i run within a few steps'
    time. Why not each provider's steps in a row: this machine's load changes over seconds, about a round of
    such runs, and the per-round ratios carried it (at 160M-4E, B = 8, two blocks of rounds paired that way
    gave A/A intervals 1.3 % and 8.3 % wide, two paired per step 1.2 % and 1.6 %:
    bench/results/issue24_26_zen4_s15.md). A 160M-4E step streams its 0.6 GB of weights from memory, so
    a provider's own previous step leaves it nothing warm that another's would evict. `before[p]()` runs
    untimed just before p's first step of each round. CPU time leaves out the time slices other processes
    take on a loaded machine (the steps run on this one thread: one torch thread), but also a cold read's
    wait."""
    wall, cpu = {p: [] for p in runs}, {p: [] for p in runs}
    order = list(runs)
    for _ in range(rounds):
        w, c = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
        for i in range(REAL_STEPS):
            for p in order if i % 2 == 0 else order[::-1]:
                if i == 0 and before and p in before:
                    before[p]()
                t0, c0 = time.perf_counter(), time.thread_time()
                runs[p].step(i)
                c[p] += time.thread_time() - c0
                w[p] += time.perf_counter() - t0
        for p in runs:
            cpu[p].append(c[p] / REAL_STEPS * 1e3)
            wall[p].append(w[p] / REAL_STEPS * 1e3)
        order.append(order.pop(0))
    return ({p: statistics.median(v) for p, v in wall.items()}, {p: statistics.median(v) for p, v in cpu.items()},
            wall)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU tiers' benchmark (a GPU run measures test_decode_vs_dense)")
@pytest.mark.parametrize("B", REAL_BATCHES, ids=[f"B{b}" for b in REAL_BATCHES])
def test_real_vocab_decode(benchmark, threads, real_tables, B):
    cfg, paths = real_tables
    torch.manual_seed(0)
    mole = MoLEForCausalLM(cfg, reparameterized=True).eval()
    dense = DenseForCausalLM.from_mole(mole).eval()
    ids = zipf_ids(cfg.vocab_size, B, batches=REAL_STEPS, seed=B)

    def mole_on(table):
        m = MoLEForCausalLM(cfg, reparameterized=True)
        m.load_state_dict(mole.state_dict(), strict=True, assign=True)  # shares the weights
        m.set_lut(table)
        return m.eval()

    def stepper(model, provider="eager"):
        run = _Stepper(cfg, model, provider, B, ids, REAL_STEPS)
        run()  # warm-up: lazy buffers, compilation, the warm providers' pages
        return run

    ms, ratios, cpu_ms, cpu_ratios, paired, info = {}, {}, {}, {}, {}, {}
    with contextlib.ExitStack() as tables:
        host = tables.enter_context(LookupTable.open(paths["bf16"], "host"))
        disk = tables.enter_context(LookupTable.open(paths["bf16"], "disk"))
        cold = tables.enter_context(LookupTable.open(paths["bf16"], "disk"))
        host_model = mole_on(host)
        runs = {"dense": stepper(dense), "mole-host": stepper(host_model), "mole-disk": stepper(mole_on(disk)),
                "mole-disk-cold": stepper(mole_on(cold)), "dense-again": stepper(dense)}  # the last: A/A control
        read = []

        def drop():
            _drop_pages(paths["bf16"])
            cold.drop_cached_rows()
            read.append(_storage_bytes_read())

        got, cpu, each = benchmark.pedantic(lambda: _interleaved(runs, REAL_ROUNDS, before={"mole-disk-cold": drop}),
                                            rounds=1, iterations=1)
        for k, (a, b) in {"mole-host": ("mole-host", "dense"), "dense-again": ("dense-again", "dense"),
                          "disk/host": ("mole-disk", "mole-host"),
                          "disk-cold/host": ("mole-disk-cold", "mole-host")}.items():
            paired[k] = _paired(each[a], each[b])
        ms.update(got)
        cpu_ms.update(cpu)
        ratios.update({p: got[p] / got["dense"] for p in got})
        cpu_ratios.update({p: cpu[p] / cpu["dense"] for p in cpu})
        for r, m in ((ratios, got), (cpu_ratios, cpu)):
            r["disk/host"] = m["mole-disk"] / m["mole-host"]
            r["disk-cold/host"] = m["mole-disk-cold"] / m["mole-host"]
        # read_bytes after each drop, so consecutive differences span one round, the cold run's steps and the
        # others' between them; the warm providers read nothing from storage (their pages and rows are cached).
        read.append(_storage_bytes_read())
        info["cold_bytes_read_per_run"] = round(statistics.median(b - a for a, b in zip(read, read[1:])))
        info["cold_row_bytes_per_run"] = sum(len(set(r.tolist())) for r in ids) * host.row_bytes

        for fmt, _ in REAL_FORMATS:  # one quantized table in RAM at a time, against the bf16 one
            with LookupTable.open(paths[fmt], "host") as q:
                runs = {"mole-host": stepper(host_model), f"mole-host-{fmt}": stepper(mole_on(q))}
                got, cpu, each = _interleaved(runs, REAL_ROUNDS)
                p = f"mole-host-{fmt}"
                paired[f"{fmt}/bf16"] = _paired(each[p], each["mole-host"])
                ms[p], cpu_ms[p] = got[p], cpu[p]
                for r, m in ((ratios, got), (cpu_ratios, cpu)):
                    r[f"{fmt}/bf16"] = m[p] / m["mole-host"]
                    r[p] = r[f"{fmt}/bf16"] * r["mole-host"]

        if B == 1 and REAL_COMPILED:  # compiled: dense against MoLE host
            runs = {"dense-compiled": stepper(dense, "dense-compiled"),
                    "mole-host-compiled": stepper(host_model, "mole-host-compiled")}
            got, cpu, each = _interleaved(runs, REAL_ROUNDS)
            ms.update(got)
            cpu_ms.update(cpu)
            paired["compiled mole/dense"] = _paired(each["mole-host-compiled"], each["dense-compiled"])
            for r, m in ((ratios, got), (cpu_ratios, cpu)):
                r["dense-compiled"] = 1.0
                r["mole-host-compiled"] = r["compiled mole/dense"] = m["mole-host-compiled"] / m["dense-compiled"]
    benchmark.group = "decode-vs-dense"
    benchmark.extra_info.update(
        provider="interleaved", op="decode-vs-dense", shape=f"160M-4E-V{cfg.vocab_size}-B{B}", B=B,
        layers=cfg.num_hidden_layers, vocab=cfg.vocab_size, context=CONTEXT, steps=REAL_STEPS, rounds=REAL_ROUNDS,
        threads=threads, lut_dtype="bfloat16", model_dtype="float32", formats=[f for f, _ in REAL_FORMATS],
        ms_per_token={p: round(v, 4) for p, v in ms.items()}, vs_dense={p: round(v, 4) for p, v in ratios.items()},
        cpu_ms_per_token={p: round(v, 4) for p, v in cpu_ms.items()},
        cpu_vs_dense={p: round(v, 4) for p, v in cpu_ratios.items()},
        note="quantized rows: ratio to the bf16 host run of their own rounds, times that run's host/dense",
        paired=paired, paired_note=PAIRED_NOTE, **info)
