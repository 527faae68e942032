"""lut_gather against a float64 reference on every device, form, dtype and shape it accepts."""
import itertools

import pytest
import torch

import mole_kernels
from mole_kernels import lut_gather

from conftest import FLOAT_DTYPES, HAS_CUDA, TOLERANCES, requires_cuda

# (V, L, E, D): odd D, E = 1, L = 1, and a 3-D table ([V, E, D], L=None).
TABLE_SHAPES = [(11, 3, 4, 100), (7, 1, 1, 3), (5, 2, 3, 1), (13, None, 4, 1000), (9, 2, 16, 64)]
LEADING = [(), (6,), (2, 3)]
DEVICES = ["cpu"] + (["cuda", "zero_copy"] if HAS_CUDA else [])


def make_table(V, L, E, D, dtype):
    shape = (V, E, D) if L is None else (V, L, E, D)
    return torch.randn(shape, dtype=torch.float32).to(dtype)


def place(lut, ids, device):
    """Puts (lut, ids) where a device mode wants them: cpu, cuda (VRAM), zero_copy (pinned lut, cuda ids)."""
    if device == "cpu":
        return lut, ids
    if device == "cuda":
        return lut.cuda(), ids.cuda()
    return lut.pin_memory(), ids.cuda()


def random_ids(V, leading, dtype=torch.int64):
    ids = torch.randint(0, V, leading, dtype=dtype)
    if ids.numel() > 1:
        ids.view(-1)[-1] = ids.view(-1)[0]  # always a repeated id
    return ids


def ref_rows(lut, ids, layer=None):
    rows = lut.double().cpu()[ids.cpu().long()]
    if layer is not None:
        rows = rows[..., layer, :, :]
    return rows


