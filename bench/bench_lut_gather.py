"""Fused gather-and-accumulate (one layer: out[t] = sum_e w[t,e] * lut[id_t, layer, e]) at the
paper's shapes, against the baselines a user would otherwise write, in the same run:

- torch-eager: `lut[ids, layer]` then the float32 weighted sum (what the official code does);
- embedding_bag: `F.embedding_bag(mode="sum", per_sample_weights=...)` on a [V*L*E, D] view;
- fbgemm-tbe: FBGEMM's table-batched embedding bag (one table of V*L*E rows of D, SUM pooling
  with per-sample weights; the `fbgemm-gpu-cpu` package), the strongest peer, in its fastest CPU
  form: `SplitTableBatchedEmbeddingBagsCodegen` on an fp32 copy (it reads twice our bytes; its GB/s
  counts them). `fbgemm-tbe-fp16`: the inference `IntNBitTableBatchedEmbeddingBagsCodegen` on an
  fp16 copy, our precision (no bf16 type there), 10-40x slower than the fp32 form on the CPU
  measured while writing this. Both skip with the reason when fbgemm_gpu does not load;
- mole (ours): `mole_kernels.lut_gather(lut, ids, weights, layer=...)`.
On a GPU also mole with the table in VRAM and pinned in host memory (zero-copy).
GB/s counts the table bytes the call must read: T * E * D * element size.

`test_step_rows` is the other unit of work: all layers' rows for a step's ids (what a prefetcher
moves, L*E*D elements per token), against the official MoLE code path: index a (pinned, on a GPU)
CPU `nn.Embedding` of shape [V, L*E*D] on the host, then `.to(device, non_blocking=True)`. On a
CPU-only machine the `.to` is a no-op, so the row measures the host index alone.
"""
import warnings

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


_TBE = {}


