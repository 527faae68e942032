"""One regression test per class of hostile-input bug (issue 11): memory overlap of outputs, meta
tensors, bools where ints are meant, size overflow, zero sizes, quantization scales and decode
paths, config domains, checkpoint and atomic file writes, generate() arguments.

Cases that could crash the process (size arithmetic near 2**63) run in a subprocess, so a signal
fails the test instead of killing the run."""
import json
import math
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import mole_kernels as mk
from mole_kernels import MoLEConfig, MoLEForCausalLM
from mole_kernels._files import atomic_write
from mole_kernels.combine import lut_combine
from mole_kernels.quant import LOWBIT, NF4_LEVELS, QuantizedLUT, quantized_lut_gather, row_layout

from conftest import FLOAT_DTYPES, requires_cuda

F32_MAX = torch.finfo(torch.float32).max
HERE = os.path.dirname(os.path.abspath(__file__))
# The child imports the mole_kernels this process imported (installed, or built in place) and this folder.
CHILD_PATH = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(mk.__file__))), HERE])


def run_child(code: str, **env) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; fails on a signal or an error, with the child's output."""
    env = dict(os.environ, PYTHONPATH=CHILD_PATH, **env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=HERE, env=env)
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------------------------------------
# Outputs that share memory with an input (or with themselves) are refused, and nothing is written.

def _gather_overlap_cases():
    lut = torch.randn(6, 2, 3, 8)
    ids = torch.tensor([1, 4, 1], dtype=torch.int64)
    w = torch.rand(3, 3)
    q = mk.quantize(lut, "int8")
    wide = torch.rand(3, 11)  # weights (a strided view) and out in one buffer
    ids_buf = torch.tensor([1, 4, 1, 0])
    buf = torch.zeros(26)  # out, and faults over its last two floats
    return [
        (lambda: mk.lut_gather(lut, ids, w, layer=0, out=lut[0, 0, :3]), "out shares memory with lut"),
        (lambda: mk.lut_gather(lut, ids, wide[:, :3], layer=0, out=wide.view(-1)[:24].view(3, 8)),
         "out shares memory with weights"),
        (lambda: mk.lut_gather(lut, ids_buf[:3], faults=ids_buf[2:]), "faults shares memory with ids"),
        (lambda: mk.lut_gather(lut, ids, w, layer=1, out=buf[:24].view(3, 8), faults=buf[22:].view(torch.int64)),
         "faults shares memory with out"),
        (lambda: quantized_lut_gather(q, ids, w, layer=0, out=q.data.view(-1)[:96].view(torch.float32).view(3, 8)),
         "out shares memory with data"),
        (lambda: mk.lut_gather(lut, ids, w, layer=0, out=torch.zeros(1, 8).expand(3, 8)), "out must be contiguous"),
    ]


def test_gather_out_overlap_leaves_inputs_untouched():
    lut = torch.randn(6, 2, 3, 8)
    before = lut.clone()
    with pytest.raises(ValueError, match="shares memory with lut"):
        mk.lut_gather(lut, torch.tensor([5, 5]), torch.rand(2, 3), layer=1, out=lut[5, 1, :2], accumulate=True)
    assert torch.equal(lut, before)


