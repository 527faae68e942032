"""LookupTable: rows/s and GB/s per tier and path at the paper's row sizes, against the machine's own
copy bandwidth measured in the same run.

Each call fetches all layers' rows for a batch of ids (the unit a prefetcher moves: 72 KB per token
for 160M-4E, 192 KB for 410M-4E in bf16) with `table.gather(ids, path=...)`. Ids are Zipf-distributed
(realistic repetition), rotated over several batches. The vocabulary is scaled to 4096 (the real
one is 50,304) so that the 410M-4E table is 768 MiB: far larger than any cache, small enough for a
shared machine. The disk tier reads a file that the page cache holds after the first round, so its
figure is the staged-copy cost, not the drive's.

Quantized tables (`int8`, `nf4` block 64) run the same paths: host and disk tiers move only the
quantized bytes and the gather dequantizes, so the claim to test is that those tiers get faster in
proportion to the bytes saved (bf16 is the baseline in the same run).

extra_info: `bytes` = table bytes per call (T * row, quantized bytes for a quantized table), `unique_bytes` = rows that crossed the tier
boundary once (dedupe), `GB/s` (delivered), `rows/s`, and `frac_memcpy` = GB/s over the host memcpy
bandwidth (`frac_h2d` over pinned H2D on a GPU) measured by the fixtures below in the same run.
"""
import os
import tempfile
import time

import pytest
import torch

from conftest import HAS_CUDA, MODEL_SHAPES, SMOKE, Rotation, pick, run, sync, zipf_ids
from mole_kernels.table import LookupTable

DTYPE = torch.bfloat16
VOCAB = 512 if SMOKE else 4096
SHAPES = pick(["160M-4E", "410M-4E"], ["160M-4E"])
BATCHES = pick([1, 16, 256, 4096], [16])
ID_SETS = pick(4, 1)
CPU_CASES = pick([("host", "zero_copy"), ("host", "dma"), ("disk", "staged")], [("host", "zero_copy"), ("disk", "staged")])
GPU_CASES = [("device", "device"), ("host", "zero_copy"), ("host", "dma"), ("disk", "staged")]
FORMATS = pick(["bf16", "int8", "nf4"], ["bf16", "nf4"])  # bf16 = the float table itself
CASES = [("cpu", *c) for c in CPU_CASES] + [("cuda", *c) for c in (GPU_CASES if not SMOKE else GPU_CASES[1:2])]


def _bandwidth(copy, nbytes, device):
    """Median GB/s of a copy of nbytes (bytes read), after one warm-up."""
    times = []
    for _ in range(2 if SMOKE else 7):
        sync(device)
        t0 = time.perf_counter()
        copy()
        sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times[1:])[len(times[1:]) // 2] / 1e9


@pytest.fixture(scope="module")
def limits(memcpy_bytes):
    src = torch.ones(memcpy_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    out = {"memcpy_GBps": _bandwidth(lambda: dst.copy_(src), memcpy_bytes, "cpu")}
    if HAS_CUDA:
        pinned = src.pin_memory()
        dev = torch.empty(memcpy_bytes, dtype=torch.uint8, device="cuda")
        out["h2d_GBps"] = _bandwidth(lambda: dev.copy_(pinned, non_blocking=True), memcpy_bytes, "cuda")
    return out


@pytest.fixture(scope="module", params=SHAPES)
def lut(request):
    L, E, D = MODEL_SHAPES[request.param]
    return request.param, torch.empty(VOCAB, L, E, D, dtype=DTYPE).uniform_(-1, 1)


_TABLES = {}


def table_for(name, lut, placement, device, fmt):
    """One table per (shape, placement, device, format), built once (pinning/saving a table is slow)."""
    key = (name, placement, device, fmt)
    quant = {} if fmt == "bf16" else {"format": fmt, "block_size": 64 if fmt == "nf4" else None}
    if key not in _TABLES:
        for other in [k for k in _TABLES if k[0] != name]:  # keep one shape's tables alive at a time
            _TABLES.pop(other).close()
        if placement == "disk":
            d = tempfile.mkdtemp(prefix="mole_bench_")
            path = os.path.join(d, f"{name}.safetensors")
            _TABLES[key] = LookupTable.from_tensor(lut, "disk", device, path=path, **quant)
            os.unlink(path)  # the open file keeps the data
            os.rmdir(d)
        else:
            _TABLES[key] = LookupTable.from_tensor(lut, placement, device, **quant)
    return _TABLES[key]


@pytest.mark.parametrize("T", BATCHES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device,placement,path", CASES, ids=lambda c: str(c))
def test_table_gather(benchmark, lut, limits, device, placement, path, fmt, T):
    name, data = lut
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (none visible)")
    table = table_for(name, data, placement, device, fmt)
    ids_on = "cuda" if device == "cuda" and path in ("device", "zero_copy") else "cpu"  # decode ids live on the GPU
    batches = zipf_ids(VOCAB, T, batches=ID_SETS, seed=T)
    unique = sum(torch.unique(b).numel() for b in batches) / len(batches)
    inputs = Rotation(b.to(ids_on) for b in batches)
    row = table.row_bytes
    benchmark.group = f"table-{name}-T{T}"
    suffix = "" if fmt == "bf16" else f"-{fmt}"
    # path="dma" on a CPU copies the deduplicated rows with host threads: no DMA engine is involved
    shown = "dedup" if device == "cpu" and path == "dma" else path
    benchmark.name = f"{placement}-{shown}{suffix}-{name}-T{T}" + ("-cuda" if device == "cuda" else "")
    benchmark.extra_info.update(
        provider=f"{placement}-{shown}{suffix}", path=path, op="table-gather", shape=f"{name}-T{T}", dtype="bfloat16",
        format=fmt, device=device,
        vocab=VOCAB, bytes=T * row, unique_bytes=int(unique * row), row_bytes=row, **limits,
    )
    table.reset_stats()
    run(benchmark, lambda: table.gather(inputs.next(), path=path), device=device, rounds=pick(10, 1))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        gbps = T * row / median / 1e9
        benchmark.extra_info["rows/s"] = T / median
        benchmark.extra_info["frac_memcpy"] = gbps / limits["memcpy_GBps"]
        if "h2d_GBps" in limits and device == "cuda":
            benchmark.extra_info["frac_h2d"] = gbps / limits["h2d_GBps"]
    assert table.stats.last_path == path


def teardown_module():
    while _TABLES:
        _TABLES.popitem()[1].close()