def fbgemm_tbe_for(lut, kind):
    """FBGEMM's table-batched embedding bag over `lut` viewed as one [V*L*E, D] table, built once
    per table ("fp32" or "fp16"); skips with the reason when fbgemm_gpu does not load here."""
    key = (lut.data_ptr(), kind)
    if key not in _TBE:
        if any(k[0] != lut.data_ptr() for k in _TBE):
            _TBE.clear()  # one table's copies alive at a time
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fbgemm warns about SSD optimizers it lacks
                from fbgemm_gpu.split_embedding_configs import SparseType
                from fbgemm_gpu.split_table_batched_embeddings_ops_common import (ComputeDevice, EmbeddingLocation,
                                                                                   PoolingMode)
                from fbgemm_gpu.split_table_batched_embeddings_ops_inference import \
                    IntNBitTableBatchedEmbeddingBagsCodegen
                from fbgemm_gpu.split_table_batched_embeddings_ops_training import \
                    SplitTableBatchedEmbeddingBagsCodegen
        except Exception as e:  # not installed, or built against another torch
            pytest.skip(f"fbgemm_gpu does not load here: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        V, L, E, D = lut.shape
        if kind == "fp32":  # the split TBE: fbgemm's JIT-compiled CPU path (fp32 rows)
            tbe = SplitTableBatchedEmbeddingBagsCodegen([(V * L * E, D, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                        pooling_mode=PoolingMode.SUM, weights_precision=SparseType.FP32)
            with torch.no_grad():
                tbe.split_embedding_weights()[0].copy_(lut.view(V * L * E, D))
        else:  # the inference TBE in the LUT's own precision (it has no bf16 type)
            tbe = IntNBitTableBatchedEmbeddingBagsCodegen([("lut", V * L * E, D, SparseType.FP16, EmbeddingLocation.HOST)],
                                                          pooling_mode=PoolingMode.SUM, device="cpu",
                                                          output_dtype=SparseType.FP16)
            tbe.initialize_weights()
            weight = tbe.split_embedding_weights()[0][0]  # uint8 [rows, padded row bytes]
            if weight.shape[1] != D * 2:
                pytest.skip(f"fbgemm TBE pads rows of {D} fp16 to {weight.shape[1]} bytes")
            weight.view(torch.float16).copy_(lut.view(V * L * E, D))
        # Guard the comparison itself: the baseline computes what ours computes.
        ids, w = torch.arange(min(V, 7)), torch.rand(min(V, 7), E)
        torch.testing.assert_close(fbgemm_tbe(lut, ids, w, L - 1, tbe=tbe).float(),
                                   eager(lut, ids, w, L - 1).float(), atol=0.05, rtol=0.02)
        _TBE[key] = tbe
    return _TBE[key]


@torch.no_grad()  # the split TBE is a training module
def fbgemm_tbe(lut, ids, w, layer, *, tbe):
    V, L, E, D = lut.shape
    flat = ((ids[:, None] * L + layer) * E + torch.arange(E, device=ids.device)).reshape(-1)
    offsets = torch.arange(0, flat.numel() + 1, E)  # one bag of E rows per token
    return tbe(flat, offsets, w.reshape(-1))


PROVIDERS = {"mole": mole, "torch-eager": eager, "embedding_bag": embedding_bag, "fbgemm-tbe": fbgemm_tbe,
             "fbgemm-tbe-fp16": fbgemm_tbe}
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
        lut = placed(lut, "pinned")  # made once per table: pinning a GB per test cost seconds
    elif device == "cuda":
        lut = placed(lut, "cuda")
    fn = PROVIDERS[provider.split("-cuda")[0]]
    if provider.startswith("fbgemm"):
        tbe = fbgemm_tbe_for(lut, "fp16" if provider.endswith("fp16") else "fp32")
        fn = lambda lut_, ids, w, layer: fbgemm_tbe(lut_, ids, w, layer, tbe=tbe)  # noqa: E731
    inputs = Rotation(
        (ids.to(device), torch.rand(T, E, device=device), i % L)
        for i, ids in enumerate(zipf_ids(V, T, batches=ID_SETS, seed=T))
    )
    benchmark.group = f"lut_gather-fused-{name}-T{T}"
    dtype = {"fbgemm-tbe": "float32", "fbgemm-tbe-fp16": "float16"}.get(provider, str(DTYPE).split(".")[-1])
    benchmark.extra_info.update(
        provider=provider, op="lut_gather-fused", shape=f"{name}-T{T}", dtype=dtype, device=device, vocab=V,
        bytes=T * E * D * torch.empty((), dtype=getattr(torch, dtype)).element_size(),  # the rows this table holds
    )
    run(benchmark, lambda: fn(lut, *inputs.next()), device=device)


# ---------------------------------------------------------------- all layers' rows per step


_PLACED = {}


def placed(lut, kind):
    """`lut` as "pinned", "cuda" or "official" (an nn.Embedding [V, L*E*D]), made once per table."""
    key = (lut.data_ptr(), kind)
    if key not in _PLACED:
        if any(k[0] != lut.data_ptr() for k in _PLACED):
            _PLACED.clear()  # one table's copies alive at a time
        if kind == "pinned":
            _PLACED[key] = lut.pin_memory()
        elif kind == "cuda":
            _PLACED[key] = lut.cuda()
        else:  # the official table: pinned on a GPU machine, shares the CPU storage otherwise
            weight = lut.view(lut.shape[0], -1)
            weight = weight.pin_memory() if HAS_CUDA else weight
            _PLACED[key] = torch.nn.Embedding(*weight.shape, _weight=weight, _freeze=True)
    return _PLACED[key]


# mole-out: into a preallocated out= (as the Prefetcher does); a fresh CPU result of tens of MB
# costs its page faults on every call, which the allocating providers all pay.
STEP_PROVIDERS = ["mole", "mole-out", "official", "torch-eager"] + ["mole-cuda-zero_copy", "official-cuda",
                                                                     "mole-cuda-device"]


@pytest.mark.parametrize("T", pick([1, 8, 32, 256], [8]))
@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_step_rows(benchmark, table, provider, T):
    name, lut = table
    V, L, E, D = lut.shape
    device = "cuda" if "cuda" in provider else "cpu"
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (none visible)")
    batches = zipf_ids(V, T, batches=ID_SETS, seed=T + 1)
    if provider.startswith("official"):
        emb = placed(lut, "official")
        # As the official code: ids on the host (decode ids born on the GPU would first cost it a
        # synchronisation, not charged here); the indexed rows are a fresh pageable tensor, so
        # the non_blocking copy is in fact synchronous.
        inputs = Rotation(batches)
        fn = lambda: emb(inputs.next()).to(device, non_blocking=True)  # noqa: E731
    elif provider == "torch-eager":
        inputs = Rotation(batches)
        fn = lambda: lut[inputs.next()]  # noqa: E731
    else:
        src = placed(lut, "pinned") if provider.endswith("zero_copy") else placed(lut, "cuda") if device == "cuda" else lut
        inputs = Rotation(b.to(device) for b in batches)
        out = torch.empty((T, L, E, D), dtype=lut.dtype, device=device) if provider == "mole-out" else None
        fn = lambda: mole_kernels.lut_gather(src, inputs.next(), out=out)  # noqa: E731
    benchmark.group = f"lut_gather-rows-{name}-T{T}"
    benchmark.extra_info.update(
        provider=provider, op="lut_gather-rows", shape=f"{name}-T{T}", dtype=str(DTYPE).split(".")[-1],
        device=device, tier="host" if provider != "mole-cuda-device" else "device", vocab=V,
        bytes=T * L * E * D * lut.element_size(),
    )
    run(benchmark, fn, device=device)