def ref_fused(lut, ids, weights, layer):
    rows = lut.double().cpu()[ids.cpu().long()]
    if lut.dim() == 4:
        rows = rows[..., layer, :, :]
    return (rows * weights.double().cpu()[..., None]).sum(-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", TABLE_SHAPES, ids=str)
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("lut_dtype", FLOAT_DTYPES, ids=str)
def test_fused_matches_float64(device, shape, leading, lut_dtype):
    V, L, E, D = shape
    lut = make_table(V, L, E, D, lut_dtype)
    ids = random_ids(V, leading)
    weights = torch.rand(*leading, E)
    layer = None if L is None else L - 1
    want = ref_fused(lut, ids, weights, layer)
    lut_d, ids_d = place(lut, ids, device)
    got = lut_gather(lut_d, ids_d, weights.to(ids_d.device), layer=layer)
    assert got.shape == (*leading, D) and got.dtype == lut_dtype and got.device == ids_d.device
    torch.testing.assert_close(got.cpu().double(), want, **TOLERANCES[lut_dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lut_dtype,w_dtype,out_dtype", list(itertools.product(FLOAT_DTYPES, repeat=3)), ids=str)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_fused_every_dtype_into_poisoned_out(device, lut_dtype, w_dtype, out_dtype, id_dtype):
    V, L, E, D = 17, 2, 3, 40
    lut = make_table(V, L, E, D, lut_dtype)
    ids = random_ids(V, (9,), id_dtype)
    weights = torch.rand(9, E).to(w_dtype)
    want = ref_fused(lut, ids, weights, 1)
    lut_d, ids_d = place(lut, ids, device)
    out = torch.full((9, D), float("nan"), dtype=out_dtype, device=ids_d.device)
    got = lut_gather(lut_d, ids_d, weights.to(ids_d.device), layer=1, out=out)
    assert got is out
    torch.testing.assert_close(out.cpu().double(), want, **TOLERANCES[out_dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
def test_fused_accumulates_into_out(device, out_dtype):
    V, L, E, D = 10, 3, 4, 24
    lut = make_table(V, L, E, D, torch.bfloat16)
    ids = random_ids(V, (2, 5))
    weights = torch.rand(2, 5, E)
    residual = torch.randn(2, 5, D).to(out_dtype)
    want = residual.double() + ref_fused(lut, ids, weights, 2)
    lut_d, ids_d = place(lut, ids, device)
    out = residual.clone().to(ids_d.device)
    lut_gather(lut_d, ids_d, weights.to(ids_d.device), layer=2, out=out, accumulate=True)
    torch.testing.assert_close(out.cpu().double(), want, **TOLERANCES[out_dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", TABLE_SHAPES, ids=str)
@pytest.mark.parametrize("leading", LEADING, ids=str)
@pytest.mark.parametrize("lut_dtype", FLOAT_DTYPES, ids=str)
def test_rows_exact(device, shape, leading, lut_dtype):
    V, L, E, D = shape
    lut = make_table(V, L, E, D, lut_dtype)
    ids = random_ids(V, leading, torch.int32)
    lut_d, ids_d = place(lut, ids, device)
    got = lut_gather(lut_d, ids_d)
    assert got.dtype == lut_dtype and got.device == ids_d.device
    assert torch.equal(got.cpu().double(), ref_rows(lut, ids))
    if L is not None:  # one layer's rows: [*, E, D]
        one = lut_gather(lut_d, ids_d, layer=L - 1)
        assert torch.equal(one.cpu().double(), ref_rows(lut, ids, L - 1))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_into_poisoned_out(device):
    lut = make_table(8, 2, 3, 5, torch.float16)
    ids = random_ids(8, (4,))
    lut_d, ids_d = place(lut, ids, device)
    out = torch.full((4, 2, 3, 5), float("nan"), dtype=torch.float16, device=ids_d.device)
    lut_gather(lut_d, ids_d, out=out)
    assert torch.equal(out.cpu().double(), ref_rows(lut, ids))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_ids_and_weights(device):
    V, L, E, D = 20, 2, 4, 33
    lut = make_table(V, L, E, D, torch.float32)
    ids = torch.randint(0, V, (6, 4)).t()  # transposed: non-contiguous
    weights = torch.rand(E, 4, 6).permute(2, 1, 0).transpose(0, 1)  # [4, 6, E], non-contiguous
    assert not ids.is_contiguous() and not weights.is_contiguous()
    want = ref_fused(lut, ids, weights, 0)
    lut_d, ids_d = place(lut, ids, device)
    got = lut_gather(lut_d, ids_d, weights.to(ids_d.device), layer=0)
    torch.testing.assert_close(got.cpu().double(), want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_ids_give_empty_results(device):
    lut = make_table(5, 2, 3, 4, torch.bfloat16)
    ids = torch.empty(0, 7, dtype=torch.int64)
    lut_d, ids_d = place(lut, ids, device)
    assert lut_gather(lut_d, ids_d).shape == (0, 7, 2, 3, 4)
    assert lut_gather(lut_d, ids_d, torch.empty(0, 7, 3, device=ids_d.device), layer=1).shape == (0, 7, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 5, 1 << 40])
def test_out_of_range_id_raises_naming_it(device, bad):
    lut = make_table(5, 2, 3, 4, torch.float32)
    ids = torch.tensor([0, 4, bad, 2])
    lut_d, ids_d = place(lut, ids, device)
    with pytest.raises(ValueError, match=rf"ids contains {bad} \(at flat position 2\).*\[0, 5\)"):
        lut_gather(lut_d, ids_d)
    out = torch.full((4, 4), 7.0, device=ids_d.device)
    with pytest.raises(ValueError, match=str(bad)):
        lut_gather(lut_d, ids_d, torch.rand(4, 3, device=ids_d.device), layer=0, out=out, accumulate=True)
    assert bool((out == 7.0).all()), "a rejected call must not touch out"


@pytest.mark.parametrize("device", DEVICES)
def test_fault_counter_mode_zero_rows_and_counts(device):
    V, L, E, D = 6, 2, 2, 8
    lut = make_table(V, L, E, D, torch.float32)
    ids = torch.tensor([1, -3, 5, 6, 2])
    weights = torch.rand(5, E)
    lut_d, ids_d = place(lut, ids, device)
    faults = torch.zeros(1, dtype=torch.int64, device=ids_d.device)
    rows = lut_gather(lut_d, ids_d, faults=faults)
    good = torch.tensor([True, False, True, False, True])
    want = torch.zeros(5, L, E, D, dtype=torch.float64)
    want[good] = ref_rows(lut, ids[good])
    assert torch.equal(rows.cpu().double(), want)
    assert faults.item() == 2
    fused = lut_gather(lut_d, ids_d, weights.to(ids_d.device), layer=1, faults=faults)
    want_f = torch.zeros(5, D, dtype=torch.float64)
    want_f[good] = ref_fused(lut, ids[good], weights[good], 1)
    torch.testing.assert_close(fused.cpu().double(), want_f)
    assert faults.item() == 4


def test_bad_arguments_name_the_argument():
    lut = make_table(5, 2, 3, 4, torch.float32)
    ids = torch.tensor([0, 1])
    w = torch.rand(2, 3)
    cases = [
        (lambda: lut_gather(lut.double(), ids), "lut must be float32, float16 or bfloat16"),
        (lambda: lut_gather(lut[0, 0], ids), r"lut must have shape \[V, L, E, D\]"),
        (lambda: lut_gather(lut.transpose(2, 3), ids), "lut must be contiguous"),
        (lambda: lut_gather(lut, ids.float()), "ids must be int32 or int64"),
        (lambda: lut_gather(lut, ids, torch.rand(2, 4), layer=0), r"weights must have shape ids.shape \+ \[E\] = \[2, 3\]"),
        (lambda: lut_gather(lut, ids, w.long(), layer=0), "weights must be float32"),
        (lambda: lut_gather(lut, ids, w), "`layer` must say which layer"),
        (lambda: lut_gather(lut, ids, w, layer=2), r"layer must be in \[0, 2\)"),
        (lambda: lut_gather(lut, ids, layer=-1), r"layer must be in \[0, 2\)"),
        (lambda: lut_gather(lut, ids, w, layer=0, out=torch.empty(2, 5)), r"out must have shape \[2, 4\]"),
        (lambda: lut_gather(lut, ids, out=torch.empty(2, 2, 3, 4, dtype=torch.half)), "out must have the table's dtype"),
        (lambda: lut_gather(lut, ids, w, layer=0, out=torch.empty(4, 2).t()), "out must be contiguous"),
        (lambda: lut_gather(lut, ids, accumulate=True), "accumulate=True needs out="),
        (lambda: lut_gather(lut, ids, out=torch.empty(2, 2, 3, 4), accumulate=True), "accumulate=True needs weights"),
        (lambda: lut_gather(lut, ids, faults=torch.zeros(1)), "faults must be a contiguous int64"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
            pytest.fail(f"no error for the case expecting {message!r}")


@requires_cuda
def test_cuda_device_mismatches_are_errors():
    lut = make_table(5, 2, 3, 4, torch.float32)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="ordinary \\(pageable\\) CPU tensor"):
        lut_gather(lut, ids.cuda())
    with pytest.raises(ValueError, match="weights must be on ids' device"):
        lut_gather(lut.cuda(), ids.cuda(), torch.rand(2, 3), layer=0)
    with pytest.raises(ValueError, match="ids must be on the table's device"):
        lut_gather(lut.cuda(), ids)
    with pytest.raises(ValueError, match="out must be on ids' device"):
        lut_gather(lut.cuda(), ids.cuda(), out=torch.empty(2, 2, 3, 4))


@requires_cuda
def test_zero_copy_is_graph_capturable():
    """Pinned table + CUDA ids + fault counter: no synchronisation, so it records into a CUDA graph."""
    lut = make_table(50, 3, 4, 64, torch.bfloat16).pin_memory()
    ids = torch.randint(0, 50, (8,), device="cuda")
    w = torch.rand(8, 4, device="cuda")
    faults = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = torch.empty(8, 64, dtype=torch.bfloat16, device="cuda")
    lut_gather(lut, ids, w, layer=1, out=out, faults=faults)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lut_gather(lut, ids, w, layer=1, out=out, faults=faults)
    ids.copy_(torch.randint(0, 50, (8,)))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu().double(), ref_fused(lut, ids, w, 1), **TOLERANCES[torch.bfloat16])
    assert faults.item() == 0


@requires_cuda
def test_cuda_decode_row_spans_many_blocks():
    """A whole 410M-4E-sized row (24*4*1024 bf16 = 192 KB) for one token, zero-copy and from VRAM."""
    lut = make_table(3, 24, 4, 1024, torch.bfloat16)
    ids = torch.tensor([2])
    for lut_d, ids_d in (place(lut, ids, "cuda"), place(lut, ids, "zero_copy")):
        assert torch.equal(lut_gather(lut_d, ids_d).cpu().double(), ref_rows(lut, ids))


def sample_inputs(device):
    lut = make_table(9, 2, 3, 10, torch.bfloat16)
    ids = torch.randint(0, 9, (2, 3))
    w = torch.rand(2, 3, 3)
    lut_d, ids_d = place(lut, ids, device)
    w = w.to(ids_d.device)
    yield torch.ops.mole_kernels.lut_gather.default, (lut_d, ids_d, None, None)
    yield torch.ops.mole_kernels.lut_gather.default, (lut_d, ids_d, w, 1)
    yield torch.ops.mole_kernels.lut_gather.default, (lut_d, ids_d, None, 0)
    out = torch.randn(2, 3, 10, device=ids_d.device)
    yield torch.ops.mole_kernels.lut_gather_out.default, (out, lut_d, ids_d, w, 0, True, None)
    faults = torch.zeros(1, dtype=torch.int64, device=ids_d.device)
    yield torch.ops.mole_kernels.lut_gather_out.default, (out.clone(), lut_d, ids_d, w, 0, False, faults)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in sample_inputs(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_cpu():
    lut = make_table(30, 2, 4, 16, torch.float32)
    ids = torch.randint(0, 30, (5,))
    w = torch.rand(5, 4)

    def layer_step(h, ids, w):
        rows = lut_gather(lut, ids, layer=1)  # [T, E, D]
        return lut_gather(lut, ids, w, layer=0, out=h.clone(), accumulate=True) + rows.sum(1)

    h = torch.randn(5, 16)
    compiled = torch.compile(layer_step, fullgraph=True, backend="inductor")
    want = h.double() + ref_fused(lut, ids, w, 0) + ref_rows(lut, ids, 1).sum(1)
    torch.testing.assert_close(compiled(h, ids, w).double(), want, atol=1e-5, rtol=1e-5)


def test_both_import_forms():
    import importlib

    module = importlib.import_module("mole_kernels.lut_gather")
    assert module.lut_gather is lut_gather is mole_kernels.lut_gather
    exec("import mole_kernels.lut_gather\nassert callable(mole_kernels.lut_gather)", {})


def test_build_info_describes_the_build():
    info = mole_kernels.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    assert (info["cuda_archs"] != "") == info["cuda"]
    assert info["cuda"] or info["cuda_skipped"], "a CPU-only build says why CUDA was skipped"
    if HAS_CUDA:
        assert info["cuda"], "a GPU is visible but the extension was built without CUDA"


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_instruction_set_paths(isa):
    """The CPU kernel picks AVX-512, AVX2 or scalar code at run time; run the fused tests on the lower paths too."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOLE_KERNELS_CPU_ISA=isa)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "test_fused and cpu and not instruction"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_zero_sized_rows(device):
    """E = 0 or D = 0: nothing to read; the fused sum is zero (or out unchanged when accumulating)."""
    for E, D in ((0, 5), (3, 0)):
        lut = torch.empty(4, 2, E, D)
        ids = torch.tensor([1, 3])
        lut_d, ids_d = place(lut, ids, device)
        assert lut_gather(lut_d, ids_d).shape == (2, 2, E, D)
        got = lut_gather(lut_d, ids_d, torch.rand(2, E, device=ids_d.device), layer=1)
        assert got.shape == (2, D) and bool((got == 0).all())
        out = torch.full((2, D), 3.0, device=ids_d.device)
        lut_gather(lut_d, ids_d, torch.rand(2, E, device=ids_d.device), layer=1, out=out, accumulate=True)
        assert bool((out == 3.0).all())