def test_combine_refuses_overlap_but_allows_out_is_residual():
    T, E, D = 3, 4, 8
    logits, rows = torch.randn(T, E), torch.randn(T, E, D)
    residual, shared = torch.randn(T, D), torch.randn(T, D)
    big = torch.randn(T + 1, D)
    with pytest.raises(ValueError, match="overlapping elements"):
        mk.mole_combine(logits, rows, out=torch.zeros(1, D).expand(T, D))
    with pytest.raises(ValueError, match="shares memory with rows"):
        mk.mole_combine(logits, rows, out=rows[:, 0])
    with pytest.raises(ValueError, match="shares memory with shared"):
        mk.mole_combine(logits, rows, residual, shared, out=shared)
    with pytest.raises(ValueError, match="shares memory with logits"):
        wide = torch.randn(T, E + D)
        mk.mole_combine(wide[:, :E], rows, out=wide.view(-1)[:T * D].view(T, D))
    with pytest.raises(ValueError, match="shares memory with residual"):  # shifted by one row
        mk.mole_combine(logits, rows, big[:T], out=big[1:])
    ref = (residual.double() + shared.double()
           + (torch.softmax(logits.double(), -1)[..., None] * rows.double()).sum(1))
    res = mk.mole_combine(logits, rows, residual, shared, out=residual)  # the documented in-place form
    assert res is residual
    torch.testing.assert_close(residual.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Meta tensors: all-meta gives a meta result; a meta table with real ids (or the reverse) is refused.

@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_meta_inputs(quantized):
    lut = torch.randn(5, 2, 3, 8)
    table = mk.quantize(lut, "nf4", 8) if quantized else lut
    ids = torch.tensor([1, 2])
    meta_table = table.to("meta")
    with pytest.raises(ValueError, match=r"ids must be on the table's device \(meta\)"):
        mk.lut_gather(meta_table, ids)
    with pytest.raises(ValueError, match=r"table's device \(cpu\).*got ids on meta"):
        mk.lut_gather(table, ids.to("meta"))
    with pytest.raises(ValueError, match=r"lut_combine(_quant)?: ids must be on the table's device \(meta\)"):
        lut_combine(meta_table, ids, torch.randn(2, 3), layer=0)
    res = mk.lut_gather(meta_table, ids.to("meta"), torch.rand(2, 3, device="meta"), layer=1)
    assert res.device.type == "meta" and tuple(res.shape) == (2, 8)
    res = lut_combine(meta_table, ids.to("meta"), torch.rand(2, 3, device="meta"), layer=1)
    assert res.device.type == "meta" and tuple(res.shape) == (2, 8)
    # Below the fake kernels, the C++ kernel itself never reads a meta tensor.
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match="ids must be a dense tensor on the CPU or a CUDA device"):
        torch.ops.mole_kernels.lut_gather.default.redispatch(cpu, lut, ids.to("meta"), None, None)


# ---------------------------------------------------------------------------------------------
# A bool is not an int.

def _bool_cases():
    lut = torch.randn(5, 2, 3, 8)
    ids = torch.tensor([1, 2])
    return [
        (lambda: mk.lut_gather(lut, ids, layer=True), "layer must be an int"),
        (lambda: mk.lut_gather(lut, ids, torch.rand(2, 3), layer=0, out=torch.zeros(2, 8), accumulate=1),
         "accumulate must be a bool"),
        (lambda: mk.lut_gather(mk.quantize(lut, "int8"), ids, layer=False), "layer must be an int"),
        (lambda: mk.quantize(lut, "nf4", block_size=True), "block_size must divide"),
        (lambda: QuantizedLUT(torch.zeros(2, 1, 16, dtype=torch.uint8), "nf4", True, 1), "dim .* positive int"),
        (lambda: MoLEConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=True,
                            num_attention_heads=2), "num_hidden_layers must be a positive int"),
        (lambda: MoLEConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, eos_token_id=True), "eos_token_id must be None or an int"),
    ]


REFUSED = {"out-overlap": _gather_overlap_cases, "bool-as-int": _bool_cases}


@pytest.mark.parametrize("group,case", [(g, i) for g, cases in REFUSED.items() for i in range(len(cases()))])
def test_refused_with_a_clear_error(group, case):
    """Outputs sharing memory with an input (or expanded), and bools where ints are meant."""
    call, match = REFUSED[group]()[case]
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Sizes at the edges (in a child: an unchecked overflow or a division by a zero size could crash).

