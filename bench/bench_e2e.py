"""End-to-end step latency of the reference model (mole_kernels/model/) at the paper's shapes.

What one call is:
- `e2e-decode`: one decode step (embed -> L layers -> final norm -> lm_head) for a batch of B new
  tokens against a KV cache holding CONTEXT earlier tokens (the paper: batch 1/8/32 after
  512-token inputs). shape = `<model>-T<B>`.
- `e2e-prefill`: the prompt pass of `generate` (B prompts of PREFILL tokens into the cache, the
  last position's logits). shape = `<model>-S<S>-T<B*S>`.

Providers (ours start with "mole"; the rest are the baselines, measured in the same run):
- `dense`: the same attention and shared MLP, no experts (MoLE's activated parameters exactly);
- `mole-device` (GPU only) / `mole-host` / `mole-disk`: the re-parameterized MoLE model with its
  LUT on that tier (the model's own prefetcher and path choice: host -> zero-copy when ids are on
  the GPU; disk -> staged copies). On a CPU-only machine host and disk both run on the CPU;
- `moe-offload`: MoE with `moe_num_experts`=10 experts, top-2, expert hidden FFN/2 (the paper's
  baseline), experts in host memory and the chosen ones copied in per layer (on a CPU-only
  machine that copy is host to host);
- on a GPU also `dense-graph`, `mole-device-graph`, `mole-host-graph`: the decode step captured in
  a CUDA graph (`generate(cuda_graph=True)`'s step), which removes launch overhead so the LUT
  fetch is what is left to see. The disk tier and MoE offload decide on the host, so no graph.

Sizes: on a GPU the paper's shapes with the full vocabulary (50,304; MOLE_BENCH_E2E_VOCAB
overrides), context 512, prefill 512 tokens at batch 1/8/32 (MOLE_BENCH_GPU_QUICK=1: 1/8), model
and LUT in bf16. On a CPU-only machine (shared, 2 cores here) the true D/E/FFN/heads but **L capped
at 4 layers, vocabulary 4,096, context and prefill 128 tokens at batch 1, model weights in
float32** (CPU bf16 GEMMs are slow and not the story), LUT in bf16, **one CPU thread**
(MOLE_BENCH_E2E_THREADS overrides): a decode step is a chain of small ops, and on a shared machine
a thread pool that waits for a busy core made the same step 3-20x slower from one round to the
next. Every row records `layers`, `vocab`, `context`, `threads`, `scaled_from` in extra_info.
Smoke: one layer, tiny vocab.

Timing: `conftest.run` (device synchronised inside the timed call, warm-up rounds first,
median reported); token ids are Zipf-distributed and rotated over several batches.
`bytes` = LUT bytes a MoLE step needs (tokens * L*E*D * 2), so GB/s is comparable across tiers;
for moe-offload the expert bytes it copied per call (measured by its counters); 0 for dense.

This uses the model's private step functions (`_decode_step`, `_graph_step`, `_hidden`,
`_attention_mask`: what `generate` runs) in `_decode` / `_prefill` below, the only two places
that touch them; a public prefill/decode-step API on the model would replace them.
"""
import os

import pytest
import torch

from conftest import GPU_QUICK, HAS_CUDA, SMOKE, Rotation, num_threads, pick, run, zipf_ids
from mole_kernels.model import DenseForCausalLM, MoEForCausalLM, MoLEConfig, MoLEForCausalLM, StaticKVCache
from mole_kernels.model.layers import _attention_mask
from mole_kernels.table import LookupTable

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
# name -> (L, D, FFN, heads, E): DESIGN section 7.
PAPER = {"160M-4E": (12, 768, 3072, 12, 4), "160M-16E": (12, 768, 3072, 12, 16), "410M-4E": (24, 1024, 4096, 16, 4)}
FULL_VOCAB = 50304

if SMOKE:
    SHAPES, MAX_LAYERS, VOCAB, CONTEXT, PREFILL = ["160M-4E"], 1, 256, 16, 16
    DECODE_B, PREFILL_B, ROUNDS = [1], [1], (1, 1)
