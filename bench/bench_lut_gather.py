"""Fused gather-and-accumulate (one layer: out[t] = sum_e w[t,e] * lut[id_t, layer, e]) at the
paper's shapes, against the baselines a user would otherwise write, in the same run:

- torch-eager: `lut[ids, layer]` then the float32 weighted sum (what the official code does);
- embedding_bag: `F.embedding_bag(mode="sum", per_sample_weights=...)` on a [V*L*E, D] view;
- mole (ours): `mole_kernels.lut_gather(lut, ids, weights, layer=...)`.
On a GPU also mole with the table in VRAM and pinned in host memory (zero-copy).
GB/s counts the table bytes the call must read: T * E * D * element size.
"""
import pytest
import torch
import torch.nn.functional as F

import mole_kernels
from conftest import BENCH_VOCAB, HAS_CUDA, MODEL_SHAPES, Rotation, pick, run, zipf_ids

DTYPE = torch.bfloat16
SHAPES = pick(["160M-4E", "410M-4E"], ["160M-4E"])
TOKENS = pick([1, 16, 256, 4096], [16])
ID_SETS = 1 if pick(False, True) else 8  # rotated so that repeated calls do not hit warm rows


@pytest.fixture(scope="module", params=SHAPES)
def table(request):
    L, E, D = MODEL_SHAPES[request.param]
    lut = torch.empty(BENCH_VOCAB, L, E, D, dtype=DTYPE).uniform_(-1, 1)
    return request.param, lut


def eager(lut, ids, w, layer):
    rows = lut[ids, layer]  # [T, E, D]
    return (rows.float() * w[..., None]).sum(1).to(lut.dtype)


def embedding_bag(lut, ids, w, layer):
    V, L, E, D = lut.shape
    flat = (ids[:, None] * L + layer) * E + torch.arange(E, device=ids.device)  # [T, E] row ids
    return F.embedding_bag(flat, lut.view(V * L * E, D), mode="sum", per_sample_weights=w.to(lut.dtype))


def mole(lut, ids, w, layer):
    return mole_kernels.lut_gather(lut, ids, w, layer=layer)


PROVIDERS = {"mole": mole, "torch-eager": eager, "embedding_bag": embedding_bag}
GPU_MODES = ["mole-cuda-device", "mole-cuda-zero_copy", "torch-eager-cuda-device"]


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("provider", list(PROVIDERS) + GPU_MODES)
def test_fused_gather(benchmark, table, provider, T):
    name, lut = table
    V, L, E, D = lut.shape
    device = "cuda" if "cuda" in provider else "cpu"
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (none visible)")
    if provider.endswith("zero_copy"):
        lut = lut.pin_memory()
    elif device == "cuda":
        lut = lut.cuda()
    fn = PROVIDERS[provider.split("-cuda")[0]]
    inputs = Rotation(
        (ids.to(device), torch.rand(T, E, device=device), i % L)
        for i, ids in enumerate(zipf_ids(V, T, batches=ID_SETS, seed=T))
    )
    benchmark.group = f"lut_gather-fused-{name}-T{T}"
    benchmark.extra_info.update(
        provider=provider, op="lut_gather-fused", shape=f"{name}-T{T}", dtype=str(DTYPE).split(".")[-1],
        device=device, bytes=T * E * D * lut.element_size(),
    )
    run(benchmark, lambda: fn(lut, *inputs.next()), device=device)