def test_extreme_and_zero_sizes_in_a_child():
    run_child("""
        import torch, mole_kernels
        from mole_kernels.combine import lut_combine
        ops = torch.ops.mole_kernels
        # D = 0: the fused CPU kernel once divided by the (zero) column span.
        out = lut_combine(torch.randn(4, 2, 3, 0), torch.tensor([1, 2]), torch.randn(2, 3), layer=1)
        assert out.shape == (2, 0)
        ids = torch.tensor([0])
        data = torch.zeros(1, 1, 16, dtype=torch.uint8)
        def refused(call, match):
            try:
                call()
            except ValueError as e:
                assert match in str(e), str(e)
            else:
                raise AssertionError("accepted: " + match)
        refused(lambda: ops.lut_gather_quant(data, "nf4", 2**63 - 2, 1, ids), "overflows int64")
        refused(lambda: ops.lut_gather_quant(data, "int8", 2**63 - 1, 2**63 - 1, ids), "overflows int64")
        refused(lambda: ops.lut_gather_quant(data, "fp8_e4m3", 2**63 - 1, 1, ids), "overflows int64")
        # V = 0 leaves the other sizes unbounded by numel (a contiguous empty view of any shape).
        empty = torch.empty(0).as_strided((0, 2**40, 2**40, 2**40), (1, 1, 1, 1))
        refused(lambda: ops.lut_gather(empty, ids), "overflows int64")
        packed = torch.empty(0, dtype=torch.uint8).as_strided((0, 2**40, 2**40, 32), (1, 1, 1, 1))
        refused(lambda: ops.lut_gather_quant(packed, "int8", 16, 16, ids), "overflows int64")
    """)


# ---------------------------------------------------------------------------------------------
# Zero-size dimensions give empty results or a ValueError, never IndexError/ZeroDivisionError.