elif HAS_CUDA:
    SHAPES, MAX_LAYERS, CONTEXT, PREFILL = list(PAPER), None, 512, 512
    VOCAB = int(os.environ.get("MOLE_BENCH_E2E_VOCAB", FULL_VOCAB))
    DECODE_B, PREFILL_B = [1, 8, 32], [1, 8] if GPU_QUICK else [1, 8, 32]
    ROUNDS = (10, 5) if GPU_QUICK else (30, 10)  # (decode, prefill)
else:
    SHAPES, MAX_LAYERS, VOCAB, CONTEXT, PREFILL = list(PAPER), 4, 4096, 128, 128
    DECODE_B, PREFILL_B, ROUNDS = [1, 8, 32], [1], (5, 3)

MODEL_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
LUT_DTYPE = torch.bfloat16
TIERS = (["device"] if HAS_CUDA else []) + ["host", "disk"]
CPU_THREADS = int(os.environ.get("MOLE_BENCH_E2E_THREADS", "1"))  # CPU-only machines; see the docstring
PROVIDERS = ["dense"] + [f"mole-{t}" for t in TIERS] + ["moe-offload"]
if HAS_CUDA and not SMOKE:
    PROVIDERS += ["dense-graph", "mole-device-graph", "mole-host-graph"]
ID_SETS = pick(4, 1)


def _random_lut(shape):
    """A CPU table of random rows (the values do not change the cost; size and layout do).

    On a GPU machine the rows are drawn there in chunks: a 15 GB bf16 uniform_ on the host takes
    longer than the benchmark it feeds."""
    lut = torch.empty(shape, dtype=LUT_DTYPE)
    if not HAS_CUDA:
        return lut.uniform_(-0.02, 0.02)
    step = max(1, (256 << 20) // (lut[0].numel() * lut.element_size()))
    for a in range(0, shape[0], step):
        part = lut[a:a + step]
        part.copy_(torch.empty(part.shape, dtype=LUT_DTYPE, device=DEV).uniform_(-0.02, 0.02))
    return lut


class Models:
    """One paper shape: the MoLE inference form, dense and MoE baselines, the LUT on each tier (made on first use)."""

    def __init__(self, name):
        L, D, F, H, E = PAPER[name]
        self.name, self.paper_layers = name, L
        L = min(L, MAX_LAYERS) if MAX_LAYERS else L
        self.cfg = MoLEConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                              num_attention_heads=H, num_experts=E, max_position_embeddings=max(CONTEXT, PREFILL) + 1)
        torch.manual_seed(0)
        with torch.device(DEV):  # initialise on the device: a 410M model on a CPU takes seconds
            self.mole = MoLEForCausalLM(self.cfg, reparameterized=True).to(MODEL_DTYPE).eval()
            self.moe = MoEForCausalLM(self.cfg).to(MODEL_DTYPE).eval()
        self.dense = DenseForCausalLM.from_mole(self.mole).eval()
        self.moe.offload_experts()
        self.lut = _random_lut(self.cfg.lut_shape)
        self.tables = {}  # tier -> LookupTable, each built once (pinning or writing a file is slow)

    def model(self, provider):
        kind = provider.split("-")[0]
        if kind == "dense":
            return self.dense
        if kind == "moe":
            return self.moe
        tier = provider.split("-")[1]
        if tier not in self.tables:
            self.tables[tier] = LookupTable.from_tensor(self.lut, tier, DEV)  # disk: an anonymous temp file
        if self.mole.lut is not self.tables[tier]:
            self.mole.set_lut(self.tables[tier])
        return self.mole

    def close(self):
        for table in self.tables.values():
            table.close()


@pytest.fixture(scope="module", params=SHAPES)
def models(request):
    with num_threads(None if HAS_CUDA else CPU_THREADS):  # the other suites keep their own setting
        m = Models(request.param)
        yield m
        m.close()


