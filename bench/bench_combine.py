"""mole_combine and lut_combine against the eager chain of the official MoLE code, same inputs, same run.

Baseline ("torch-eager-chain"): softmax(logits, float32) -> cast to the rows' dtype ->
rows * p[..., None] -> .sum(1) -> + residual + shared, each a separate torch op.

Both providers run on the device this machine has: the Triton kernel on a GPU, the
plain-torch fallback on a CPU-only machine (what `mole_combine` runs there). Each
result carries in `extra_info` (keys shared with bench/conftest.py): `bytes` moved
(rows + logits + residual + shared + out, each read or written once), `GB/s`
achieved (median), `provider`, `baseline`, `shape`, the device's measured copy
bandwidth in the same session and the fraction of it reached.

    pytest bench/bench_combine.py                      # full grid (CPU: rows <= 64 MiB)
    MOLE_BENCH_SMOKE=1 pytest bench --benchmark-disable  # two tiny cases, CI
    MOLE_BENCH_MAX_MIB=512 pytest bench/bench_combine.py # raise the CPU size cap

Ratios = eager mean / mole_combine mean per shape (same `group`).

`test_lut_combine` times one layer's whole lookup branch read straight from the table
(`mole-lut_combine`, one call) against the same work done unfused (`unfused-gather+combine`:
`lut_gather` rows, then `mole_combine`; the rows written and read again) and against the
official eager chain (`eager-lookup`: `lut[ids, l]`, softmax, weighted sum, adds). The table is
[8192, 4, E, D] in bf16, layer 1; on a GPU it sits in VRAM (`mole-lut_combine`: the goal is
>= 85 % of the device copy bandwidth) and in pinned host memory read in place
(`mole-lut_combine-pinned`: judged against bench_limits' zero-copy-sm-read). `bytes` counts the row bytes read plus logits,
residual, shared and out.
"""
import itertools
import os
import time

import pytest
import torch

from mole_kernels.combine import mole_combine
from conftest import HAS_CUDA, SMOKE, run, sync

DEVICE = "cuda" if HAS_CUDA else "cpu"
# A CPU run of the full grid would move GBs per call; cap the rows per case so the
# whole file takes a few minutes. No cap on a GPU.
MAX_ROWS_BYTES = int(float(os.environ.get("MOLE_BENCH_MAX_MIB", "64" if DEVICE == "cpu" else "1e9")) * 2**20)
BASELINE = "torch-eager-chain"
PROVIDERS = ["mole_combine", "eager"]

if SMOKE:
    SHAPES = [(1, 768, 4, torch.bfloat16), (8, 1024, 16, torch.bfloat16)]
else:
    SHAPES = [
        (T, D, E, torch.bfloat16)
        for T, D, E in itertools.product([1, 8, 64, 1024, 8192], [768, 1024, 2048], [4, 16])
        if T * E * D * 2 <= MAX_ROWS_BYTES
    ]


def eager_chain(logits, rows, residual, shared):
    p = torch.softmax(logits, dim=-1, dtype=torch.float32).to(rows.dtype)
    return (rows * p[..., None]).sum(1) + residual + shared


@pytest.fixture(scope="module")
def copy_bandwidth():
    """Measured device copy bandwidth (GB/s, read + write) as the 'peak' to compare with."""
    n = (256 if DEVICE == "cuda" else 64) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(DEVICE)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(DEVICE)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best / 1e9


def _bytes_moved(T, D, E, dtype):
    el = torch.empty((), dtype=dtype).element_size()
    return T * E * D * el + T * E * 4 + 3 * T * D * el  # rows, fp32 logits, residual/shared/out


def _cases():
    for (T, D, E, dtype), provider in itertools.product(SHAPES, PROVIDERS):
        yield pytest.param(provider, T, D, E, dtype, id=f"{provider}-T{T}-D{D}-E{E}-{str(dtype)[6:]}")