@pytest.mark.parametrize("fmt", mk.FORMATS)
def test_zero_sizes(fmt):
    with pytest.raises(ValueError, match="dim .* positive int"):
        mk.quantize(torch.randn(3, 2, 0), fmt)
    for shape in [(0, 2, 3, 16), (4, 0, 3, 16), (4, 2, 0, 16)]:
        q = mk.quantize(torch.randn(shape), fmt, 16)
        assert mk.dequantize(q).shape == shape
        ids = torch.zeros(0, 2, dtype=torch.int64)
        assert mk.lut_gather(q, ids).shape == (0, 2) + shape[1:]
    assert mk.lut_gather(torch.randn(4, 0, 8), torch.tensor([1, 3]), torch.rand(2, 0)).abs().sum() == 0
    assert mk.mole_combine(torch.randn(0, 3), torch.randn(0, 3, 8)).shape == (0, 8)
    assert mk.mole_combine(torch.randn(2, 3), torch.randn(2, 3, 0)).shape == (2, 0)
    assert mk.router_softmax(torch.randn(0, 4)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Quantization: finite tables dequantize to finite values within the stated bound, on every form.
# The formats with float32 scales and a per-value bound; the low-bit ones (float16 scales chosen to
# minimise each block's error) have their own extreme-value and every-code tests in test_lowbit.py.
BOUNDED_FORMATS = tuple(f for f in mk.FORMATS if f not in LOWBIT)


@pytest.mark.parametrize("fmt", BOUNDED_FORMATS)
@pytest.mark.parametrize("magnitude", [F32_MAX, 3.0e38, 1e-40, 3e-44], ids=["max", "3e38", "subnormal", "tiny"])
def test_extreme_tables_stay_finite_and_within_bound(fmt, magnitude):
    x = (torch.rand(3, 2, 2, 32, dtype=torch.float64) * 2 - 1) * magnitude
    x[..., 0] = magnitude  # every block reaches the magnitude...
    x[..., 17] = -magnitude
    x = x.float()
    q = mk.quantize(x, fmt, 32 if fmt == "int8" else 16)
    deq = mk.dequantize(q, torch.float32)
    ids = torch.tensor([0, 2, 1])
    rows = quantized_lut_gather(q, ids, dtype=torch.float32)
    w = torch.full((3, 2), 0.5)
    fused = quantized_lut_gather(q, ids, w, layer=1, dtype=torch.float32)
    for t in (deq, rows, fused):
        assert torch.isfinite(t).all()
    assert torch.equal(rows, deq[ids])
    s = q.scales().double().repeat_interleave(q.block_size, -1)
    xd, err = x.double(), (deq.double() - x.double()).abs()
    bound = {"int8": s / 2, "fp8_e4m3": xd.abs() / 16 + s / 1024, "nf4": 0.1519 * s}[fmt]
    # One float32 rounding of the product, the quotient and the scale (absolute in the subnormal range).
    slack = 2 ** -22 * (xd.abs() + 128 * s) + 2 ** -148
    assert (err <= bound + slack).all(), (err - bound).max()


def _every_code_table(fmt: str):
    """Two tokens x two experts whose payload holds every byte 0..255 (nf4: every pair of nibbles),
    each row with its own scales."""
    D, block = (512, 256) if fmt == "nf4" else (256, 256 if fmt == "int8" else 128)
    payload, off, row_bytes = row_layout(fmt, D, block)
    nb = D // block
    data = torch.zeros(2, 1, 2, row_bytes, dtype=torch.uint8)
    data[..., :payload] = torch.arange(256, dtype=torch.uint8)
    for v in range(2):
        for e in range(2):
            scales = torch.tensor([0.75, 3.0])[:nb] * (1 + v + 2 * e)
            data[v, 0, e, off:off + 4 * nb] = scales.view(torch.uint8)
    return QuantizedLUT(data, fmt, D, block, torch.float32)


def _reference_codes(fmt: str) -> torch.Tensor:
    """float64 value of each code, independently of the package (nf4: per nibble, low first)."""
    b = torch.arange(256, dtype=torch.uint8)
    if fmt == "int8":
        return b.view(torch.int8).double()
    if fmt == "fp8_e4m3":
        return b.view(torch.float8_e4m3fn).double()
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    return torch.stack((levels[(b & 15).long()], levels[(b >> 4).long()]), -1).flatten()


def _decode_results(q, out_dtype):
    ids = torch.tensor([1, 0, 1])
    w = torch.tensor([[0.25, -1.5], [1.0, 0.5], [2.0, 0.0]])
    return (quantized_lut_gather(q, ids, dtype=out_dtype),
            quantized_lut_gather(q, ids, w, layer=0, dtype=out_dtype), ids, w)


@pytest.fixture(scope="module")
def scalar_decodes(tmp_path_factory):
    """_decode_results of every format's _every_code_table on the scalar path (a child process with
    MOLE_KERNELS_CPU_ISA=scalar: the ISA is chosen once per process)."""
    out = tmp_path_factory.mktemp("scalar") / "results.pt"
    run_child(f"""
        import torch, test_hardening as th
        torch.save({{(fmt, str(dt)): th._decode_results(th._every_code_table(fmt), dt)[:2]
                    for fmt in th.BOUNDED_FORMATS for dt in th.FLOAT_DTYPES}}, {str(out)!r})
    """, MOLE_KERNELS_CPU_ISA="scalar")
    return torch.load(out)


@pytest.mark.parametrize("fmt", BOUNDED_FORMATS)
def test_every_code_decodes_alike_on_scalar_and_simd_paths(fmt, scalar_decodes):
    q = _every_code_table(fmt)
    codes = _reference_codes(fmt)
    s = q.scales().double().repeat_interleave(q.block_size, -1)  # [V, 1, E, D]
    ref_rows = (codes * s).float()  # one float32 rounding of scale * code, as every path does
    for dt in FLOAT_DTYPES:
        rows, fused, ids, w = _decode_results(q, dt)  # this process: AVX-512 where the CPU has it
        torch.testing.assert_close(rows, mk.dequantize(q, dt)[ids], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(rows, ref_rows[ids].to(dt), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(scalar_decodes[fmt, str(dt)][0], rows, rtol=0, atol=0, equal_nan=True)
        ref_fused = (w.double()[..., None] * (codes * s)[ids, 0]).sum(1)
        tol = dict(rtol=2e-6, atol=1e-5) if dt == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(fused.double(), ref_fused.to(dt).double(), equal_nan=True, **tol)
        torch.testing.assert_close(scalar_decodes[fmt, str(dt)][1].double(), ref_fused.to(dt).double(),
                                   equal_nan=True, **tol)
    if fmt == "fp8_e4m3":  # the two NaN codes (0x7f, 0xff) decode to NaN everywhere
        assert rows[..., 0x7f].isnan().all() and rows[..., 0xff].isnan().all()
        assert fused[0, 0x7f].isnan() and scalar_decodes[fmt, str(torch.float32)][0][..., 0xff].isnan().all()


@requires_cuda
@pytest.mark.parametrize("fmt", BOUNDED_FORMATS)
def test_every_code_decodes_alike_on_cuda(fmt):
    q = _every_code_table(fmt)
    for dt in FLOAT_DTYPES:
        rows, fused, ids, w = _decode_results(q, dt)
        for qd in (q.to("cuda"), q.pin_memory()):
            rows_d = quantized_lut_gather(qd, ids.cuda(), dtype=dt).cpu()
            fused_d = quantized_lut_gather(qd, ids.cuda(), w.cuda(), layer=0, dtype=dt).cpu()
            torch.testing.assert_close(rows_d, rows, rtol=0, atol=0, equal_nan=True)
            tol = dict(rtol=2e-6, atol=1e-5) if dt == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(fused_d.double(), fused.double(), equal_nan=True, **tol)


# ---------------------------------------------------------------------------------------------
# Config: every field's domain, at construction and at load (naming the file and the field).

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_experts=2)
BAD_FIELDS = [
    ("vocab_size", 0), ("hidden_size", 16.0), ("num_experts", True), ("max_position_embeddings", 0),
    ("moe_intermediate_size", -1), ("moe_top_k", None),
    ("rms_norm_eps", 0.0), ("rms_norm_eps", 1e-50), ("rms_norm_eps", math.inf), ("rms_norm_eps", math.nan),
    ("rms_norm_eps", "1e-6"), ("rope_theta", 0.0), ("rope_theta", -10000.0), ("rope_theta", 1e-30),
    ("rope_theta", math.inf), ("rope_theta", True),
    ("pad_token_id", 64), ("bos_token_id", -1), ("eos_token_id", 3.0),
    ("tie_word_embeddings", 1), ("tie_word_embeddings", "false"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_config_refuses_out_of_domain(field, value, tmp_path):
    with pytest.raises(ValueError, match=rf"MoLEConfig: {field} must be"):
        MoLEConfig(**{**SMALL, field: value})
    folder = tmp_path / "ckpt"
    MoLEForCausalLM(MoLEConfig(**SMALL)).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))  # inf/nan as JSON's Infinity/NaN
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: MoLEConfig: {field} must be"):
        MoLEForCausalLM.from_pretrained(folder)


def test_config_eos_list_entries_are_token_ids():
    with pytest.raises(ValueError, match=r"cfg.json: MoLEConfig: eos_token_id\[1\] must be an int in \[0, vocab_size=64\)"):
        MoLEConfig.from_dict({**SMALL, "eos_token_id": [2, 64]}, source="cfg.json")
    assert MoLEConfig.from_dict({**SMALL, "eos_token_id": [5, 7]}).eos_token_id == 5


def test_config_domain_edges_give_finite_logits():
    """The smallest accepted eps and rope base still give finite logits on a zero hidden state
    (with eps = 1e-50, refused above, RMSNorm computes 0/0 there)."""
    cfg = MoLEConfig(**SMALL, rms_norm_eps=torch.finfo(torch.float32).tiny, rope_theta=2.0 ** -64)
    model = MoLEForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[3] = 0.0
        ids = torch.full((1, 40), 3)
        assert torch.isfinite(model(ids).logits).all()
        assert torch.isfinite(model.generate(ids, max_new_tokens=3, return_logits=True).logits).all()


# ---------------------------------------------------------------------------------------------
# Checkpoint folders: a save replaces every earlier weight file; files are written atomically.

def _tiny(seed: int) -> MoLEForCausalLM:
    torch.manual_seed(seed)
    return MoLEForCausalLM(MoLEConfig(**SMALL))


@pytest.mark.parametrize("first_safe", [True, False], ids=["safetensors-then-bin", "bin-then-safetensors"])
def test_save_pretrained_replaces_the_other_format(first_safe, tmp_path):
    _tiny(1).save_pretrained(tmp_path, safe_serialization=first_safe)
    new = _tiny(2)
    new.save_pretrained(tmp_path, safe_serialization=not first_safe)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors" if not first_safe else "pytorch_model.bin"]
    loaded = MoLEForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, new.lm_head.weight)


def test_save_pretrained_removes_stale_shards_and_keeps_other_files(tmp_path):
    _tiny(1).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(b"old")
    (tmp_path / "custom_shard.bin").write_bytes(b"old")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "custom_shard.bin"}}))
    (tmp_path / "pytorch_model.bin.index.json").write_text("{not json")
    (tmp_path / "tokenizer.json").write_text("{}")
    new = _tiny(2)
    new.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin", "tokenizer.json"]
    assert torch.equal(MoLEForCausalLM.from_pretrained(tmp_path).lm_head.weight, new.lm_head.weight)


