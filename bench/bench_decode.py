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

Shapes: `demo` (the `mole-kernels demo` model: V=2048, L=4, E=4, D=128, FFN=512, fp32 LUT) and the
paper's 160M-4E / 410M-4E with every layer (L = 12 / 24). On a CPU the vocabulary is scaled to
4,096 (the table rows and the per-layer work are the paper's; a smaller lm_head makes the MoLE
share of a step larger, so the ratio is if anything pessimistic), weights float32, LUT bf16, one
thread (a decode step is a chain of small ops; a shared machine's thread pool adds noise). On a GPU
the full vocabulary (50,304) and bf16 everywhere. Context: 64 earlier tokens (CPU), 512 (GPU).
"""
import os
import statistics
import time

import pytest
import torch

from conftest import GPU_QUICK, HAS_CUDA, SMOKE, sync, zipf_ids
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
    CASES = [("demo", 1, "eager"), ("demo", 1, "compiled"), ("160M-4E", 1, "eager"), ("410M-4E", 1, "eager")]
    ROUNDS, STEPS, CONTEXT = 15, 31, 64
DEMO_ROUNDS = ROUNDS if SMOKE or HAS_CUDA else 61
CPU_THREADS = int(os.environ.get("MOLE_BENCH_E2E_THREADS", "1"))


def _providers(mode):
    if HAS_CUDA:
        return ["dense", "mole-device", "mole-host", "dense-graph", "mole-device-graph", "mole-host-graph"]
    base = ["dense", "mole-host", "mole-disk"]
    return [p + "-compiled" for p in base] if mode == "compiled" else base


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


def _stepper(cfg, model, provider, B, ids):
    """A callable running STEPS decode steps of `provider` (what generate's loop runs per token)."""
    cache = StaticKVCache(cfg, B, CONTEXT + STEPS + 1, device=DEV, dtype=model.dtype)
    cache.valid[:, :CONTEXT] = True
    if provider.endswith("-graph"):
        step = model._graph_step(cache, B)
        call = lambda tok, idx, pos: step(tok, idx, pos)  # noqa: E731
    elif provider.endswith("-compiled"):
        compiled = model._compiled_decode_step()
        call = lambda tok, idx, pos: compiled(cache, tok, idx, pos)  # noqa: E731
    else:
        call = lambda tok, idx, pos: model._decode_step(cache, tok, idx, pos)  # noqa: E731

    @torch.no_grad()
    def run_steps():
        idx = torch.tensor([CONTEXT], device=DEV)
        pos = torch.full((B,), CONTEXT, device=DEV)
        for i in range(STEPS):
            call(ids[i], idx, pos)
            idx += 1
            pos += 1
        sync(DEV)

    return run_steps


@pytest.fixture(scope="module")
def threads():
    old = torch.get_num_threads()
    if not HAS_CUDA:
        torch.set_num_threads(CPU_THREADS)
    yield torch.get_num_threads()
    torch.set_num_threads(old)


@pytest.mark.parametrize("shape,B,mode", CASES, ids=[f"{s}-B{b}-{m}" for s, b, m in CASES])
def test_decode_vs_dense(benchmark, threads, built, shape, B, mode):
    cfg, models = built(shape)
    ids = zipf_ids(cfg.vocab_size, B, batches=STEPS, seed=B).to(DEV)
    runs = {}
    for p in _providers(mode):
        base = p.removesuffix("-graph").removesuffix("-compiled")
        runs[p] = _stepper(cfg, models[base], p, B, ids)
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
    ratios = {p: ms[p] / ms["dense-graph" if p.endswith("-graph") else "dense" + suffix] for p in ms}
    if HAS_CUDA:
        for graph in ("", "-graph"):
            ratios["host/device" + graph] = ms["mole-host" + graph] / ms["mole-device" + graph]
    else:
        ratios["disk/host" + suffix] = ms["mole-disk" + suffix] / ms["mole-host" + suffix]
    V, L, D, F, H, Hkv, E, lut_dtype = SHAPES[shape]
    benchmark.group = "decode-vs-dense"
    benchmark.extra_info.update(
        provider="interleaved", op="decode-vs-dense", shape=f"{shape}-B{B}" + ("-compiled" if mode == "compiled" else ""),
        B=B, layers=cfg.num_hidden_layers,
        vocab=cfg.vocab_size, context=CONTEXT, steps=STEPS, rounds=rounds, threads=threads,
        lut_dtype=str(lut_dtype)[6:], model_dtype=str(models["dense"].dtype)[6:],
        scaled_from=None if shape == "demo" or cfg.vocab_size == 50304 else f"L={L},V=50304",
        ms_per_token={p: round(v, 4) for p, v in ms.items()}, vs_dense={p: round(v, 4) for p, v in ratios.items()},
    )
