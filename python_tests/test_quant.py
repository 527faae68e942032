"""Quantized tables (int8, fp8 e4m3, nf4): round-trip bounds, layout, errors, and the gather
against a float64 reference of the dequantized table on every device and form."""
import itertools
import os

import pytest
import torch

from mole_kernels.quant import (NF4_LEVELS, QuantizedLUT, dequantize, quantize, quantized_lut_gather, row_layout)

from conftest import (DEVICES, FLOAT_DTYPES, TOLERANCES, assert_child_ran, child_result, count_cases, expected_cpu_isa,
                      module_tests, requires_cuda)

# (format, block_size) pairs at D = 768, the paper's 160M hidden size.
FORMATS_768 = [("int8", None), ("fp8_e4m3", None), ("fp8_e4m3", 64), ("nf4", 64), ("nf4", 128), ("nf4", 768)]
# (V, L, E, D, format, block): odd D, E = 1, L = 1, 3-D tables (L None), blocks that are not whole
# 16-byte chunks (the CUDA one-element path) and ones that are (the vector path); blocks that end
# one element past a multiple of 16 (the AVX-512 path's one-element tail).
GATHER_CASES = [
    (11, 3, 4, 96, "int8", None),
    (7, 1, 1, 37, "int8", None),
    (9, None, 3, 21, "fp8_e4m3", 7),
    (6, 2, 16, 64, "fp8_e4m3", None),
    (9, 2, 2, 21, "nf4", 7),
    (5, 2, 3, 7, "nf4", None),
    (13, 2, 4, 768, "nf4", 768),
    (8, None, 4, 128, "nf4", 64),
    (7, 2, 2, 33, "int8", None),
    (6, None, 2, 49, "fp8_e4m3", 49),
    (5, 2, 3, 34, "nf4", 17),
]
CASE_IDS = [f"{f}-b{b}-V{V}L{L}E{E}D{D}" for V, L, E, D, f, b in GATHER_CASES]
NF4_HALF_GAP = (NF4_LEVELS[1] - NF4_LEVELS[0]) / 2  # the widest gap between neighbouring levels


