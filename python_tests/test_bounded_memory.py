"""Tables built and loaded chunk by chunk (issue 15): what each path produces, against an
independent reference. The memory itself (process high-water mark) is held by test_memory.py."""
import json
import os

import pytest
import torch

from mole_kernels import LookupTable, MoLEConfig, MoLEForCausalLM, dequantize, quantize
from mole_kernels.model.checkpoints import LUT_KEY
from mole_kernels.table import file_format


def _config(V=37):
    return MoLEConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, num_experts=2)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few tokens, so every path runs many chunks and a ragged last one."""
    monkeypatch.setattr(file_format, "_CHUNK_MIN", 1000)
    monkeypatch.setattr(file_format, "_CHUNK_MAX", 1000)


def _reference_lut(model):
    """The experts on every vocabulary entry in float64, computed here (not by compute_lut)."""
    out = []
    with torch.no_grad():
        for layer in model.model.layers:
            norm = layer.expert_layernorm
            x = model.model.embed_tokens.weight.double()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
            experts = []
            for e in layer.experts:  # down(GELU(up(x))), exact GELU
                experts.append(torch.nn.functional.gelu(x @ e.up_proj.weight.double().T) @ e.down_proj.weight.double().T)
            out.append(torch.stack(experts, dim=1))
    return torch.stack(out, dim=1)  # [V, L, E, D]


@pytest.mark.parametrize("placement", ["host", "disk"])
@pytest.mark.parametrize("fmt", [None, "int8", "nf4"])
def test_build_fills_every_token_once_in_order(placement, fmt, small_chunks, tmp_path):
    V, L, E, D = 29, 2, 3, 64
    lut = torch.randn(V, L, E, D).to(torch.bfloat16)
    calls = []

    def fill(a, b, out):
        assert out.shape == (b - a, L, E, D) and out.dtype == torch.bfloat16
        out.fill_(float("nan"))  # a fill that left rows out would show
        out.copy_(lut[a:b])
        calls.append((a, b))

    path = str(tmp_path / "t.safetensors") if placement == "disk" else None
    with LookupTable.build((V, L, E, D), torch.bfloat16, fill, placement, "cpu", path=path, format=fmt) as t:
        assert len(calls) > 3 and calls[0][0] == 0 and calls[-1][1] == V
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(calls, calls[1:]))  # in order, no gap, no overlap
        got = t.read()
        want = lut if fmt is None else quantize(lut, fmt)  # quantization per row: chunking changes no byte
        assert torch.equal((got.data if fmt else got).view(torch.uint8), (want.data if fmt else want).view(torch.uint8))
        assert t.format == (None if fmt is None else want.format) and t.dtype == torch.bfloat16


def test_build_errors():
    ok = lambda a, b, out: out.zero_()  # noqa: E731
    with pytest.raises(ValueError, match=r"shape must be \[V, L, E, D\]"):
        LookupTable.build((4, 2, 8), torch.float32, ok)
    with pytest.raises(ValueError, match="shape must be"):
        LookupTable.build((4, 1, 2, True), torch.float32, ok)
    with pytest.raises(ValueError, match="dtype must be"):
        LookupTable.build((4, 1, 2, 8), torch.int8, ok)
    with pytest.raises(ValueError, match="block_size needs format"):
        LookupTable.build((4, 1, 2, 8), torch.float32, ok, block_size=8)
    with pytest.raises(ValueError, match="non-finite value at index \\(5, 0, 1, 3\\)"):  # named in the whole table
        def bad(a, b, out):
            out.fill_(1.0)
            if a <= 5 < b:
                out[5 - a, 0, 1, 3] = float("inf")
        LookupTable.build((9, 1, 2, 8), torch.float32, bad, format="int8")


@pytest.mark.parametrize("placement", ["host", "disk"])
@pytest.mark.parametrize("lut_format", [None, "int8"])
def test_reparameterize_streams_the_same_table(placement, lut_format, small_chunks, tmp_path):
    torch.manual_seed(0)
    model = MoLEForCausalLM(_config(), init_std=0.2).eval()
    ref = _reference_lut(model)
    path = str(tmp_path / "lut.safetensors") if placement == "disk" else None
    inf = model.reparameterize(placement=placement, dtype=torch.float32, path=path, progress=False, chunk_size=5,
                               lut_format=lut_format)
    got = inf.lut.read()
    got = dequantize(got, torch.float64) if lut_format else got.double()
    tol = 1e-5 if lut_format is None else ref.abs().amax(-1, keepdim=True) / 127 / 2 * 1.01 + 1e-6  # int8: s/2
    assert ((got - ref).abs() <= tol).all()
    full = model.compute_lut(dtype=torch.float64, progress=False, chunk_size=7)  # the whole table in one tensor
    assert (full - ref).abs().max() <= 1e-5


def _official_folder(tmp_path, model, fmt="safetensors"):
    """An official re-parameterized folder: config.json + model.moe_table.weight [V, L*E*D] fp16."""
    folder = tmp_path / fmt
    inf = model.reparameterize(placement="host", dtype=torch.float16, progress=False)
    inf.save_pretrained(folder, safe_serialization=fmt == "safetensors")
    if fmt == "legacy-bin":  # torch's pre-1.6 format: no zip records to read in place
        sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
        torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return folder, inf.lut.read()


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "legacy-bin"])
@pytest.mark.parametrize("placement", ["disk", "host"])
def test_from_pretrained_official_lut_in_place_or_read_once(fmt, placement, tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = MoLEForCausalLM(_config(), init_std=0.2).eval()
    folder, lut = _official_folder(tmp_path, model, "bin" if fmt == "legacy-bin" else fmt)
    if fmt == "legacy-bin":
        _official_folder(tmp_path, model, fmt)
        folder = tmp_path / "bin"
    written = []
    real = file_format._write_table
    monkeypatch.setattr(file_format, "_write_table", lambda *a, **k: written.append(a[0]) or real(*a, **k))
    m = MoLEForCausalLM.from_pretrained(folder, placement=placement)
    assert m.lut.placement == placement and m.lut.dtype == torch.float16
    assert torch.equal(m.lut.read(), lut)
    assert written == []  # no second file: the disk tier reads the checkpoint itself
    ids = torch.randint(0, 37, (2, 5))
    ref = MoLEForCausalLM.from_pretrained(folder, placement="host")
    assert torch.equal(m(ids).logits, ref(ids).logits)


def test_from_pretrained_sharded_in_place(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    model = MoLEForCausalLM(_config(), init_std=0.2).eval()
    folder, lut = _official_folder(tmp_path, model)
    sd = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file({LUT_KEY: sd.pop(LUT_KEY)}, folder / names[1])
    save_file(sd, folder / names[0])
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict({k: names[0] for k in sd}, **{LUT_KEY: names[1]})}))
    m = MoLEForCausalLM.from_pretrained(folder, placement="disk")
    assert torch.equal(m.lut.read(), lut)


@pytest.mark.parametrize("placement", ["disk", "host"])
def test_from_pretrained_converts_chunk_by_chunk(placement, small_chunks, tmp_path):
    torch.manual_seed(3)
    model = MoLEForCausalLM(_config(), init_std=0.2).eval()
    folder, lut = _official_folder(tmp_path, model)
    m = MoLEForCausalLM.from_pretrained(folder, placement=placement, lut_dtype=torch.bfloat16)
    assert torch.equal(m.lut.read(), lut.to(torch.bfloat16))
    q = MoLEForCausalLM.from_pretrained(folder, placement=placement, lut_format="nf4", block_size=8)
    want = quantize(lut, "nf4", 8)
    assert q.lut.format == "nf4" and torch.equal(q.lut.read().data, want.data)
    target = tmp_path / "copy.safetensors"
    c = MoLEForCausalLM.from_pretrained(folder, placement="disk", lut_path=str(target))  # a copy, as asked
    assert target.exists() and torch.equal(LookupTable.open(target).read(), lut) and torch.equal(c.lut.read(), lut)


def test_save_pretrained_over_the_folder_it_serves_from(small_chunks, tmp_path):
    torch.manual_seed(4)
    model = MoLEForCausalLM(_config(), init_std=0.2).eval()
    folder, lut = _official_folder(tmp_path, model)
    m = MoLEForCausalLM.from_pretrained(folder, placement="disk")  # the LUT read from folder/model.safetensors
    m.save_pretrained(folder, lut_dtype=torch.float32)  # replaces that file while reading from it
    again = MoLEForCausalLM.from_pretrained(folder, placement="host")
    assert again.lut.dtype == torch.float32 and torch.equal(again.lut.read(), lut.float())
    assert torch.equal(m.lut.read(), lut)  # still served from the file it opened


def test_open_reinterprets_only_matching_shapes(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(6, 2 * 3 * 4)
    save_file({"w": t, "v": torch.randn(6, 5)}, tmp_path / "f.safetensors")
    with LookupTable.open(tmp_path / "f.safetensors", tensor="w", shape=(6, 2, 3, 4)) as table:
        assert torch.equal(table.read(), t.view(6, 2, 3, 4))
    for tensor, shape in (("v", (6, 2, 3, 4)), ("w", (3, 4, 3, 4)), ("w", (6, 2, 3, 5))):
        with pytest.raises(ValueError, match="expected the \\[V, L, E, D\\]"):
            LookupTable.open(tmp_path / "f.safetensors", tensor=tensor, shape=shape)
