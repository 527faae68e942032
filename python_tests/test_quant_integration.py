"""Quantized tables end to end: LookupTable on every tier (gather, gather_combine, prefetcher,
stats, files), the reference model (reparameterize / from_pretrained), the command, the quality
report, and round-trip bounds on a real re-parameterized table. References are the dequantized
table in float64; the kernels themselves are tested in test_quant.py."""
import json
import struct
import sys

import pytest
import torch

from mole_kernels import LookupTable, MoLEConfig, MoLEForCausalLM, dequantize, quantize
from mole_kernels._progress import progress_bar
from mole_kernels.cli import lut_quality, main
from mole_kernels.table import FORMAT_VERSION

from conftest import TOLERANCES, requires_cuda
from test_quant import check_within_bound
from test_table import gathered_table_sizes

# (format, block) at D = 24: one per format, blocks smaller than D where the format has them.
FORMATS = [("int8", None), ("fp8_e4m3", 12), ("nf4", 8)]
FMT_IDS = [f"{f}-b{b}" for f, b in FORMATS]
TIER_PATHS = [("host", "zero_copy"), ("host", "dma"), ("disk", "staged")]


def make_lut(V=29, L=3, E=2, D=24, dtype=torch.float32):
    t = torch.randn(V, L, E, D) * torch.exp2(torch.randint(-3, 4, (V, L, E, 1)).float())
    return t.to(dtype)


def random_ids(V, shape):
    ids = torch.randint(0, V, shape)
    ids.view(-1)[-1] = ids.view(-1)[0]  # always a repeated id
    return ids


def small_staging(q):
    return 2 * 2 * q.bytes_per_token  # halves of two tokens' rows: multi-row requests are chunked


def tiny_model(D=32, L=2, E=3, V=61):
    cfg = MoLEConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=L, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=E)
    return MoLEForCausalLM(cfg, init_std=0.2).eval()


# ---- LookupTable ------------------------------------------------------------------------------

@pytest.mark.parametrize("placement,path", TIER_PATHS)
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FMT_IDS)
def test_table_gather_forms_and_stats(placement, path, fmt, block):
    lut = make_lut(dtype=torch.bfloat16)
    q = quantize(lut, fmt, block)
    deq = dequantize(q)  # bfloat16, what the gather returns
    t = LookupTable.from_tensor(q, placement, device="cpu", staging_bytes=small_staging(q))
    try:
        assert t.quantized and t.format == fmt and t.block_size == q.block_size
        assert t.shape == tuple(lut.shape) and t.dtype == torch.bfloat16
        assert t.row_bytes == q.bytes_per_token and t.nbytes == q.nbytes < lut.numel() * 2
        ids = random_ids(29, (3, 5))
        got = t.gather(ids, path=path)
        assert got.dtype == torch.bfloat16 and torch.equal(got, deq[ids])
        assert torch.equal(t.gather(ids, layer=2, path=path), deq[ids][..., 2, :, :])
        w = torch.rand(3, 5, 2)
        out = torch.full((3, 5, 24), float("nan"))  # poisoned
        res = t.gather_combine(ids, w, 1, out=out, path=path)
        assert res is out
        # the fused form dequantizes to float32 (not to the table's dtype) before accumulating
        want = (dequantize(q, torch.float32).double()[ids][..., 1, :, :] * w.double()[..., None]).sum(-2)
        torch.testing.assert_close(out.double(), want, **TOLERANCES[torch.float32])
        # Stats: quantized bytes only (whole tokens, one token-layer, one token-layer).
        U = ids.unique().numel()
        n = ids.numel() if path == "zero_copy" else U
        assert t.stats.bytes_read[placement] == n * (q.bytes_per_token + 2 * q.bytes_per_token_layer)
        assert t.stats.paths == {path: 3}
    finally:
        t.close()


@pytest.mark.parametrize("placement,path", TIER_PATHS)
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FMT_IDS)
def test_prefetcher_holds_dequantized_rows(placement, path, fmt, block):
    lut = make_lut()
    t = LookupTable.from_tensor(lut, placement, device="cpu", format=fmt, block_size=block,
                                staging_bytes=small_staging(quantize(lut[:1], fmt, block)))
    deq = dequantize(t.read())
    check_within_bound(t.read(), lut.double())  # what the table holds, checked against the float input
    pf = t.prefetcher(7)
    a, b = random_ids(29, (7,)), random_ids(29, (4,))
    ha, hb = pf.start(a, path=path), pf.start(b, path=path)
    for l in range(3):
        assert torch.equal(ha.layer(l), deq[a][:, l]) and torch.equal(hb.layer(l), deq[b][:, l])
    t.close()