@pytest.mark.parametrize("provider,T,D,E,dtype", list(_cases()))
def test_combine(benchmark, copy_bandwidth, provider, T, D, E, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(T, E, device=DEVICE, generator=g)
    rows = torch.randn(T, E, D, device=DEVICE, generator=g).to(dtype)
    residual = torch.randn(T, D, device=DEVICE, generator=g).to(dtype)
    shared = torch.randn(T, D, device=DEVICE, generator=g).to(dtype)
    out = torch.empty(T, D, device=DEVICE, dtype=dtype)

    if provider == "mole_combine":
        def fn():
            return mole_combine(logits, rows, residual, shared, out=out)
    else:
        def fn():
            return eager_chain(logits, rows, residual, shared)

    # Guard the comparison itself: both providers compute the same thing.
    torch.testing.assert_close(
        mole_combine(logits, rows, residual, shared).float(),
        eager_chain(logits, rows, residual, shared).float(), atol=0.1, rtol=0.05,
    )

    nbytes = _bytes_moved(T, D, E, dtype)
    est = nbytes / (5e9 if DEVICE == "cpu" else 2e12) + 20e-6  # rough, only to size the rounds
    benchmark.group = f"T{T}-D{D}-E{E}-{str(dtype)[6:]}"
    benchmark.extra_info.update(
        provider=provider, baseline=BASELINE, device=_device_name(), shape=f"T{T}-D{D}-E{E}",
        T=T, D=D, E=E, dtype=str(dtype)[6:], bytes=nbytes, device_copy_GBps=round(copy_bandwidth, 1),
    )
    run(benchmark, fn, device=DEVICE, rounds=1 if SMOKE else max(5, min(200, int(0.25 / est))))
    if "GB/s" in benchmark.extra_info:
        benchmark.extra_info["fraction_of_copy_bw"] = round(benchmark.extra_info["GB/s"] / copy_bandwidth, 3)


def _device_name():
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- lut_combine ----------------------------
LUT_VOCAB, LUT_LAYERS = (256, 2) if SMOKE else (8192, 4)
# ours ("mole-*") vs the unfused path through our own two ops and the official eager chain
LUT_PROVIDERS = ["mole-lut_combine", "unfused-gather+combine", "eager-lookup"] + (
    ["mole-lut_combine-pinned"] if HAS_CUDA else [])
LUT_SHAPES = [(1, 1024, 4), (32, 1024, 4)] if SMOKE else [
    (T, D, E) for T, D, E in itertools.product([1, 32, 1024, 8192], [768, 1024], [4, 16])
    if T * E * D * 2 <= MAX_ROWS_BYTES]


def _lut_cases():
    for (T, D, E), provider in itertools.product(LUT_SHAPES, LUT_PROVIDERS):
        yield pytest.param(provider, T, D, E, id=f"{provider}-T{T}-D{D}-E{E}")


@pytest.mark.parametrize("provider,T,D,E", list(_lut_cases()))
def test_lut_combine(benchmark, copy_bandwidth, provider, T, D, E):
    from mole_kernels import lut_combine, lut_gather
    from conftest import zipf_ids

    dtype = torch.bfloat16
    lut = torch.randn(LUT_VOCAB, LUT_LAYERS, E, D).to(dtype)
    lut = lut.pin_memory() if provider.endswith("pinned") else lut.to(DEVICE)
    ids = zipf_ids(LUT_VOCAB, T)[0].to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(T, E, device=DEVICE, generator=g)
    residual = torch.randn(T, D, device=DEVICE, generator=g).to(dtype)
    shared = torch.randn(T, D, device=DEVICE, generator=g).to(dtype)
    out = torch.empty(T, D, device=DEVICE, dtype=dtype)
    rows = torch.empty(T, E, D, device=DEVICE, dtype=dtype)

    if provider.startswith("mole-lut_combine"):
        def fn():
            return lut_combine(lut, ids, logits, layer=1, residual=residual, shared=shared, out=out)
    elif provider == "unfused-gather+combine":
        def fn():
            lut_gather(lut, ids, layer=1, out=rows)
            return mole_combine(logits, rows, residual, shared, out=out)
    else:
        def fn():
            return eager_chain(logits, lut[ids, 1], residual, shared)

    torch.testing.assert_close(fn().float(), eager_chain(logits, lut[ids.to(lut.device), 1].to(DEVICE), residual,
                                                         shared).float(), atol=0.1, rtol=0.05)
    nbytes = _bytes_moved(T, D, E, dtype)
    est = nbytes / (5e9 if DEVICE == "cpu" else 2e12) + 20e-6
    benchmark.group = f"lut-T{T}-D{D}-E{E}"
    benchmark.extra_info.update(
        provider=provider, baseline="eager-lookup", device=_device_name(), shape=f"T{T}-D{D}-E{E}", T=T, D=D, E=E,
        dtype="bfloat16", bytes=nbytes, device_copy_GBps=round(copy_bandwidth, 1),
        table="pinned host (zero-copy)" if provider.endswith("pinned") else DEVICE,
    )
    run(benchmark, fn, device=DEVICE, rounds=1 if SMOKE else max(5, min(200, int(0.25 / est))))
    if "GB/s" in benchmark.extra_info:
        benchmark.extra_info["fraction_of_copy_bw"] = round(benchmark.extra_info["GB/s"] / copy_bandwidth, 3)