def _decode(model, B, tokens, graph):
    """A callable running one decode step per call on rotated tokens (as generate's loop does)."""
    cache = StaticKVCache(model.config, B, CONTEXT + 1, device=DEV, dtype=model.dtype)
    cache.valid[:, :CONTEXT] = True  # CONTEXT earlier tokens (zero K/V: attention costs the same)
    idx = torch.tensor([CONTEXT], device=DEV)
    pos = torch.full((B,), CONTEXT, device=DEV)
    step = model._graph_step(cache, B) if graph else None

    @torch.no_grad()
    def fn():
        tok = tokens.next()
        if step is not None:
            return step(tok, idx, pos)
        return model._decode_step(cache, tok, idx, pos)

    return fn


def _prefill(model, B, prompts):
    """A callable running generate's prompt pass (cache filled, last position's logits) per call."""
    cache = StaticKVCache(model.config, B, PREFILL + 1, device=DEV, dtype=model.dtype)
    cache.valid[:, :PREFILL] = True
    slots = torch.arange(PREFILL, device=DEV)
    positions = slots.expand(B, PREFILL)

    @torch.no_grad()
    def fn():
        attn = _attention_mask(slots, cache.valid, model.dtype)
        h = model._hidden(prompts.next(), positions, attn, cache, slots)
        return model.lm_head(h[:, -1]).float()

    return fn


def _record(benchmark, models, provider, op, shape, tokens):
    cfg = models.cfg
    benchmark.group = f"{op}-{shape}"
    benchmark.extra_info.update(
        provider=provider, op=op, shape=shape, device=DEV.type,
        tier=provider.split("-")[1] if provider.startswith("mole") else None,
        dtype=f"model={str(MODEL_DTYPE)[6:]},lut={str(LUT_DTYPE)[6:]}",
        layers=cfg.num_hidden_layers, vocab=cfg.vocab_size, context=CONTEXT, tokens=tokens,
        threads=torch.get_num_threads(),
        scaled_from=(f"L={models.paper_layers},V={FULL_VOCAB}"
                     if (cfg.num_hidden_layers, cfg.vocab_size) != (models.paper_layers, FULL_VOCAB) else None),
        # Only a MoLE step reads LUT rows (moe-offload's copied expert bytes are set after the run).
        bytes=(tokens * cfg.num_hidden_layers * cfg.num_experts * cfg.hidden_size * torch.finfo(LUT_DTYPE).bits // 8
               if provider.startswith("mole") else 0),
    )


def _run(benchmark, models, provider, fn, rounds, tokens):
    if provider == "moe-offload":
        models.moe.offload_stats = type(models.moe.offload_stats)()
    run(benchmark, fn, device=DEV.type, rounds=rounds, warmup=2)
    if provider == "moe-offload":
        st = models.moe.offload_stats
        calls = max(1, st.tokens // tokens)  # counted once per call, at layer 0
        benchmark.extra_info.update(bytes=st.bytes_h2d // calls, expert_copies_per_call=st.expert_copies / calls)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # run() computed GB/s from the LUT bytes; redo it from the copied bytes
            benchmark.extra_info["GB/s"] = benchmark.extra_info["bytes"] / stats.stats.median / 1e9


@pytest.mark.parametrize("B", DECODE_B)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode(benchmark, models, provider, B):
    model = models.model(provider)
    tokens = Rotation(b.to(DEV) for b in zipf_ids(VOCAB, B, batches=ID_SETS, seed=B))
    fn = _decode(model, B, tokens, graph=provider.endswith("-graph"))
    _record(benchmark, models, provider, "e2e-decode", f"{models.name}-T{B}", B)
    _run(benchmark, models, provider, fn, ROUNDS[0], B)


@pytest.mark.parametrize("B", PREFILL_B)
@pytest.mark.parametrize("provider", [p for p in PROVIDERS if not p.endswith("-graph")])
def test_prefill(benchmark, models, provider, B):
    model = models.model(provider)
    prompts = Rotation(zipf_ids(VOCAB, B * PREFILL, batches=ID_SETS, seed=B).view(-1, B, PREFILL).to(DEV))
    fn = _prefill(model, B, prompts)
    _record(benchmark, models, provider, "e2e-prefill", f"{models.name}-S{PREFILL}-T{B * PREFILL}", B * PREFILL)
    _run(benchmark, models, provider, fn, ROUNDS[1], B * PREFILL)