def test_three_d_and_auto_path_and_repr():
    lut = make_lut(V=13, L=1).squeeze(1)  # [V, E, D]
    q = quantize(lut, "nf4", 8)
    assert q.data.dim() == 3
    with LookupTable.from_tensor(q, "host", device="cpu") as t:
        assert t.shape == (13, 1, 2, 24)
        ids = random_ids(13, (40,))  # > dma_min_tokens: auto takes dma
        assert torch.equal(t.gather(ids), dequantize(q)[ids].unsqueeze(1)) and t.stats.last_path == "dma"
        assert gathered_table_sizes(lambda: t.gather(ids)) == [ids.unique().numel()]  # it did: unique rows only
        assert "format=nf4, block_size=8" in repr(t)


@pytest.mark.parametrize("placement", ["host", "disk"])
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FMT_IDS)
def test_save_open_round_trip(tmp_path, placement, fmt, block):
    lut = make_lut(dtype=torch.float16)
    path = tmp_path / "q.safetensors"
    with LookupTable.from_tensor(lut, "host", device="cpu", format=fmt, block_size=block) as t:
        q = t.tensor
        t.save(path)
    with LookupTable.open(path, placement, device="cpu") as t:
        assert t.format == fmt and t.block_size == q.block_size and t.dtype == torch.float16
        assert torch.equal(t.read().data, q.data)
        meta = t.metadata
        assert meta["format_version"] == str(FORMAT_VERSION) == "2" and meta["hidden"] == "24"
        assert meta["mole_kernels.format"] == fmt and meta["mole_kernels.block_size"] == str(q.block_size)
        assert meta["dtype"] == meta["mole_kernels.dtype"] == "float16"
        ids = random_ids(29, (9,))
        assert torch.equal(t.gather(ids), dequantize(q)[ids])
        t.save(tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    assert path.stat().st_size == 4096 + q.nbytes  # only the packed rows, page-aligned


def test_float_files_stay_version_1(tmp_path):
    with LookupTable.from_tensor(make_lut(), "host", device="cpu") as t:
        assert t.metadata["format_version"] == "1" and not t.quantized and t.format is None
        assert t.block_size is None and "mole_kernels.format" not in t.metadata


def _rewrite(path, edit):
    """Rewrites a file's header through ``edit(header)`` (data unchanged, header length kept)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


def _set_meta(**kv):
    return lambda h: h["__metadata__"].update({k.replace("__", "."): v for k, v in kv.items()})


def _poison_padding(path):
    raw = bytearray(path.read_bytes())
    raw[-1] = 0xFF  # the last row's padding
    path.write_bytes(bytes(raw))


BAD_QUANT = {
    # nf4 D=24 block 8 rows are 12 + 12 = 24 -> 32 bytes; block 4: 12 + 24 = 36 -> 48
    "block disagrees with row size": (_set_meta(mole_kernels__block_size="4"), "needs 48 bytes per row"),
    "block does not divide D": (_set_meta(mole_kernels__block_size="7"), "block_size must divide D = 24"),
    "unknown format": (_set_meta(mole_kernels__format="nf3"), "unknown format 'nf3'"),
    "format with another row size": (_set_meta(mole_kernels__format="int8", mole_kernels__block_size="48",
                                              hidden="48", mole_kernels__dim="48"), "needs 64 bytes per row"),
    "dim disagrees with hidden": (_set_meta(hidden="25"), "metadata says hidden=25"),
    "dtype disagrees": (_set_meta(dtype="bfloat16"), "metadata says dtype=bfloat16"),
    "float tensor with quant metadata": (lambda h: h["lut"].update(dtype="F32", shape=[29, 3, 2, 8]),
                                         "quantized rows are stored as U8"),
    "U8 without quant metadata": (lambda h: [h["__metadata__"].pop(k) for k in list(h["__metadata__"])
                                             if k.startswith("mole_kernels.")], "names no quantization"),
    "layout": (_set_meta(mole_kernels__layout="rows-v9"), "unsupported layout"),
}
# Not detectable: metadata naming another valid layout of the same row size whose scales land on
# zero padding (e.g. this nf4 file relabelled int8): rows decode, to wrong values. A checksum would
# catch it; the open-time check reads only the first and last tokens' rows.


@pytest.mark.parametrize("case", list(BAD_QUANT) + ["padding not zero"])
@pytest.mark.parametrize("placement", ["disk", "host"])
def test_quantized_file_disagreeing_with_metadata_fails_at_open(tmp_path, case, placement):
    path = tmp_path / "q.safetensors"
    with LookupTable.from_tensor(make_lut(), "host", device="cpu", format="nf4", block_size=8) as t:
        assert t.tensor.row_bytes == 32
        t.save(path)
    if case == "padding not zero":
        _poison_padding(path)
        msg = "padding bytes"
    else:
        edit, msg = BAD_QUANT[case]
        _rewrite(path, edit)
    with pytest.raises(ValueError, match=msg) as e:
        LookupTable.open(path, placement, device="cpu")
    assert str(path) in str(e.value)


def test_from_tensor_argument_errors():
    lut = make_lut()
    q = quantize(lut, "nf4", 8)
    with pytest.raises(ValueError, match="already quantized as 'nf4'"):
        LookupTable.from_tensor(q, "host", device="cpu", format="int8")
    with pytest.raises(ValueError, match="block_size=12 but lut is quantized with block_size=8"):
        LookupTable.from_tensor(q, "host", device="cpu", block_size=12)
    with pytest.raises(ValueError, match="block_size needs format"):
        LookupTable.from_tensor(lut, "host", device="cpu", block_size=8)
    with pytest.raises(ValueError, match="unknown format 'nf3'"):
        LookupTable.from_tensor(lut, "host", device="cpu", format="nf3")
    with pytest.raises(ValueError, match="block_size must divide D = 24"):
        LookupTable.from_tensor(lut, "host", device="cpu", format="nf4", block_size=7)
    # a QuantizedLUT repeating its own format (alias included) is fine
    LookupTable.from_tensor(quantize(lut, "fp8", 12), "host", device="cpu", format="fp8", block_size=12).close()


# ---- the reference model ----------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("placement", ["host", "disk"])
@pytest.mark.parametrize("fmt,block", [("int8", None), ("fp8", 16), ("nf4", 8)], ids=["int8", "fp8-b16", "nf4-b8"])
def test_model_with_quantized_lut_equals_dequantized_float_lut(placement, fmt, block):
    m = tiny_model()
    inf = m.reparameterize(placement=placement, dtype=torch.float32, lut_format=fmt, block_size=block, progress=False)
    assert inf.lut.quantized and inf.lut.placement == placement
    # The same model with the dequantized table as a float LUT: the gather returns the same rows.
    ref = m._inference_form(LookupTable.from_tensor(dequantize(inf.lut.read()), "host", device="cpu"))
    ids = torch.randint(0, 61, (2, 7))
    got, want, train = inf(ids).logits, ref(ids).logits, m(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - train).abs().max() > 1e-4  # and quantization did change something
    seq = inf.generate(ids, max_new_tokens=4)
    assert torch.equal(seq, ref.generate(ids, max_new_tokens=4))
    assert inf.lut.stats.bytes_read[placement] > 0


@torch.no_grad()
def test_from_pretrained_quantizes_or_reads_a_lut_file(tmp_path):
    m = tiny_model()
    inf = m.reparameterize(dtype=torch.float32, progress=False)
    inf.save_pretrained(tmp_path / "rep")
    ids = torch.randint(0, 61, (2, 5))
    q = MoLEForCausalLM.from_pretrained(tmp_path / "rep", lut_format="nf4", block_size=16, placement="disk")
    assert q.lut.format == "nf4" and q.lut.block_size == 16 and q.lut.dtype == torch.float32
    q.lut.save(tmp_path / "lut.safetensors")
    want = q(ids).logits
    # A folder without the float LUT, plus the quantized file.
    r = MoLEForCausalLM.from_pretrained(tmp_path / "rep", lut_file=tmp_path / "lut.safetensors", placement="host")
    assert r.lut.format == "nf4" and torch.equal(r(ids).logits, want)
    # save_pretrained of a quantized model writes the dequantized LUT in the official layout.
    r.save_pretrained(tmp_path / "deq")
    d = MoLEForCausalLM.from_pretrained(tmp_path / "deq")
    assert not d.lut.quantized and torch.equal(d.lut.tensor, dequantize(r.lut.tensor))
    torch.testing.assert_close(d(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_model_argument_errors(tmp_path):
    m = tiny_model()
    with pytest.raises(ValueError, match="reparameterize: lut_format='nf5'"):
        m.reparameterize(lut_format="nf5", progress=False)
    with pytest.raises(ValueError, match="block_size must divide D = 32"):
        m.reparameterize(lut_format="nf4", block_size=12, progress=False)
    with pytest.raises(ValueError, match="block_size=8 needs lut_format"):
        m.reparameterize(block_size=8, progress=False)
    m.save_pretrained(tmp_path / "train")
    with pytest.raises(ValueError, match="lut_format applies to a re-parameterized folder"):
        MoLEForCausalLM.from_pretrained(tmp_path / "train", lut_format="nf4")
    m.reparameterize(dtype=torch.float32, progress=False).save_pretrained(tmp_path / "rep")
    with LookupTable.from_tensor(make_lut(), "host", device="cpu", format="int8") as t:
        t.save(tmp_path / "int8.safetensors")
    with pytest.raises(ValueError, match="lut_format='nf4' but .* holds a int8 table"):
        MoLEForCausalLM.from_pretrained(tmp_path / "rep", lut_file=tmp_path / "int8.safetensors", lut_format="nf4")
    with pytest.raises(ValueError, match="set_lut: table must have shape"):  # int8 table of another shape
        MoLEForCausalLM.from_pretrained(tmp_path / "rep", lut_file=tmp_path / "int8.safetensors")
    with pytest.raises(ValueError, match="lut_dtype/lut_path apply to model.moe_table.weight"):
        MoLEForCausalLM.from_pretrained(tmp_path / "rep", lut_file=tmp_path / "int8.safetensors", lut_dtype="bf16")


@pytest.mark.parametrize("fmt,block", [("int8", None), ("fp8_e4m3", 16), ("fp8_e4m3", 64), ("nf4", 16), ("nf4", 64)],
                         ids=["int8", "fp8-b16", "fp8-b64", "nf4-b16", "nf4-b64"])
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_bounds_on_a_reparameterized_table(fmt, block, lut_dtype):
    """The stated bounds hold on a real LUT (expert MLP outputs), not just on random data."""
    lut = tiny_model(D=64, L=2, E=3, V=97).compute_lut(dtype=lut_dtype, progress=False)
    check_within_bound(quantize(lut, fmt, block), lut.double())


# ---- command and quality report ---------------------------------------------------------------

def test_reparameterize_command_writes_quantized_lut_file(tmp_path, capsys):
    m = tiny_model()
    m.save_pretrained(tmp_path / "train")
    lut_file = tmp_path / "lut.nf4.safetensors"
    rc = main(["reparameterize", "--from", str(tmp_path / "train"), "--to", str(tmp_path / "rep"), "--dtype", "fp32",
               "--quiet", "--lut-format", "nf4", "--block-size", "16", "--lut-file", str(lut_file)])
    assert rc == 0, capsys.readouterr().err
    assert "nf4, block 16" in capsys.readouterr().out
    float_model = MoLEForCausalLM.from_pretrained(tmp_path / "rep")  # the folder keeps the float LUT
    q = MoLEForCausalLM.from_pretrained(tmp_path / "rep", lut_file=lut_file, placement="disk")
    assert q.lut.format == "nf4" and q.lut.block_size == 16
    assert torch.equal(q.lut.read().data, quantize(float_model.lut.read(), "nf4", 16).data)
    # Independently of quantize(): the file decodes to within nf4's stated bound of the float LUT,
    # and that LUT holds the train model's experts (a few tokens, evaluated here).
    check_within_bound(q.lut.read(), float_model.lut.read().double())
    with torch.no_grad():
        for v in (0, 60):
            for l, layer in enumerate(m.model.layers):
                x = layer.expert_layernorm(m.model.embed_tokens.weight[v])
                want = torch.stack([e(x) for e in layer.experts])
                torch.testing.assert_close(float_model.lut.read()[v, l], want, rtol=1e-5, atol=1e-5)
    for argv, msg in [(["--lut-format", "nf4"], "--lut-format needs --lut-file"),
                      (["--block-size", "16"], "--block-size needs --lut-format"),
                      (["--lut-format", "nf4", "--block-size", "5", "--lut-file", str(lut_file)], "must divide D = 32")]:
        rc = main(["reparameterize", "--from", str(tmp_path / "train"), "--to", str(tmp_path / "x"), "--quiet", *argv])
        assert rc == 2 and msg in capsys.readouterr().err


def test_lut_quality_rows():
    torch.manual_seed(1)
    m = tiny_model(D=64, V=97)
    ids = torch.randint(0, 97, (2, 9))
    rows = lut_quality(m, ids, [(torch.float32, None), ("int8", None), ("nf4", 64)])
    ref, fp32, int8, nf4 = rows
    assert ref["name"] == "bf16 (reference)" and ref["kl"] == 0 and ref["agree"] == 1
    L, E, D = 2, 3, 64
    assert ref["bytes_per_token"] == L * E * D * 2 and fp32["ratio"] == 2.0
    assert int8["bytes_per_token"] == L * E * 80 and nf4["bytes_per_token"] == L * E * 48  # padded rows
    for r in rows[1:]:
        assert 0 < r["mean_dlogit"] <= r["max_dlogit"] and r["kl"] >= 0 and 0 <= r["agree"] <= 1
    # bf16 rounding < int8 < nf4, each by a clear factor
    assert fp32["max_dlogit"] < int8["max_dlogit"] < nf4["max_dlogit"]
    assert int8["kl"] < nf4["kl"]


# ---- the shared progress bar ------------------------------------------------------------------

def test_progress_bar_without_and_with_tqdm(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are drawn only on a terminal
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails
    bar = progress_bar(10, "x")
    with bar:
        bar.update(3)
    assert type(bar).__name__ == "_NullBar"
    monkeypatch.delitem(sys.modules, "tqdm")
    pytest.importorskip("tqdm")
    bar = progress_bar(10, "x")
    bar.update(10)
    bar.close()
    assert bar.n == 10
    assert type(progress_bar(10, "x", enabled=False)).__name__ == "_NullBar"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a log, a pipe: no bar
    assert type(progress_bar(10, "x")).__name__ == "_NullBar"


# ---- CUDA -------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("fmt,block", FORMATS, ids=FMT_IDS)
def test_cuda_every_tier_and_prefetcher(tmp_path, fmt, block):
    lut = make_lut(dtype=torch.bfloat16)
    q = quantize(lut, fmt, block)
    deq = dequantize(q).cuda()
    ids = random_ids(29, (11,)).cuda()
    w = torch.rand(11, 2, device="cuda")
    for placement in ("device", "host", "disk"):
        t = LookupTable.from_tensor(q, placement, device="cuda", staging_bytes=small_staging(q))
        if placement == "host":
            assert t.pinned
        for path in t.paths():
            assert torch.equal(t.gather(ids, path=path), deq[ids])
            got = t.gather_combine(ids, w, 2, path=path)
            want = (dequantize(q, torch.float32).cuda().double()[ids][:, 2] * w.double()[..., None]).sum(-2)
            torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.bfloat16])
        pf = t.prefetcher(11)
        h = pf.start(ids)
        for l in range(3):
            assert torch.equal(h.layer(l), deq[ids][:, l])
        torch.cuda.synchronize()
        if placement != "device":
            assert t.stats.bytes_h2d > 0 and t.stats.bytes_h2d % q.bytes_per_token_layer == 0
        t.close()


@requires_cuda
@torch.no_grad()
def test_cuda_model_generates_with_quantized_host_lut():
    m = tiny_model().cuda()
    inf = m.reparameterize(placement="host", dtype=torch.float32, lut_format="nf4", block_size=16, progress=False)
    ref = m._inference_form(LookupTable.from_tensor(dequantize(inf.lut.tensor), "device", device="cuda"))
    ids = torch.randint(0, 61, (2, 7), device="cuda")
    torch.testing.assert_close(inf(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(inf.generate(ids, max_new_tokens=4), ref.generate(ids, max_new_tokens=4))