def make_table(V, L, E, D, dtype=torch.float32):
    """Random rows with magnitudes spread over 2^-8..2^8, an outlier and an all-zero row."""
    shape = (V, E, D) if L is None else (V, L, E, D)
    lut = torch.randn(shape) * torch.exp2(torch.randint(-8, 9, shape[:-1]).float())[..., None]
    lut.view(-1, D)[0, D // 2] = 40.0
    lut.view(-1, D)[-1] = 0.0
    return lut.to(dtype)


def place(q, ids, device):
    if device == "cpu":
        return q, ids
    if device == "cuda":
        return q.to("cuda"), ids.cuda()
    return q.pin_memory(), ids.cuda()


def random_ids(V, leading, dtype=torch.int64):
    ids = torch.randint(0, V, leading, dtype=dtype)
    if ids.numel() > 1:
        ids.view(-1)[-1] = ids.view(-1)[0]  # always a repeated id
    return ids


def ref_fused(deq, ids, weights, layer):
    rows = deq.double()[ids.cpu().long()]
    if deq.dim() == 4:
        rows = rows[..., layer, :, :]
    return (rows * weights.double().cpu()[..., None]).sum(-2)


def stated_bound(x: torch.Tensor, fmt: str, block: int):
    """The module docstring's per-element round-trip bound for float64 values ``x [..., D]``, plus one
    float32 rounding of ``scale * code`` (and of the stored scale); returns (bound, scale per element)."""
    D = x.shape[-1]
    amax = x.unflatten(-1, (D // block, block)).abs().amax(-1, keepdim=True).expand(*x.shape[:-1], -1, block).flatten(-2)
    if fmt == "int8":
        s = amax / 127
        bound = s / 2
    elif fmt == "fp8_e4m3":
        s = amax / 448
        bound = x.abs() / 16 + s / 1024
    else:
        s = amax
        bound = NF4_HALF_GAP * s
    return bound + 2 ** -22 * (x.abs() + s), s


def check_within_bound(q: QuantizedLUT, x: torch.Tensor, min_share: float = 0.25):
    """Every element of dequantize(q) within the stated bound of ``x`` (float64), and the bound not
    vacuous: some element uses more than ``min_share`` of it (quantization loses something)."""
    bound, _ = stated_bound(x, q.format, q.block_size)
    err = (dequantize(q, torch.float32).double() - x).abs()
    ratio = err / bound.clamp_min(1e-300)
    assert (err <= bound).all(), f"{q.format}: max err/bound {ratio.max().item():.4f}"
    assert ratio.max() > min_share


# ---- quantize / dequantize --------------------------------------------------------------------

@pytest.mark.parametrize("fmt,block", FORMATS_768, ids=str)
@pytest.mark.parametrize("lut_dtype", FLOAT_DTYPES, ids=str)
def test_round_trip_within_stated_bound(fmt, block, lut_dtype):
    lut = make_table(12, 2, 3, 768, lut_dtype)
    q = quantize(lut, fmt, block)
    assert q.dtype == lut_dtype and q.shape == tuple(lut.shape)
    x = lut.double()
    blk = q.block_size
    bound, s = stated_bound(x, q.format, blk)
    check_within_bound(q, x)
    torch.testing.assert_close(q.scales().double(), (s[..., ::blk]).to(torch.float32).double(), rtol=0, atol=0)
    # zero rows stay exactly zero, and the default dtype is the table's
    assert (dequantize(q)[-1, -1, -1] == 0).all() and dequantize(q).dtype == lut_dtype


def test_nf4_error_on_gaussian_rows_is_small_on_average():
    lut = torch.randn(64, 4, 768)
    for block, rms_max in ((64, 0.10), (768, 0.13)):
        err = dequantize(quantize(lut, "nf4", block), torch.float32) - lut
        assert err.pow(2).mean().sqrt() < rms_max  # ~0.095 / ~0.11 for unit-variance rows


def test_row_layout_and_bytes_per_token():
    # 160M-4E (L=12, E=4, D=768): bf16 row per token = 73,728 bytes
    assert row_layout("int8", 768, 768) == (768, 768, 784)
    assert row_layout("fp8_e4m3", 768, 128) == (768, 768, 800)
    assert row_layout("nf4", 768, 64) == (384, 384, 432)
    assert row_layout("nf4", 768, 768) == (384, 384, 400)
    assert row_layout("nf4", 7, 7) == (4, 4, 16)
    q = quantize(torch.randn(3, 12, 4, 768), "nf4", 768)
    assert q.bytes_per_token == 12 * 4 * 400 and q.bytes_per_token_layer == 4 * 400
    assert q.data.shape == (3, 12, 4, 400) and q.data.dtype == torch.uint8
    # element 2k is the low nibble of byte k; the scale follows the payload
    lut = torch.zeros(1, 1, 8)
    lut[0, 0, :2] = torch.tensor([-1.0, 0.56])
    q = quantize(lut, "nf4", 8)
    b = q.data[0, 0]
    assert NF4_LEVELS[int(b[0]) & 15] == -1.0 and NF4_LEVELS[int(b[0]) >> 4] == pytest.approx(0.5626, abs=1e-4)
    assert b[4:8].view(torch.float32).item() == 1.0 and (b[8:] == 0).all()


def test_fp8_alias_and_defaults():
    lut = torch.randn(4, 2, 96)
    assert quantize(lut, "fp8").format == "fp8_e4m3"
    assert quantize(lut, "fp8").block_size == 96  # 128 does not divide 96: one block per row
    assert quantize(torch.randn(2, 2, 256), "fp8").block_size == 128
    assert quantize(lut, "nf4").block_size == 96 and quantize(torch.randn(2, 1, 128), "nf4").block_size == 64
    assert quantize(lut, "int8").block_size == 96


@pytest.mark.parametrize("call,match", [
    (lambda t: quantize(t, "nf4", 100), "block_size must divide D = 768"),
    (lambda t: quantize(t, "fp8", 500), "block_size must divide D = 768"),
    (lambda t: quantize(t, "int4"), "unknown format 'int4'"),
    (lambda t: quantize(t, "int8", 64), "int8 has one scale per row"),
    (lambda t: quantize(t.long(), "int8"), "lut must be float32, float16 or bfloat16"),
    (lambda t: quantize(t[0, 0], "int8"), r"lut must be a tensor \[V, L, E, D\]"),
])
def test_bad_quantize_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 3, 768))


def test_non_finite_values_are_refused_naming_the_index():
    lut = torch.randn(3, 2, 2, 8)
    lut[2, 1, 0, 5] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite value at index \(2, 1, 0, 5\)"):
        quantize(lut, "int8")


def test_metadata_round_trip_and_disagreement(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    q = quantize(torch.randn(5, 2, 3, 64).half(), "nf4", 32)
    path = str(tmp_path / "lut.safetensors")
    safetensors.save_file({"data": q.data}, path, metadata=q.metadata())
    with safetensors.safe_open(path, "pt") as f:
        meta, data = f.metadata(), f.get_tensor("data")
    back = QuantizedLUT.from_metadata(data, meta)
    assert (back.format, back.dim, back.block_size, back.dtype) == ("nf4", 64, 32, torch.float16)
    assert torch.equal(dequantize(back), dequantize(q))
    with pytest.raises(ValueError, match="rows are 48 bytes, but format 'nf4' with dim=64, block_size=8 needs 64"):
        QuantizedLUT.from_metadata(data, {**meta, "mole_kernels.block_size": "8"})
    with pytest.raises(ValueError, match="padding bytes .* are not zero"):  # same row size, scales in the padding
        QuantizedLUT.from_metadata(data, {**meta, "mole_kernels.block_size": "64"})
    with pytest.raises(ValueError, match="rows are 48 bytes, but format 'int8' with dim=64"):
        QuantizedLUT.from_metadata(data, {**meta, "mole_kernels.format": "int8", "mole_kernels.block_size": "64"})
    with pytest.raises(ValueError, match="metadata lacks 'mole_kernels.dim'"):
        QuantizedLUT.from_metadata(data, {k: v for k, v in meta.items() if not k.endswith("dim")})
    with pytest.raises(ValueError, match="unknown format 'nf3'"):
        QuantizedLUT.from_metadata(data, {**meta, "mole_kernels.format": "nf3"})


# ---- the gather -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GATHER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
def test_rows_equal_dequantized_table(device, case, out_dtype):
    V, L, E, D, fmt, block = case
    q = quantize(make_table(V, L, E, D), fmt, block)
    ids = random_ids(V, (2, 3))
    want = dequantize(q, torch.float32)[ids].to(out_dtype)  # one rounding from float32, as the kernel
    qd, ids_d = place(q, ids, device)
    got = quantized_lut_gather(qd, ids_d, dtype=out_dtype)
    assert got.shape == want.shape and got.dtype == out_dtype and got.device == ids_d.device
    assert torch.equal(got.cpu(), want)
    if L is not None:
        one = quantized_lut_gather(qd, ids_d, layer=L - 1, dtype=out_dtype)
        assert torch.equal(one.cpu(), want[:, :, L - 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GATHER_CASES, ids=CASE_IDS)
def test_fused_matches_float64(device, case):
    V, L, E, D, fmt, block = case
    q = quantize(make_table(V, L, E, D), fmt, block)
    deq = dequantize(q, torch.float32)
    ids = random_ids(V, (5,))
    weights = torch.rand(5, E)
    layer = None if L is None else L - 1
    want = ref_fused(deq, ids, weights, layer)
    qd, ids_d = place(q, ids, device)
    got = quantized_lut_gather(qd, ids_d, weights.to(ids_d.device), layer=layer, dtype=torch.float32)
    assert got.shape == (5, D) and got.device == ids_d.device
    scale = deq.abs().amax().double()  # float32 accumulation error is relative to the largest term
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5 * scale * E, rtol=1e-5)


# The CPU's fused sum by batch size and expert count: with AVX-512 or AVX2, int8 / fp8 / nf4 rows are summed
# in registers straight into out for up to 16 experts (E = 17: the float32 tile, groups of 16), fp8 (AVX-512)
# by its even/odd word decoding on 32-column pieces of a scale block (block 128, and 33 = one piece + a
# column); AVX2 takes 16 columns, then 8, then single ones (45, 30 and 25 = 16 + 8 + a tail; nf4 blocks of 25
# start on odd columns too); low-bit vectors start on a multiple of 8 columns (blocks of 25 and 45 start off it); T = 7 splits tokens into column spans, T >= 8 takes whole tokens, 65 an odd count
# past the threads' split.
FUSED_PATH_FORMATS = [("int8", 101, None), ("int8", 45, None), ("fp8_e4m3", 768, 128), ("fp8_e4m3", 99, 33),
                      ("fp8_e4m3", 90, 30), ("nf4", 768, 64), ("nf4", 101, None), ("nf4", 75, 25), ("q2", 96, 32),
                      ("q3", 75, 25), ("q1", 90, 45)]


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("fmt,D,block", FUSED_PATH_FORMATS, ids=str)
@pytest.mark.parametrize("T", [0, 1, 7, 64, 65])
@pytest.mark.parametrize("E", [1, 4, 17])
def test_fused_cpu_paths_match_float64(device, fmt, D, block, T, E):
    V, L = 13, 2
    q = quantize(make_table(V, L, E, D), fmt, block)
    deq = dequantize(q, torch.float32)
    scale = deq.abs().amax().double() * E
    ids_full = random_ids(V, (T, 2))
    ids, w = ids_full[:, 1], torch.rand(E, T).t()  # strided ids, transposed weights
    want = ref_fused(deq, ids, w, 1)
    got = quantized_lut_gather(q, ids, w, layer=1, dtype=torch.float32)
    assert got.shape == (T, D)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-5)
    # Into a bfloat16 out, added to what it holds (the sum starts from out: add0 = out).
    h = torch.randn(T, D).bfloat16()
    out = h.clone()
    quantized_lut_gather(q, ids, w, layer=1, out=out, accumulate=True)
    torch.testing.assert_close(out.double(), h.double() + want, atol=1.6e-2 * scale, rtol=1.6e-2)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("T", [3, 64])
def test_fused_fp8_every_code_and_nan_codes(device, T):
    """Every fp8 code (subnormals, both zeros, the largest) through the fused CPU sum, and the NaN codes
    0x7f / 0xff: a NaN code makes its column NaN and leaves every other column exact."""
    V, L, E, D = 3, 2, 4, 768
    q = quantize(torch.randn(V, L, E, D), "fp8_e4m3", 128)
    codes = [c for c in range(256) if c & 0x7F != 0x7F]
    g = torch.Generator().manual_seed(T)
    for v in range(V):
        for e in range(E):
            perm = torch.tensor(codes)[torch.randperm(len(codes), generator=g)]
            q.data[v, 1, e, :D] = perm.repeat(4)[:D].to(torch.uint8)
    q.data[1, 1, 2, 5] = 0x7F  # a NaN code in one row of token 1 ...
    q.data[1, 1, 0, 700] = 0xFF  # ... and a negative one in another
    q.data[2, 1, :, :D] = torch.randint(0, 16, (E, D), generator=g).to(torch.uint8) ^ 0x80 * (torch.arange(D) % 2)
    ids = torch.arange(T) % V
    w = torch.rand(T, E)
    want = ref_fused(dequantize(q, torch.float32), ids, w, 1)
    got = quantized_lut_gather(q, ids, w, layer=1, dtype=torch.float32)
    nan_cols = torch.zeros(T, D, dtype=torch.bool)
    nan_cols[ids == 1, 5] = nan_cols[ids == 1, 700] = True
    assert torch.equal(got.isnan(), nan_cols) and torch.equal(want.isnan(), nan_cols)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.nan_to_num().abs().max().item(), rtol=1e-5,
                               equal_nan=True)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("fmt,block", [("int8", None), ("fp8_e4m3", 128), ("nf4", 64), ("q3", 128), ("q2", 64),
                                       ("q1", 64)])
