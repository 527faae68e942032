"""Quantized tables against the bf16 table, in the same run: bytes per token and gather latency.

Shape: 160M-4E (L=12, E=4, D=768). The vocabulary is scaled to QUANT_VOCAB tokens (the real one
is 50,304) so that the bf16 table (151 MB at 2,048 tokens) and its four quantized copies fit
next to other work; every table is still far larger than the CPU caches, and ids are Zipfian
and rotated so repeated calls do not find warm rows.

Providers: `bf16` is mole_kernels.lut_gather on the bf16 table (the baseline); the others are
mole_kernels.quantized_lut_gather on the quantized table. Forms: `fused` (one layer,
out[t] = sum_e w[t,e] * row[t,layer,e], bf16 [T, D]) and `rows` (one layer's rows dequantized
to bf16 [T, E, D]). extra_info: `bytes` = table bytes the call reads (T * E rows of one layer,
scales and padding included), `bytes_per_token` (all layers: what a prefetch moves over PCIe or
from disk), `bytes_ratio_vs_bf16`, and GB/s of table bytes read.

`test_quant_fused_per_call` (the goal: a fused quantized gather costs <= 1.3x the bf16 one per call
at T = 1-64): the formats alternate call by call (CALLS calls each per round, ids rotated), each
round keeps every provider's median call, and the result is the median over ROUNDS rounds, through the public call (`lut_gather`, whose Python checks a caller pays too) and
through the op itself (`torch.ops.mole_kernels.*`); ratios to bf16 in `extra_info["vs_bf16"]`. The op's call
reads another layer than the public call just before it on the same table (layer + L/2): the same rows would
be in cache, and the op's ratios would compare decoding warm rows, not what a decode step's gather reads.
Threads: the machine's default (MOLE_BENCH_QUANT_THREADS sets another count; decode steps run one thread).
"""
import os
import statistics
import time

import pytest
import torch

import mole_kernels
from mole_kernels.quant import quantize, quantized_lut_gather
from conftest import MODEL_SHAPES, SMOKE, Rotation, num_threads, pick, run, zipf_ids

SHAPE = "160M-4E"
QUANT_VOCAB = 256 if SMOKE else 2048
PROVIDERS = pick(["bf16", "int8", "fp8_e4m3-128", "nf4-64", "nf4-768", "q3-128", "q2-64", "q1-64"], ["bf16", "nf4-64", "q2-64"])
TOKENS = pick([1, 256, 4096], [16])
FORMS = pick(["fused", "rows"], ["fused"])
ID_SETS = 1 if SMOKE else 8


@pytest.fixture(scope="module")
def tables():
    L, E, D = MODEL_SHAPES[SHAPE]
    lut = torch.empty(QUANT_VOCAB, L, E, D, dtype=torch.bfloat16).uniform_(-1, 1)
    made = {"bf16": lut}

    def get(provider):
        if provider not in made:
            fmt, _, block = provider.partition("-")
            made[provider] = quantize(lut, fmt, int(block) if block else None)
        return made[provider]

    return get


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_quant_gather(benchmark, tables, provider, form, T):
    L, E, D = MODEL_SHAPES[SHAPE]
    table = tables(provider)
    bf16_per_token = L * E * D * 2
    if provider == "bf16":
        per_token, per_token_layer = bf16_per_token, E * D * 2

        def fn(ids, w, layer):
            return mole_kernels.lut_gather(table, ids, w if form == "fused" else None, layer=layer)
    else:
        per_token, per_token_layer = table.bytes_per_token, table.bytes_per_token_layer

        def fn(ids, w, layer):
            return quantized_lut_gather(table, ids, w if form == "fused" else None, layer=layer,
                                        dtype=torch.bfloat16)

    inputs = Rotation((ids, torch.rand(T, E), i % L)
                      for i, ids in enumerate(zipf_ids(QUANT_VOCAB, T, batches=ID_SETS, seed=T)))
    benchmark.group = f"quant-{form}-{SHAPE}-T{T}"
    benchmark.extra_info.update(
        provider=provider, op=f"lut_gather_quant-{form}", shape=f"{SHAPE}-V{QUANT_VOCAB}-T{T}", device="cpu",
        bytes=T * per_token_layer, bytes_per_token=per_token, bytes_ratio_vs_bf16=per_token / bf16_per_token,
    )
    out = run(benchmark, lambda: fn(*inputs.next()))
    assert out is not None and out.dtype == torch.bfloat16


PER_CALL_TOKENS = pick([1, 8, 32, 64], [8])
ROUNDS, CALLS = pick(9, 1), pick(400, 4)
PER_CALL_THREADS = int(os.environ.get("MOLE_BENCH_QUANT_THREADS", "0"))  # 0: the machine's default


@pytest.fixture
def per_call_threads():
    with num_threads(PER_CALL_THREADS or None) as n:
        yield n


@pytest.mark.parametrize("T", PER_CALL_TOKENS)
def test_quant_fused_per_call(benchmark, tables, per_call_threads, T):
    L, E, D = MODEL_SHAPES[SHAPE]
    ops = torch.ops.mole_kernels
    inputs = [(ids, torch.softmax(torch.randn(T, E), -1), i % L)
              for i, ids in enumerate(zipf_ids(QUANT_VOCAB, T, batches=ID_SETS, seed=T))]
    calls = {}
    for provider in PROVIDERS:
        table = tables(provider)
        if provider == "bf16":
            calls["bf16"] = lambda ids, w, l, t=table: mole_kernels.lut_gather(t, ids, w, layer=l)
            calls["bf16-op"] = lambda ids, w, l, t=table: ops.lut_gather(t, ids, w, (l + L // 2) % L, None)
        else:
            calls[provider] = lambda ids, w, l, t=table: quantized_lut_gather(t, ids, w, layer=l, dtype=torch.bfloat16)
            calls[provider + "-op"] = lambda ids, w, l, t=table: ops.lut_gather_quant(
                t.data, t.format, t.dim, t.block_size, ids, w, (l + L // 2) % L, torch.bfloat16, None)
    times = {p: [] for p in calls}

    def one_round():
        # Providers alternate call by call and a round keeps each one's median call: on a loaded machine a
        # time slice lost to another process lands on single calls, not on one provider's whole batch.
        per_call = {p: [] for p in calls}
        for i in range(CALLS):
            args = inputs[i % len(inputs)]
            for p, fn in calls.items():
                t0 = time.perf_counter()
                fn(*args)
                per_call[p].append(time.perf_counter() - t0)
        for p, v in per_call.items():
            times[p].append(statistics.median(v) * 1e6)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    us = {p: statistics.median(v) for p, v in times.items()}
    benchmark.group = f"quant-fused-per-call-T{T}"
    benchmark.extra_info.update(
        provider="interleaved", op="lut_gather_quant-fused-per-call", shape=f"{SHAPE}-V{QUANT_VOCAB}-T{T}",
        device="cpu", T=T, rounds=ROUNDS, calls=CALLS, threads=per_call_threads,
        us_per_call={p: round(v, 3) for p, v in us.items()},
        vs_bf16={p: round(v / us["bf16-op" if p.endswith("-op") else "bf16"], 4) for p, v in us.items()},
    )
