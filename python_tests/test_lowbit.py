"""The low-bit table formats (q3, q2, q1), mixed precision by token frequency, and the quality gate.

Every kernel result is compared with a float64 reference built here from the packed bytes by an
independent decoder (Python integers and float16 bytes), not with mole_kernels' own decoder.
"""
import os
import struct

import pytest
import torch

import mole_kernels
from mole_kernels.mixed import (MixedLUT, dequantize_mixed, load_mixed, mixed_lut_gather, quantize_mixed, save_mixed,
                                token_counts)
from mole_kernels.quant import LOWBIT, QuantizedLUT, dequantize, quantize, quantized_lut_gather, row_layout
from conftest import assert_child_ran, child_result, count_cases, module_tests, requires_cuda

LOW = tuple(LOWBIT)
# (shape [V, L, E, D] or [V, E, D], block): odd D, one block per row, E = 1, blocks not multiples of 16.
# Blocks of 20 start at column 20: off the 8-column boundary where vector decoding starts.
CASES = [((23, 2, 3, 128), None), ((17, 4, 37), 37), ((9, 1, 1, 200), 40), ((31, 3, 2, 96), 32),
         ((5, 2, 1, 24), 8), ((12, 2, 48), 16), ((13, 2, 2, 60), 20)]


def ref_decode(q: QuantizedLUT) -> torch.Tensor:
    """float64 [..., D] from the packed bytes: the bit stream read with Python integers; each value
    is scale * level (float16 scale, float32 level: exact in float64) rounded once to float32, as
    the format defines it."""
    bits, levels, _ = LOWBIT[q.format]
    levels = [struct.unpack("<f", struct.pack("<f", v))[0] for v in levels]
    payload, off, row_bytes = row_layout(q.format, q.dim, q.block_size)
    rows = q.data.reshape(-1, row_bytes).tolist()
    out = torch.empty(len(rows), q.dim, dtype=torch.float64)
    for r, row in enumerate(rows):
        stream = int.from_bytes(bytes(row[:payload]), "little")
        scales = struct.unpack(f"<{q.dim // q.block_size}e", bytes(row[off:]))
        for j in range(q.dim):
            out[r, j] = scales[j // q.block_size] * levels[(stream >> (bits * j)) & ((1 << bits) - 1)]
    return out.float().double().reshape(q.shape)


def random_lut(shape, dtype=torch.float32):
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3  # rows of different magnitudes
    x[0] = 0.0  # an all-zero token
    return x.to(dtype)


def lowbit_table(fmt, shape, block, dtype=torch.float32):
    return quantize(random_lut(shape, dtype), fmt, block)


# ------------------------------------------------------------------ layout and encoding -----

@pytest.mark.parametrize("fmt, D, block, row_bytes", [
    ("q3", 128, 128, 48 + 2), ("q2", 128, 64, 32 + 4), ("q1", 128, 64, 16 + 4), ("q1", 128, 128, 16 + 2),
    ("q3", 37, 37, 14 + 2), ("q2", 37, 37, 10 + 2), ("q1", 37, 37, 5 + 1 + 2), ("q3", 24, 8, 9 + 1 + 6)])
def test_row_layout_counts_every_byte(fmt, D, block, row_bytes):
    assert row_layout(fmt, D, block)[2] == row_bytes
    q = quantize(torch.randn(3, 2, D), fmt, block)
    assert q.row_bytes == row_bytes and q.bits_per_value == 8 * row_bytes / D
    assert q.nbytes == 3 * 2 * row_bytes


def test_bits_per_value_at_d128_meets_the_layout_promise():
    assert quantize(torch.randn(2, 1, 128), "q3").bits_per_value == 3.125
    assert quantize(torch.randn(2, 1, 128), "q2").bits_per_value == 2.25
    assert quantize(torch.randn(2, 1, 128), "q1", 128).bits_per_value == 1.125


@pytest.mark.parametrize("fmt", LOW)
@pytest.mark.parametrize("shape, block", CASES)
def test_dequantize_equals_independent_decoder(fmt, shape, block):
    q = lowbit_table(fmt, shape, block)
    want = ref_decode(q)
    assert torch.equal(dequantize(q, torch.float32).double(), want)  # s * level: one rounding, exact in float64
    assert (q.scales()[0] == 0).all() and (want[0] == 0).all()  # the all-zero token decodes to zeros


@pytest.mark.parametrize("fmt", LOW)
def test_scales_minimise_error_better_than_absmax(fmt):
    """The encoder's scale beats the absmax scale (the naive choice) on every block, within float16 rounding."""
    x = torch.randn(64, 1, 128)
    q = quantize(x, fmt, 32)
    _, levels, _ = LOWBIT[fmt]
    lv = torch.tensor(levels, dtype=torch.float64)
    xb = x.double().reshape(-1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    naive = amax * lv[((xb / amax)[..., None] - lv).abs().argmin(-1)]
    err_naive = ((xb - naive) ** 2).sum(-1)
    err = ((xb - dequantize(q, torch.float32).double().reshape(-1, 32)) ** 2).sum(-1)
    assert (err <= err_naive * 1.002 + 1e-12).all()
    assert err.sum() < 0.9 * err_naive.sum()  # and clearly better overall


def _fit_lowbit_by_passes(xb: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The scale search as it was before the sorted-prefix-sum encoder: one pass over the values per
    candidate scale (bucketize, gather, squared error in float32). The reference of the test below."""
    import mole_kernels.quant as q

    ax = xb.abs()
    if len(levels) == 2:  # sign: the optimum is the mean magnitude
        return ax.mean(-1, keepdim=True)
    amax = ax.amax(-1, keepdim=True)
    safe = torch.where(amax > 0, amax, 1.0)

    def err_of(s):
        c = levels[q._nearest(xb / s, levels)]
        return ((xb - s * c) ** 2).sum(-1, keepdim=True), c

    best_s, best_err = amax, err_of(safe)[0]
    for f in q._SCALE_GRID:
        s = safe * f
        err = err_of(s)[0]
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    for _ in range(q._REFINE_STEPS):
        c = levels[q._nearest(xb / torch.where(best_s > 0, best_s, 1.0), levels)]
        s = ((xb * c).sum(-1, keepdim=True) / (c * c).sum(-1, keepdim=True)).clamp_(min=0)
        err = err_of(torch.where(s > 0, s, 1.0))[0]
        better = (err < best_err) & (s > 0)
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return torch.where(amax > 0, best_s, 0.0)


@pytest.mark.parametrize("fmt, block", [("q3", 128), ("q3", 37), ("q2", 64), ("q2", 8)])
def test_scale_search_matches_the_pass_per_candidate_search(fmt, block, monkeypatch):
    """The sorted-prefix-sum scale search picks what one pass per candidate scale picked (float16 scales
    equal but where float rounding moves a near-tie) and never a worse one."""
    import mole_kernels.quant as q

    x = torch.randn(3000, 1, block) * torch.rand(3000, 1, 1) * 3
    x[:20] = 0.0
    x[20:30] = 1.5  # constant blocks
    x[30:300] = torch.randn(270, 1, block) ** 3  # heavy tails
    new = quantize(x, fmt, block)
    monkeypatch.setattr(q, "_fit_lowbit", _fit_lowbit_by_passes)
    old = quantize(x, fmt, block)
    same = (new.scales() == old.scales()).all(-1)
    assert same.double().mean() > 0.995

    def err(t):
        return ((dequantize(t, torch.float32).double() - x.double()) ** 2).sum(-1)

    e_new, e_old = err(new), err(old)
    assert torch.equal(new.data[same], old.data[same])  # the same scale gives the same codes
    assert (e_new <= e_old * 1.001 + 1e-12).all() and e_new.sum() <= e_old.sum() * (1 + 1e-6)


def test_q1_scale_is_the_mean_magnitude():
    x = torch.randn(4, 2, 64)
    q = quantize(x, "q1", 16)
    want = x.abs().reshape(4, 2, 4, 16).mean(-1).half().float()
    assert torch.equal(q.scales(), want)
    assert torch.equal(dequantize(q, torch.float32).sign(), torch.where(x >= 0, 1.0, -1.0))


def test_scale_overflow_is_refused():
    with pytest.raises(ValueError, match="float16"):
        quantize(torch.full((2, 1, 16), 1e6), "q2", 16)


@pytest.mark.parametrize("fmt", LOW)
@pytest.mark.parametrize("magnitude", [torch.finfo(torch.float32).max, 7e4, 6e4, 1e-8, 1e-40, 3e-44])
def test_extreme_tables_are_refused_or_stay_finite(fmt, magnitude):
    """Blocks past float16's range are refused; tiny blocks decode to finite values (zeros below 2^-24)."""
    x = (torch.rand(3, 2, 2, 32, dtype=torch.float64) * 2 - 1) * magnitude
    x[..., 0], x[..., 17] = magnitude, -magnitude
    x = x.float()
    if fmt == "q1" and magnitude == 7e4:  # q1's scale is the mean magnitude (~3.6e4): it fits float16
        pass
    elif magnitude > 6.6e4:
        with pytest.raises(ValueError, match="float16"):
            quantize(x, fmt, 16)
        return
    q = quantize(x, fmt, 16)
    deq = dequantize(q, torch.float32)
    ids = torch.tensor([0, 2, 1])
    rows = quantized_lut_gather(q, ids, dtype=torch.float32)
    fused = quantized_lut_gather(q, ids, torch.full((3, 2), 0.5), layer=1, dtype=torch.float32)
    for t in (deq, rows, fused):
        assert torch.isfinite(t).all()
    assert torch.equal(rows.double(), ref_decode(q)[ids])
    if magnitude < 2 ** -25:
        assert (deq == 0).all()
    else:  # the error stays within the block's magnitude
        assert ((deq - x).abs() <= 1.01 * magnitude).all()


@pytest.mark.parametrize("fmt", LOW)
def test_metadata_round_trip_and_corruption(fmt, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    q = lowbit_table(fmt, (20, 2, 3, 37), 37)
    path = tmp_path / "t.safetensors"
    save_file({"lut": q.data}, str(path), metadata=q.metadata())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    back = QuantizedLUT.from_metadata(load_file(str(path))["lut"], meta)
    assert torch.equal(back.data, q.data) and back.format == fmt and back.block_size == 37
    payload, off, _ = row_layout(fmt, 37, 37)
    bad = q.data.clone()
    bad[-1, 0, 0, off:off + 2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # float16 +inf scale
    with pytest.raises(ValueError, match="scales"):
        QuantizedLUT.from_metadata(bad, meta)
    if (37 * LOWBIT[fmt][0]) % 8:  # unused bits after the last code must be zero
        bad = q.data.clone()
        bad[0, 1, 2, payload - 1] |= 0x80
        with pytest.raises(ValueError, match="padding"):
            QuantizedLUT.from_metadata(bad, meta)
    with pytest.raises(ValueError, match="bytes per row"):  # metadata of another block size
        QuantizedLUT.from_metadata(q.data, dict(meta, **{"mole_kernels.block_size": "1"}))


# ------------------------------------------------------------------ the CPU gather ----------

@pytest.mark.parametrize("fmt", LOW)
@pytest.mark.parametrize("shape, block", CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_rows_equal_dequantized_table(fmt, shape, block, out_dtype):
    q = lowbit_table(fmt, shape, block)
    ids = torch.randint(0, shape[0], (2, 7))
    ids[0, :3] = ids[1, 0]  # repeated ids
    got = quantized_lut_gather(q, ids, dtype=out_dtype)
    want = ref_decode(q)[ids]
    assert got.dtype == out_dtype and got.shape == want.shape
    if out_dtype == torch.float32:
        assert torch.equal(got.double(), want)
    else:
        assert torch.equal(got, want.float().to(out_dtype))


@pytest.mark.parametrize("fmt", LOW)
@pytest.mark.parametrize("shape, block", CASES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_fused_matches_float64(fmt, shape, block, id_dtype):
    q = lowbit_table(fmt, shape, block)
    E, L = shape[-2], (shape[1] if len(shape) == 4 else 1)
    T = 11
    ids = torch.randint(0, shape[0], (T,), dtype=id_dtype)
    w = torch.rand(T, E)
    deq = ref_decode(q)
    for layer in range(L) if len(shape) == 4 else [None]:
        rows = deq[ids.long()] if layer is None else deq[ids.long(), layer]
        want = (w.double()[..., None] * rows).sum(-2)
        out = torch.full((T, shape[-1]), float("nan"))  # poisoned: every element must be written
        quantized_lut_gather(q, ids, w, layer=layer, out=out)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("fmt", LOW)
def test_fused_accumulates_and_non_contiguous_inputs(fmt):
    q = lowbit_table(fmt, (40, 3, 4, 96), 32)
    ids = torch.randint(0, 40, (9, 2))[:, 0]  # non-contiguous
    w = torch.rand(4, 9).t()  # non-contiguous
    base = torch.randn(9, 96)
    out = base.clone()
    quantized_lut_gather(q, ids, w, layer=1, out=out, accumulate=True)
    want = base.double() + (w.double()[..., None] * ref_decode(q)[ids, 1]).sum(-2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", LOW)
def test_lut_combine_reads_lowbit_tables(fmt):
    """The decode path's one call per layer (softmax, gather, residual and shared adds) on a low-bit table."""
    q = lowbit_table(fmt, (33, 3, 4, 72), 24)
    ids = torch.randint(0, 33, (6,))
    logits, res, sh = torch.randn(6, 4), torch.randn(6, 72), torch.randn(6, 72)
    got = mole_kernels.lut_combine(q, ids, logits, layer=2, residual=res, shared=sh)
    p = torch.softmax(logits.double(), -1)
    want = res.double() + sh.double() + (p[..., None] * ref_decode(q)[ids, 2]).sum(-2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", LOW)
def test_empty_ids_and_bad_ids(fmt):
    q = lowbit_table(fmt, (6, 2, 16), 16)
    assert quantized_lut_gather(q, torch.empty(0, dtype=torch.int64)).shape == (0, 2, 16)
    with pytest.raises((ValueError, RuntimeError), match="6"):
        quantized_lut_gather(q, torch.tensor([0, 6]))


@requires_cuda
@pytest.mark.parametrize("pinned", [False, True])
def test_lowbit_on_cuda_is_refused_clearly(pinned):
    """No CUDA kernel for the low-bit formats yet: a VRAM or pinned (zero-copy) table is refused, naming why."""
    q = lowbit_table("q2", (6, 2, 16), 16)
    q = q.pin_memory() if pinned else q.to("cuda")
    with pytest.raises((ValueError, RuntimeError), match="CPU kernel only"):
        quantized_lut_gather(q, torch.tensor([0, 1], device="cuda"))


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_lookup_table_serves_lowbit_rows_and_files_round_trip(placement, tmp_path):
    """The tiered table holds, saves, reopens and gathers q2 rows like any quantized table."""
    from mole_kernels.table import LookupTable

    lut = random_lut((30, 2, 3, 64))
    q = quantize(lut, "q2", 32)
    ids = torch.tensor([3, 29, 3, 0])
    want = ref_decode(q)[ids].float()
    with LookupTable.from_tensor(lut, "host", format="q2", block_size=32) as t:
        assert t.format == "q2" and t.row_bytes == q.bytes_per_token
        assert torch.equal(t.gather(ids).float(), want.to(t.dtype).float())
        t.save(tmp_path / "q2.safetensors")
    with LookupTable.open(tmp_path / "q2.safetensors", placement) as t:
        assert t.format == "q2" and t.block_size == 32
        assert torch.equal(t.gather(ids, layer=1).float(), want[:, 1].to(t.dtype).float())


# ------------------------------------------------------------------ mixed precision ---------

def mixed_case(L=2, E=3, D=40, V=50):
    lut = random_lut((V, L, E, D))
    counts = torch.randint(0, 1000, (V,))
    plan = [(None, 4), ("int8", 6), ("q3", 10), ("q1", None)]
    return lut, counts, quantize_mixed(lut, counts, plan, block_sizes=[None, None, 20, 8])


def test_mixed_parts_follow_frequency_and_cover_every_row():
    lut, counts, m = mixed_case()
    order = torch.sort(counts.double(), descending=True, stable=True).indices
    assert [p.shape[0] if isinstance(p, torch.Tensor) else p.vocab_size for p in m.parts] == [4, 6, 10, 30]
    assert m.starts == (0, 4, 10, 20)
    assert torch.equal(m.rank[order].long(), torch.arange(50))
    assert torch.equal(m.parts[0], lut[order[:4]])  # the most frequent rows, kept in float
    assert m.parts[3].format == "q1" and m.parts[2].block_size == 20
    assert torch.equal(dequantize_mixed(m, torch.float32)[order[20:]], dequantize(m.parts[3], torch.float32))
    bits = 8 * (sum(p.numel() * 4 if isinstance(p, torch.Tensor) else p.nbytes for p in m.parts) + 4 * 50) / lut.numel()
    assert m.bits_per_value == bits


@pytest.mark.parametrize("layer", [None, 0, 1])
def test_mixed_gather_rows_land_in_every_part(layer):
    lut, counts, m = mixed_case()
    full = dequantize_mixed(m, torch.float32).double()
    order = torch.sort(counts.double(), descending=True, stable=True).indices
    ids = torch.stack([order[0], order[5], order[15], order[40], order[3], order[0]])  # one per part, repeats
    want = full[ids] if layer is None else full[ids, layer]
    got = mixed_lut_gather(m, ids, layer=layer, dtype=torch.float32)
    assert torch.equal(got.double(), want)
    if layer is not None:
        w = torch.rand(6, 3)
        fused = mixed_lut_gather(m, ids.view(2, 3), w.view(2, 3, 3), layer=layer, dtype=torch.float32)
        torch.testing.assert_close(fused.double().view(6, -1), (w.double()[..., None] * want).sum(-2),
                                   rtol=1e-5, atol=1e-5)


def test_mixed_bad_ids_and_parts():
    lut, counts, m = mixed_case()
    with pytest.raises(ValueError, match="contains 50"):
        mixed_lut_gather(m, torch.tensor([1, 50]))
    with pytest.raises(ValueError, match="permutation"):
        MixedLUT(torch.zeros(50, dtype=torch.int32), m.parts)
    with pytest.raises(ValueError, match="rows"):
        MixedLUT(m.rank, m.parts[:-1])
    with pytest.raises(ValueError, match="remain"):
        quantize_mixed(lut, counts, [("q2", 60)])
    with pytest.raises(ValueError, match="covers"):
        quantize_mixed(lut, counts, [("q2", 10)])


def test_mixed_file_round_trip_and_corruption(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    lut, counts, m = mixed_case()
    path = tmp_path / "m.safetensors"
    save_mixed(path, m)
    back = load_mixed(path)
    assert back.describe() == m.describe() and torch.equal(back.rank, m.rank)
    assert torch.equal(dequantize_mixed(back, torch.float32), dequantize_mixed(m, torch.float32))
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    bad_rank = dict(tensors, rank=torch.zeros_like(tensors["rank"]))
    save_file(bad_rank, str(tmp_path / "bad1.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="permutation"):
        load_mixed(tmp_path / "bad1.safetensors")
    part = tensors["part3"].clone()
    part[-1, 0, 0, -2:] = torch.tensor([0x00, 0xFC], dtype=torch.uint8)  # a -inf scale in the last token
    save_file(dict(tensors, part3=part), str(tmp_path / "bad2.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="scales"):
        load_mixed(tmp_path / "bad2.safetensors")
    save_file(tensors, str(tmp_path / "bad3.safetensors"))  # no metadata
    with pytest.raises(ValueError, match="not a mixed table"):
        load_mixed(tmp_path / "bad3.safetensors")


def int8_decode(q: QuantizedLUT) -> torch.Tensor:
    """float64 rows of an int8 table from its bytes: int8 codes times the row's float32 scale."""
    _, off, row_bytes = row_layout(q.format, q.dim, q.block_size)
    rows = q.data.reshape(-1, row_bytes)
    scale = torch.tensor([struct.unpack("<f", bytes(r[off:off + 4].tolist()))[0] for r in rows], dtype=torch.float64)
    return (rows[:, :q.dim].view(torch.int8).double() * scale[:, None]).float().double().reshape(q.shape)


def normalised_case(shape=(50, 2, 3, 40)):
    lut = random_lut(shape)
    lut += torch.randn(shape[1:]) * 5  # column offsets and scales that differ by (layer, expert)
    lut *= torch.rand(shape[1:]) * 4 + 0.1
    counts = torch.randint(0, 1000, (shape[0],))
    plan = [(None, 4), ("int8", 6), ("q3", 10), ("q2", 10), ("q1", None)]
    blocks = [None, None, 20 if shape[-1] % 20 == 0 else None, None, 8 if shape[-1] % 8 == 0 else None]
    return lut, counts, quantize_mixed(lut, counts, plan, block_sizes=blocks, normalize=True)


def test_normalised_mixed_stores_the_normalised_table_and_counts_its_bytes():
    lut, counts, m = normalised_case()
    w = counts.double() + 1
    w /= w.sum()
    mean = torch.einsum("v,vled->led", w, lut.double())
    rms = torch.einsum("v,vled->led", w, (lut.double() - mean) ** 2).sqrt()
    torch.testing.assert_close(m.offset.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.col_scale.double(), rms, rtol=1e-6, atol=1e-6)
    order = torch.sort(counts.double(), descending=True, stable=True).indices
    torch.testing.assert_close(m.parts[0].double(), ((lut[order[:4]].double() - mean) / rms), rtol=1e-5, atol=1e-5)
    assert m.describe().startswith("norm(") and m.normalized
    parts = sum(p.numel() * 4 if isinstance(p, torch.Tensor) else p.nbytes for p in m.parts)
    assert m.nbytes == parts + 4 * 50 + 2 * 4 * 2 * 3 * 40  # rank map, offset and col_scale counted
    # the table it stands for, from an independent float64 decoder of every part's bytes
    want = torch.empty(lut.shape, dtype=torch.float64)
    for s, p in zip(m.starts, m.parts):
        x = p.double() if isinstance(p, torch.Tensor) else ref_decode(p) if p.format in LOWBIT else int8_decode(p)
        want[order[s:s + x.shape[0]]] = x * m.col_scale.double() + m.offset.double()
    torch.testing.assert_close(dequantize_mixed(m, torch.float32).double(), want, rtol=1e-6, atol=1e-5)
    # normalising makes the narrow parts closer to the table than quantizing it as it is
    plain = quantize_mixed(lut, counts, [(None, 4), ("int8", 6), ("q3", 10), ("q2", 10), ("q1", None)],
                           block_sizes=[None, None, 20, None, 8])
    err = lambda t: ((dequantize_mixed(t, torch.float32) - lut)[order[20:]] ** 2).sum()  # noqa: E731
    assert err(m) < 0.5 * err(plain)


@pytest.mark.parametrize("shape", [(50, 2, 3, 40), (37, 1, 1, 37), (33, 3, 24)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_normalised_mixed_gather_matches_float64(shape, out_dtype):
    lut, counts, m = normalised_case(shape)
    full = dequantize_mixed(m, torch.float32).double()
    order = torch.sort(counts.double(), descending=True, stable=True).indices
    ids = torch.stack([order[0], order[5], order[15], order[25], order[-1], order[0], order[3]])  # every part, repeats
    layers = [None] if len(shape) == 3 else [None, 0, shape[1] - 1, slice(0, shape[1])]
    E = shape[-2]
    for layer in layers:
        want = full[ids] if layer is None else full[ids, layer]
        got = mixed_lut_gather(m, ids, layer=layer, dtype=out_dtype)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.double(), want.to(out_dtype).double(), rtol=0, atol=0)
        if layer is None and len(shape) == 4 or isinstance(layer, slice):
            continue
        w = torch.rand(7, E)
        fused = mixed_lut_gather(m, ids.view(7, 1), w.view(7, 1, E), layer=layer, dtype=out_dtype)
        ref = (w.double()[..., None] * want).sum(-2)
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(fused.double().view(7, -1), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_normalised_mixed_files_round_trip_and_corruption(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    lut, counts, m = normalised_case()
    path = tmp_path / "n.safetensors"
    save_mixed(path, m)
    back = load_mixed(path)
    assert back.normalized and back.describe() == m.describe() and back.nbytes == m.nbytes
    assert torch.equal(dequantize_mixed(back, torch.float32), dequantize_mixed(m, torch.float32))
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    bad = {"no_scale": {k: v for k, v in tensors.items() if k != "col_scale"},
           "nan_offset": dict(tensors, offset=torch.full_like(tensors["offset"], float("nan"))),
           "negative": dict(tensors, col_scale=-tensors["col_scale"]),
           "shape": dict(tensors, offset=tensors["offset"][:1].contiguous()),
           "dtype": dict(tensors, col_scale=tensors["col_scale"].half())}
    for name, t in bad.items():
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match="offset|col_scale"):
            load_mixed(tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError, match="normalize"):
        quantize_mixed(lut, counts, [("q2", None)], normalize=1)


# ------------------------------------------------------------------ factored parts ---------

def factored_ref(q) -> torch.Tensor:
    """float64 rows of a FactoredLUT from its bytes (Python integers, float16 bytes), an independent decoder."""
    from mole_kernels.factored import row_bytes

    r, bits = q.rank, q.bits
    rows = q.data.reshape(-1, row_bytes(r, bits)).tolist()
    basis = q.basis.double().reshape(-1, r, q.dim)
    coef = torch.empty(len(rows), r, dtype=torch.float64)
    for i, row in enumerate(rows):
        stream = int.from_bytes(bytes(row[:-2]), "little")
        scale = struct.unpack("<e", bytes(row[-2:]))[0]
        for j in range(r):
            coef[i, j] = scale * (((stream >> (bits * j)) & ((1 << bits) - 1)) - (1 << (bits - 1)))
    blocks = basis.shape[0]
    coef = coef.view(-1, blocks, r)
    return torch.einsum("vkr,krd->vkd", coef, basis).reshape(q.shape)


@pytest.mark.parametrize("shape, rank, bits", [((40, 2, 3, 24), 5, 3), ((33, 1, 1, 37), 37, 8), ((21, 3, 17), 4, 6),
                                               ((9, 2, 2, 16), 12, 5)])  # rank > V-ish, odd D, bits not dividing 8
def test_factored_table_decodes_as_its_bytes_say(shape, rank, bits):
    from mole_kernels.factored import dequantize_factored, factored_lut_gather, factorize

    lut = random_lut(shape)
    counts = torch.randint(0, 100, (shape[0],))
    q = factorize(lut, rank, bits, counts=counts)
    assert q.format == f"f{rank}x{bits}" and q.basis.dtype == torch.float16
    assert q.nbytes == q.data.numel() + 2 * q.basis.numel()
    want = factored_ref(q)
    full = dequantize_factored(q, torch.float32).double()
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    ids = torch.tensor([0, shape[0] - 1, 3, 3, 1])
    torch.testing.assert_close(factored_lut_gather(q, ids, dtype=torch.float32).double(), full[ids], rtol=1e-6,
                               atol=1e-6 * want.abs().max().item())
    if len(shape) == 4:
        for layer in range(shape[1]):
            w = torch.rand(5, shape[2])
            got = factored_lut_gather(q, ids, w, layer=layer, dtype=torch.float32).double()
            ref = (w.double()[..., None] * want[ids, layer]).sum(1)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        w = torch.rand(5, shape[1])
        got = factored_lut_gather(q, ids.view(5, 1), w.view(5, 1, -1), dtype=torch.float32).double().view(5, -1)
        ref = (w.double()[..., None] * want[ids]).sum(1)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert factored_lut_gather(q, torch.zeros(0, dtype=torch.long)).shape == (0, *shape[1:])
    # full rank and 8 bits: close to the table itself (the fit is least squares, the error the coefficients')
    if rank == shape[-1]:
        assert ((full - lut.double()) ** 2).mean() < 1e-3 * (lut.double() ** 2).mean()


def _top_directions_by_svd(a: torch.Tensor, k: int) -> torch.Tensor:
    """How factorize found its basis before it used the Gram matrix: the SVD (the reference below)."""
    return torch.linalg.svd(a, full_matrices=False)[2][:k]


@pytest.mark.parametrize("shape, rank", [((300, 2, 3, 40), 12), ((7, 2, 24), 10), ((50, 1, 1, 16), 16)])
def test_factorize_basis_is_the_weighted_svd(shape, rank):
    """The basis (from the Gram matrix's eigenvectors) is the SVD's top right singular vectors of the
    weighted rows, up to each vector's sign and float16 rounding; rank > V: the extra rows are 0."""
    from mole_kernels.factored import factorize

    lut = random_lut(shape) + torch.randn(shape[1:]) * torch.logspace(0, -2, shape[-1])
    counts = torch.randint(0, 100, (shape[0],))
    q = factorize(lut, rank, 6, counts=counts)
    w = (counts.double() + 1) / (counts.double() + 1).sum()
    blocks = lut.double().reshape(shape[0], -1, shape[-1])
    basis = q.basis.double().reshape(-1, rank, shape[-1])
    k = min(rank, shape[0])
    for b in range(blocks.shape[1]):
        vh = _top_directions_by_svd(blocks[:, b] * w.sqrt()[:, None], k)
        sign = torch.sign((basis[b, :k] * vh).sum(1, keepdim=True))
        torch.testing.assert_close(basis[b, :k], sign * vh, rtol=0, atol=1e-3)
        assert (basis[b, k:] == 0).all()


def test_factored_low_rank_table_is_recovered_and_bad_arguments_refused():
    from mole_kernels.factored import FactoredLUT, dequantize_factored, factorize

    a, b = torch.randn(64, 2, 3, 4), torch.randn(2, 3, 4, 40)
    lut = torch.einsum("vler,lerd->vled", a, b)  # exactly rank 4 per (layer, expert)
    q = factorize(lut, 4, 8)
    err = (dequantize_factored(q, torch.float32) - lut).abs().max() / lut.abs().max()
    assert err < 0.02
    with pytest.raises(ValueError, match="bits"):
        factorize(lut, 4, 9)
    with pytest.raises(ValueError, match="rank"):
        factorize(lut, 41, 4)
    with pytest.raises(ValueError, match="non-finite"):
        factorize(lut.index_put((torch.tensor([3]),), torch.tensor(float("inf"))), 4, 4)
    with pytest.raises(ValueError, match="needs"):
        FactoredLUT(q.data[..., :-2].contiguous(), q.basis, 8)


def test_mixed_table_with_a_factored_part(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    lut, counts, _ = normalised_case()
    m = quantize_mixed(lut, counts, [("int8", 8), ("f6x5", None)], normalize=True)
    assert m.describe() == "norm(int8/40 x 8 + f6x5 x 42)"
    order = torch.sort(counts.double(), descending=True, stable=True).indices
    want = torch.empty(lut.shape, dtype=torch.float64)
    want[order[:8]] = int8_decode(m.parts[0])
    want[order[8:]] = factored_ref(m.parts[1])
    want = want * m.col_scale.double() + m.offset.double()
    full = dequantize_mixed(m, torch.float32).double()
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    ids = torch.stack([order[0], order[20], order[7], order[49], order[20]])
    got = mixed_lut_gather(m, ids, dtype=torch.float32).double()  # a matrix product: equal up to summation order
    torch.testing.assert_close(got, full[ids], rtol=1e-6, atol=1e-6 * full.abs().max().item())
    w = torch.rand(5, 3)
    fused = mixed_lut_gather(m, ids, w, layer=1, dtype=torch.float32).double()
    torch.testing.assert_close(fused, (w.double()[..., None] * want[ids, 1]).sum(1), rtol=1e-5, atol=1e-4)
    assert m.nbytes == m.parts[0].nbytes + m.parts[1].data.numel() + 2 * m.parts[1].basis.numel() + 4 * 50 + 8 * 240
    path = tmp_path / "f.safetensors"
    save_mixed(path, m)
    back = load_mixed(path)
    assert back.describe() == m.describe() and torch.equal(dequantize_mixed(back, torch.float32), full.float())
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    corrupt = tensors["part1"].clone()
    corrupt[-1, 0, 0, -2:] = torch.tensor([0x00, 0xFC], dtype=torch.uint8)  # a -inf scale in the last row
    save_file(dict(tensors, part1=corrupt), str(tmp_path / "bad1.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="corrupt"):
        load_mixed(tmp_path / "bad1.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "basis1"}, str(tmp_path / "bad2.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="basis1"):
        load_mixed(tmp_path / "bad2.safetensors")
    with pytest.raises(ValueError, match="block size"):
        quantize_mixed(lut, counts, [("f6x5", None)], block_sizes=[8])


def test_token_counts():
    assert token_counts(torch.tensor([[1, 1], [3, 0]]), 5).tolist() == [1, 2, 0, 1, 0]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        token_counts(torch.tensor([5]), 5)


# ------------------------------------------------------------------ the quality gate -------

def tiny_model():
    from mole_kernels.model import MoLEConfig, MoLEForCausalLM

    cfg = MoLEConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_experts=2, max_position_embeddings=32)
    return MoLEForCausalLM(cfg, init_std=0.3).eval()


def greedy_text(m, n=4, length=16):
    """The model's own greedy continuations: any change to its LUT makes this text less likely."""
    text = torch.randint(0, 64, (n, 1))
    with torch.no_grad():
        for _ in range(length - 1):
            text = torch.cat([text, m(text).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return text


def test_perplexity_equals_exp_of_the_loss():
    from mole_kernels.quality import perplexity

    m = tiny_model()
    text = torch.randint(0, 64, (3, 16))
    loss = m(text, labels=text).loss.double()
    assert perplexity(m, text, batch=2) == pytest.approx(loss.exp().item(), rel=1e-5)


def test_format_costs_and_gate():
    from mole_kernels.quality import QualityError, check_format, format_costs

    m = tiny_model()
    text = greedy_text(m)
    rows = format_costs(m, text, ["int8", "q1/32"])
    assert [r["name"] for r in rows] == ["bfloat16", "int8/32", "q1/32"]
    assert rows[1]["bits"] == 8 * (32 + 16) / 32 and rows[2]["bits"] == 8 * (4 + 2) / 32
    assert abs(rows[1]["cost"]) < abs(rows[2]["cost"])  # int8 is closer to the reference than 1 bit
    cost = rows[2]["cost"]
    assert cost > 0
    with pytest.raises(QualityError, match="q1/32"):
        check_format(m, "q1", 32, text, max_cost=cost / 2)
    assert check_format(m, "q1", 32, text, max_cost=cost * 2)["cost"] == pytest.approx(cost)
    with pytest.raises(ValueError, match="max_cost"):
        check_format(m, "q1", 32, text, max_cost=-1)
    counts = torch.arange(m.config.vocab_size)
    plan = [("int8", 8, None), ("q1", None, 32)]
    plain, norm = format_costs(m, text, [plan, {"plan": plan, "normalize": True}], counts=counts)[1:]
    assert norm["name"] == f"norm({plain['name']})" and norm["bits"] > plain["bits"]  # offset and scale counted
    assert norm["cost"] != plain["cost"]
    with pytest.raises(ValueError, match="'plan' and 'normalize'"):
        format_costs(m, text, [{"plan": plan, "normalise": True}], counts=counts)


# ------------------------------------------------------------------ the capped CPU paths ----

SCALAR_CHILD_TESTS = ("test_rows_equal_dequantized_table", "test_fused_matches_float64")


@pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.child_run(args=[__file__, "-k", " or ".join(SCALAR_CHILD_TESTS)],
                                                  env={"MOLE_KERNELS_CPU_ISA": isa}))
    for isa in ("scalar", "avx2")])
def test_capped_cpu_paths(isa, request):
    """The low-bit decoders pick AVX-512, AVX2 or scalar code at run time; run the gather tests capped at
    each lower one."""
    result = child_result(request)
    assert_child_ran(result, count_cases(module_tests(globals(), lambda fn: fn.__name__ in SCALAR_CHILD_TESTS)))


# ------------------------------------------------------------------ Triton (interpreter) ----
# Triton reads TRITON_INTERPRET once at import, so the interpreted cases run in a child process
# (test_triton_interpreter_subprocess), which fails unless every one of them passed.
INTERPRETER_CHILD = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_CASES = [((23, 2, 3, 128), None), ((17, 4, 37), 37), ((5, 2, 1, 24), 8), ((12, 3, 2, 48), 16)]


@pytest.mark.skipif(not INTERPRETER_CHILD, reason="runs in the TRITON_INTERPRET=1 child of "
                                                   "test_triton_interpreter_subprocess, which fails unless it passed")
@pytest.mark.parametrize("fmt", LOW)
@pytest.mark.parametrize("shape, block", TRITON_CASES)
def test_interpreted_triton_matches_float64(fmt, shape, block):
    from mole_kernels.lowbit_triton import lowbit_gather_triton

    q = lowbit_table(fmt, shape, block)
    deq = ref_decode(q)
    E = shape[-2]
    ids = torch.randint(0, shape[0], (3, 3))
    ids[0, 0] = ids[2, 2]
    w = torch.rand(3, 3, E)
    for layer in (range(shape[1]) if len(shape) == 4 else [None]):
        rows = deq[ids] if layer is None else deq[ids, layer]
        got = lowbit_gather_triton(q, ids, layer=layer, dtype=torch.float32)
        assert torch.equal(got.double(), rows)
        fused = lowbit_gather_triton(q, ids.int(), w, layer=layer, dtype=torch.float32)
        torch.testing.assert_close(fused.double(), (w.double()[..., None] * rows).sum(-2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"contains {shape[0]} "):
        lowbit_gather_triton(q, torch.tensor([0, shape[0]]), layer=0 if len(shape) == 4 else None)


@pytest.mark.skipif(INTERPRETER_CHILD, reason="the parent of the interpreter child")
@pytest.mark.child_run(args=[__file__, "-k", "interpreted_triton"], env={"TRITON_INTERPRET": "1"})
def test_triton_interpreter_subprocess(request):
    pytest.importorskip("triton")
    result = child_result(request)
    assert_child_ran(result, count_cases(module_tests(globals(), lambda fn: fn.__name__.startswith("test_interpreted"))))


def test_reparameterize_refuses_unmeasured_low_bit_formats():
    from mole_kernels.quality import QualityError

    m = tiny_model()
    text = greedy_text(m)
    with pytest.raises(ValueError, match="below 4 bits.*max_cost"):
        m.reparameterize(lut_format="q2", progress=False)
    with pytest.raises(ValueError, match="below 4 bits.*max_cost"):  # a factored format alone is a one-part plan
        m.reparameterize(lut_format="f4x5", progress=False)
    with pytest.raises(ValueError, match="both max_cost= and quality_text="):
        m.reparameterize(lut_format="q2", max_cost=0.01, progress=False)
    inf = m.reparameterize(lut_format="q2", block_size=16, check_quality=False, progress=False)
    assert inf.lut.format == "q2" and inf.lut.block_size == 16
    ids = torch.randint(0, 64, (2, 5))
    assert torch.isfinite(inf(ids).logits).all()
    from mole_kernels.quality import format_costs

    cost = format_costs(m, text, ["q2/16"])[1]["cost"]
    gated = m.reparameterize(lut_format="q2", block_size=16, max_cost=cost * 1.01, quality_text=text,
                             progress=False)
    assert gated.lut.format == "q2" and cost > 0
    with pytest.raises(QualityError, match="q2/16"):
        m.reparameterize(lut_format="q2", block_size=16, max_cost=cost / 2, quality_text=text, progress=False)
    assert m.reparameterize(lut_format="nf4", progress=False).lut.format == "nf4"  # 4 bits and up: no gate needed