def test_save_pretrained_failure_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old = _tiny(1)
    old.save_pretrained(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def interrupted(name, sd, streamed):
        with open(name, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("mole_kernels.model.checkpoints._write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _tiny(2).save_pretrained(tmp_path, safe_serialization=True)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # no temp file left
    assert torch.equal(MoLEForCausalLM.from_pretrained(tmp_path).lm_head.weight, old.lm_head.weight)
    (tmp_path / "pytorch_model.bin").mkdir()  # cannot be replaced: refused before anything is touched
    with pytest.raises(ValueError, match="pytorch_model.bin' is a directory"):
        _tiny(2).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "model.safetensors").read_bytes() == before["model.safetensors"]


def test_save_pretrained_replaces_symlinks_not_their_targets(tmp_path):
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"keep me")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        os.symlink(outside, folder / name)
    old_umask = os.umask(0o022)
    try:
        _tiny(1).save_pretrained(folder)
    finally:
        os.umask(old_umask)
    assert outside.read_bytes() == b"keep me"
    for name in ("model.safetensors", "config.json"):
        st = os.lstat(folder / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644


@pytest.mark.parametrize("content,match", [
    ({"weight_map": {"a": 1}}, "not a valid shard index"),
    ({"weight_map": ["model-1.safetensors"]}, "not a valid shard index"),
    ([1, 2], "not a valid shard index"),
    ({"weight_map": {"a": "../outside.safetensors"}}, "not a .safetensors/.bin file name in its folder"),
    ({"weight_map": {"a": "config.json"}}, "not a .safetensors/.bin file name in its folder"),
])
def test_malformed_shard_index_names_the_file(content, match, tmp_path):
    _tiny(1).save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors.index.json'}.*{match}"):
        MoLEForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("header", [b'{"w": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}',
                                    b'{"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}',
                                    b'{"__metadata__": [1]}', b'[1, 2]', b'\xff\xfe'])
def test_malformed_safetensors_header_names_the_file(header, tmp_path):
    _tiny(1).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*(JSON|needs dtype|__metadata__)"):
        MoLEForCausalLM.from_pretrained(tmp_path)


def test_bin_that_is_not_a_state_dict_names_the_file(tmp_path):
    _tiny(1).save_pretrained(tmp_path, safe_serialization=False)
    torch.save({"model.norm.weight": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"{tmp_path / 'pytorch_model.bin'} does not hold a state dict"):
        MoLEForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# mole_kernels._files: whole or nothing, unique temporary names, no symlink followed.

def test_atomic_write_publishes_whole_files(tmp_path):
    target = tmp_path / "f.txt"
    fixed_tmp = tmp_path / "f.txt.tmp"
    fixed_tmp.write_text("a user's file")  # a fixed temporary name would clobber it
    old_umask = os.umask(0o027)
    try:
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.write("héllo")
            assert not target.exists()  # nothing is visible before the block ends
    finally:
        os.umask(old_umask)
    assert target.read_text(encoding="utf-8") == "héllo" and fixed_tmp.read_text() == "a user's file"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["f.txt", "f.txt.tmp"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_the_old_file(error, tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_write(target) as f:
            f.write(b"new, but not finished")
            raise error
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("cleaner", ["unlinked before the lock", "holds the lock"])
def test_a_temporary_file_taken_by_a_cleaner_before_it_is_locked_is_replaced(cleaner, tmp_path, monkeypatch):
    # Another writer of the same target removes dead writers' temporary files (unlocked ones): it
    # can open ours between its creation and its lock. The writer must notice and take a new name,
    # or its publish fails (FileNotFoundError) or writes into an unlinked file.
    import fcntl as real_fcntl
    import types

    from mole_kernels import _files

    target = tmp_path / "f.bin"
    taken = []

    def flock(fd, op):
        if not taken and op & real_fcntl.LOCK_NB and os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            name = os.readlink(f"/proc/self/fd/{fd}")
            taken.append(name)
            other = os.open(name, os.O_RDONLY)
            real_fcntl.flock(other, real_fcntl.LOCK_EX | real_fcntl.LOCK_NB)
            os.unlink(name)
            if cleaner == "unlinked before the lock":
                os.close(other)
            else:  # still held when the writer tries: its lock fails
                try:
                    return real_fcntl.flock(fd, op)
                finally:
                    os.close(other)
        return real_fcntl.flock(fd, op)

    monkeypatch.setattr(_files, "fcntl", types.SimpleNamespace(flock=flock, LOCK_EX=real_fcntl.LOCK_EX,
                                                               LOCK_NB=real_fcntl.LOCK_NB))
    with atomic_write(target) as f:
        f.write(b"new")
    assert len(taken) == 1
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_replaces_a_symlink_and_refuses_a_directory(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    link = tmp_path / "link"
    os.symlink(victim, link)
    with atomic_write(link) as f:
        f.write(b"new")
    assert victim.read_bytes() == b"untouched" and not os.path.islink(link) and link.read_bytes() == b"new"
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        with atomic_write(tmp_path / "d") as f:
            f.write(b"x")
    assert sorted(os.listdir(tmp_path)) == ["d", "link", "victim"]
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_write(tmp_path / "x", "a"):
            pass


# ---------------------------------------------------------------------------------------------
# generate(): wrong-typed or non-finite arguments name the argument.

@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=True), "max_new_tokens must be an int"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int"),
    (dict(top_k=True), "top_k must be an int"),
    (dict(top_k=-1), "top_k must be an int"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(do_sample=True, temperature=math.inf), "temperature must be a finite number"),
    (dict(do_sample=True, temperature=0.0), r"temperature must be a finite number \(> 0 when sampling\)"),
    (dict(top_p=math.nan), "top_p must be a number in"),
    (dict(top_p=True), "top_p must be a number in"),
    (dict(do_sample=1), "do_sample must be a bool"),
    (dict(eos_token_id=True), "eos_token_id must be None or an int"),
    (dict(pad_token_id=64), "pad_token_id must be None or an int"),
    (dict(generator=0), "generator must be a torch.Generator"),
    (dict(attention_mask=torch.tensor([[0.5, 1.0]])), "attention_mask must hold only 0 and 1"),
    (dict(attention_mask=torch.tensor([[2, 1]])), "attention_mask must hold only 0 and 1"),
    (dict(input_ids=torch.zeros(0, 2, dtype=torch.long)), r"input_ids must be \[B, S\] with B >= 1 and S >= 1"),
])
def test_generate_refuses_wrong_arguments(kwargs, match):
    model = MoLEForCausalLM(MoLEConfig(**SMALL))
    kwargs = {"input_ids": torch.tensor([[1, 2]]), **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)