def test_combine_residual_and_shared_through_the_fused_cpu_sum(device, fmt, block):
    """lut_combine of a quantized table: residual + shared are the sum's start (add0 + add1)."""
    import mole_kernels

    V, L, E, D = 11, 2, 4, 768
    q = quantize(make_table(V, L, E, D), fmt, block)
    ids, logits = random_ids(V, (2, 9)), torch.randn(2, 9, E)
    residual, shared = torch.randn(2, 9, D).bfloat16(), torch.randn(2, 9, D).bfloat16()
    rows = dequantize(q, torch.float32).double()[ids][..., 1, :, :]
    want = residual.double() + shared.double() + (torch.softmax(logits.double(), -1)[..., None] * rows).sum(-2)
    got = mole_kernels.lut_combine(q, ids, logits, layer=1, residual=residual, shared=shared)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype,out_dtype", list(itertools.product(FLOAT_DTYPES, repeat=2)), ids=str)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "nf4", "q3", "q1"])
def test_fused_every_dtype_into_poisoned_out(device, w_dtype, out_dtype, id_dtype, fmt):
    V, L, E, D = 17, 2, 3, 64
    if fmt in ("q3", "q1") and device != "cpu":
        pytest.skip("the CUDA op refuses the low-bit formats (test_lowbit checks that it does)")
    q = quantize(torch.randn(V, L, E, D), fmt, 32 if fmt != "int8" else None)
    ids = random_ids(V, (9,), id_dtype)
    weights = torch.rand(9, E).to(w_dtype)
    want = ref_fused(dequantize(q, torch.float32), ids, weights, 1)
    qd, ids_d = place(q, ids, device)
    out = torch.full((9, D), float("nan"), dtype=out_dtype, device=ids_d.device)
    res = quantized_lut_gather(qd, ids_d, weights.to(ids_d.device), layer=1, out=out)
    assert res is out
    torch.testing.assert_close(out.cpu().double(), want, **TOLERANCES[out_dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
def test_fused_accumulates_into_out(device, out_dtype):
    V, L, E, D = 10, 3, 4, 96
    q = quantize(torch.randn(V, L, E, D), "nf4", 32)
    ids = random_ids(V, (2, 3))
    weights = torch.rand(2, 3, E)
    h = torch.randn(2, 3, D).to(out_dtype)
    want = h.double() + ref_fused(dequantize(q, torch.float32), ids, weights, 2)
    qd, ids_d = place(q, ids, device)
    out = h.to(ids_d.device)
    quantized_lut_gather(qd, ids_d, weights.to(ids_d.device), layer=2, out=out, accumulate=True)
    torch.testing.assert_close(out.cpu().double(), want, **TOLERANCES[out_dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_rows_into_poisoned_out_and_non_contiguous_inputs(device):
    V, L, E, D = 9, 2, 3, 64
    q = quantize(torch.randn(V, L, E, D), "fp8_e4m3", 32)
    deq = dequantize(q, torch.float32)
    ids_full = torch.randint(0, V, (6, 4), dtype=torch.int32)
    ids = ids_full[:, 1]  # strided
    w = torch.rand(E, 6).t()  # transposed
    assert not ids.is_contiguous() and not w.is_contiguous()
    qd, ids_d = place(q, ids_full, device)
    ids_d, w_d = ids_d[:, 1], w.to(ids_d.device)
    out = torch.full((6, L, E, D), float("nan"), device=ids_d.device)
    quantized_lut_gather(qd, ids_d, out=out)
    assert torch.equal(out.cpu(), deq[ids.long()])
    got = quantized_lut_gather(qd, ids_d, w_d, layer=0, dtype=torch.float32)
    torch.testing.assert_close(got.cpu().double(), ref_fused(deq, ids, w, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_ids_give_empty_results(device):
    q = quantize(torch.randn(5, 2, 3, 32), "int8")
    qd, ids_d = place(q, torch.zeros(0, dtype=torch.long), device)
    assert quantized_lut_gather(qd, ids_d).shape == (0, 2, 3, 32)
    w = torch.zeros(0, 3, device=ids_d.device)
    assert quantized_lut_gather(qd, ids_d, w, layer=1).shape == (0, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 5, 2 ** 40])
def test_out_of_range_id_raises_naming_it(device, bad):
    q = quantize(torch.randn(5, 2, 3, 32), "nf4", 16)
    ids = torch.tensor([0, bad, 1])
    qd, ids_d = place(q, ids, device)
    with pytest.raises(ValueError, match=rf"ids contains {bad} \(at flat position 1\), outside .*\[0, 5\)"):
        quantized_lut_gather(qd, ids_d)
    with pytest.raises(ValueError, match=rf"ids contains {bad}"):
        quantized_lut_gather(qd, ids_d, torch.rand(3, 3, device=ids_d.device), layer=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fault_counter_mode_zero_rows_and_counts(device):
    q = quantize(torch.randn(6, 2, 3, 64), "int8")
    deq = dequantize(q, torch.float32)
    ids = torch.tensor([1, 7, 2, -3])
    qd, ids_d = place(q, ids, device)
    faults = torch.zeros(1, dtype=torch.int64, device=ids_d.device)
    rows = quantized_lut_gather(qd, ids_d, faults=faults, dtype=torch.float32).cpu()
    assert (rows[1] == 0).all() and (rows[3] == 0).all()
    assert torch.equal(rows[0], deq[1]) and torch.equal(rows[2], deq[2])
    assert faults.item() == 2
    w = torch.rand(4, 3, device=ids_d.device)
    fused = quantized_lut_gather(qd, ids_d, w, layer=1, faults=faults).cpu()
    assert (fused[1] == 0).all() and (fused[3] == 0).all()
    assert faults.item() == 4


def test_bad_gather_arguments_name_the_argument():
    q = quantize(torch.randn(5, 2, 3, 32), "nf4", 16)
    ids = torch.tensor([0, 1])
    w = torch.rand(2, 3)
    cases = [
        (lambda: quantized_lut_gather(torch.randn(5, 2, 3, 32), ids), "q must be a QuantizedLUT"),
        (lambda: quantized_lut_gather(q, ids.float()), "ids must be int32 or int64"),
        (lambda: quantized_lut_gather(q, ids, w), "`layer` must say which layer"),
        (lambda: quantized_lut_gather(q, ids, torch.rand(2, 4), layer=0), r"weights must have shape .*\[2, 3\]"),
        (lambda: quantized_lut_gather(q, ids, layer=2), r"layer must be in \[0, 2\)"),
        (lambda: quantized_lut_gather(q, ids, w, layer=0, accumulate=True), "accumulate=True needs out="),
        (lambda: quantized_lut_gather(q, ids, out=torch.empty(2, 3, 32)), r"out must have shape \[2, 2, 3, 32\]"),
        (lambda: quantized_lut_gather(q, ids, out=torch.empty(2, 2, 3, 32), dtype=torch.half), "disagrees with out"),
        (lambda: quantized_lut_gather(q, ids, dtype=torch.int32), "dtype must be float32, float16 or bfloat16"),
        (lambda: quantized_lut_gather(q, ids, faults=torch.zeros(1)), "faults must be a contiguous int64"),
        (lambda: torch.ops.mole_kernels.lut_gather_quant(q.data[..., :16].contiguous(), "nf4", 32, 16, ids),
         "data rows are 16 bytes, but format 'nf4' with dim=32 and block_size=16 needs 32"),
        (lambda: torch.ops.mole_kernels.lut_gather_quant(q.data, "nf3", 32, 16, ids), "unknown format 'nf3'"),
        (lambda: torch.ops.mole_kernels.lut_gather_quant(q.data, "nf4", 32, 5, ids), "block_size must divide dim"),
        (lambda: QuantizedLUT(q.data, "nf4", 32, 16).to(torch.float32), "only the device can change"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


@requires_cuda
def test_cuda_pageable_table_with_cuda_ids_is_an_error():
    q = quantize(torch.randn(5, 2, 3, 32), "int8")
    with pytest.raises(ValueError, match="pageable"):
        quantized_lut_gather(q, torch.tensor([0, 1], device="cuda"))


@requires_cuda
def test_cuda_zero_copy_is_graph_capturable():
    q = quantize(torch.randn(64, 2, 4, 768), "nf4", 64).pin_memory()
    ids = torch.randint(0, 64, (8,), device="cuda")
    w = torch.rand(8, 4, device="cuda")
    out = torch.zeros(8, 768, device="cuda", dtype=torch.bfloat16)
    faults = torch.zeros(1, dtype=torch.int64, device="cuda")
    quantized_lut_gather(q, ids, w, layer=1, out=out, faults=faults)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        quantized_lut_gather(q, ids, w, layer=1, out=out, faults=faults)
    out.zero_()
    graph.replay()
    want = ref_fused(dequantize(q, torch.float32), ids, w, 1)
    torch.testing.assert_close(out.cpu().double(), want, **TOLERANCES[torch.bfloat16])
    assert faults.item() == 0


def sample_inputs(device):
    q = quantize(torch.randn(9, 2, 3, 64), "nf4", 32)
    ids = torch.randint(0, 9, (2, 3))
    w = torch.rand(2, 3, 3)
    qd, ids_d = place(q, ids, device)
    w = w.to(ids_d.device)
    args = (qd.data, qd.format, qd.dim, qd.block_size, ids_d)
    op, op_out = torch.ops.mole_kernels.lut_gather_quant.default, torch.ops.mole_kernels.lut_gather_quant_out.default
    yield op, (*args, None, None, torch.bfloat16)
    yield op, (*args, w, 1, torch.float32)
    yield op, (*args, None, 0, None)
    out = torch.randn(2, 3, 64, device=ids_d.device)
    yield op_out, (out, *args, w, 0, True, None)
    faults = torch.zeros(1, dtype=torch.int64, device=ids_d.device)
    yield op_out, (out.clone(), *args, w, 0, False, faults)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in sample_inputs(device):
        torch.library.opcheck(op, args)


# The capped child runs' selection: the CPU cases of the gather tests, and the ISA report.
SCALAR_CHILD_TESTS = ("test_rows_equal_dequantized_table", "test_fused_matches_float64", "test_fused_accumulates_into_out",
                      "test_fused_cpu_paths_match_float64", "test_fused_fp8_every_code_and_nan_codes",
                      "test_combine_residual_and_shared_through_the_fused_cpu_sum")


ISA_TEST = os.path.join(os.path.dirname(__file__), "test_lut_gather.py::test_reported_cpu_isa_follows_the_cpu_and_the_cap")


@pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.child_run(
        args=[__file__, ISA_TEST, "-k", f"({' or '.join(SCALAR_CHILD_TESTS)}) and cpu or reported_cpu_isa"],
        env={"MOLE_KERNELS_CPU_ISA": isa}))
    for isa in ("scalar", "avx2")])
def test_capped_cpu_paths(isa, request):
    """The CPU kernel picks AVX-512, AVX2 or scalar decoding at run time; run the CPU gather tests capped at
    each lower one."""
    result = child_result(request)
    gather = module_tests(globals(), lambda fn: fn.__name__ in SCALAR_CHILD_TESTS)
    assert_child_ran(result, count_cases(gather, {"device": "cpu"}) + (expected_cpu_isa() is not None))


def test_lut_gather_is_the_one_public_way():
    """mole_kernels.lut_gather takes a QuantizedLUT too, and gives exactly what the quantized op gives."""
    import mole_kernels

    lut = torch.randn(9, 2, 3, 64)
    q = mole_kernels.quantize(lut, "nf4", 64)
    ids = torch.tensor([[1, 8], [8, 0]])
    w = torch.rand(2, 2, 3)
    assert torch.equal(mole_kernels.lut_gather(q, ids), quantized_lut_gather(q, ids))
    assert torch.equal(mole_kernels.lut_gather(q, ids, w, layer=1), quantized_lut_gather(q, ids, w, layer=1))
    want = (dequantize(q, torch.float64)[ids][:, :, 1] * w.double()[..., None]).sum(-2)
    torch.testing.assert_close(mole_kernels.lut_gather(q, ids, w, layer=1).double(), want, atol=1e-5, rtol=1e-5)


# ---- the public call's direct path (plain CPU eager: _C._lut_gather_quant, past the dispatcher) ----------

# (V, L, E, D, format, block): every format, odd D, E = 1, 3-D tables (L None).
DIRECT_CASES = [(11, 3, 4, 96, "int8", None), (9, None, 3, 21, "fp8_e4m3", 7), (5, 2, 3, 7, "nf4", None),
                (13, 2, 4, 768, "nf4", 64), (7, 2, 1, 37, "q3", 37), (6, 2, 2, 64, "q2", 32),
                (5, None, 3, 40, "q1", 8)]


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def _direct(q, ids, weights, layer, dtype):
    from mole_kernels import _C
    return _C._lut_gather_quant(q.data, q.format, q.dim, q.block_size, ids, weights, layer, dtype, None)


@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: f"{c[4]}-b{c[5]}-V{c[0]}L{c[1]}E{c[2]}D{c[3]}")
@pytest.mark.parametrize("T", [0, 1, 7])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
def test_direct_path_equals_the_op_and_float64(case, T, id_dtype, out_dtype):
    """The direct call gives bit for bit what the op gives (both forms, layer None or an int, repeated ids),
    and the fused form matches float64 sums of the dequantized table."""
    V, L, E, D, fmt, block = case
    q = quantize(make_table(V, L, E, D), fmt, block)
    ids, w = random_ids(V, (T,), id_dtype), torch.rand(T, E)
    layer = None if L is None else L - 1
    ops = torch.ops.mole_kernels
    for weights, lay in ((None, None), (None, layer), (w, layer)):
        got = _direct(q, ids, weights, lay, out_dtype)
        assert got is not NotImplemented
        want = ops.lut_gather_quant(q.data, q.format, q.dim, q.block_size, ids, weights, lay, out_dtype, None)
        assert got.dtype == out_dtype and got.shape == want.shape and torch.equal(got, want)
        assert torch.equal(quantized_lut_gather(q, ids, weights, layer=lay, dtype=out_dtype), want)
    deq = dequantize(q, torch.float32)
    scale = deq.abs().amax().double()
    torch.testing.assert_close(got.double(), ref_fused(deq, ids, w, layer), atol=1e-5 * scale * E + 1e-2 * (
        out_dtype != torch.float32) * scale, rtol=1e-5 if out_dtype == torch.float32 else 1e-2)


def test_direct_path_is_taken_only_when_nothing_needs_to_see_the_op():
    q = quantize(make_table(6, 2, 3, 32), "nf4", 16)
    ids, w = torch.tensor([5, 0, 5]), torch.rand(3, 3)
    assert _direct(q, ids, w, 1, torch.float32) is not NotImplemented
    with torch.no_grad():
        assert _direct(q, ids, w.requires_grad_(), 1, torch.float32) is not NotImplemented
    assert _direct(q, ids, w, 1, torch.float32) is NotImplemented  # grad mode on, weights require grad
    w = w.detach()
    assert _direct(q, ids, w.as_subclass(_Subclass), 1, None) is NotImplemented  # its __torch_function__ may act
    with _OpLog() as log:  # a dispatch mode sees every call: through the op
        assert _direct(q, ids, w, 1, None) is NotImplemented
        got = quantized_lut_gather(q, ids, w, layer=1)
    assert log.ops.count("mole_kernels.lut_gather_quant.default") == 1
    assert torch.equal(got, quantized_lut_gather(q, ids, w, layer=1))


@pytest.mark.parametrize("call, match", [
    (lambda q, ids, w: quantized_lut_gather(q, ids + 100, w, layer=0), "ids contains 105"),
    (lambda q, ids, w: quantized_lut_gather(q, ids, w), "`layer` must say which layer"),
    (lambda q, ids, w: quantized_lut_gather(q, ids, w[:, :2], layer=0), "weights must have shape"),
    (lambda q, ids, w: quantized_lut_gather(q, ids.float(), w, layer=0), "ids must be int32 or int64"),
    (lambda q, ids, w: quantized_lut_gather(q, ids, w, layer=5), "layer must be in"),
])
def test_direct_path_errors_are_the_ops(call, match):
    """Bad input raises the op's ValueError, word for word, through the direct path and through the op."""
    q = quantize(make_table(6, 2, 3, 32), "int8")
    ids, w = torch.tensor([5, 0, 5]), torch.rand(3, 3)
    with pytest.raises(ValueError, match=match) as direct:
        call(q, ids, w)
    with _OpLog(), pytest.raises(ValueError, match=match) as via_op:
        call(q, ids, w)
    assert str(direct.value) == str(via_op.value)
