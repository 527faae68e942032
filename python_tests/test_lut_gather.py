"""lut_gather against a float64 reference on every device, form, dtype and shape it accepts."""
import itertools
import os

import pytest
import torch

import mole_kernels
from mole_kernels import QuantizedLUT, dequantize, lut_gather, quantize
from mole_kernels.quant import row_layout

from conftest import (DEVICES, FLOAT_DTYPES, HAS_CUDA, TOLERANCES, assert_child_ran, child_result, count_cases,
                      expected_cpu_isa, module_tests, requires_cuda)

# (V, L, E, D): odd D, E = 1, L = 1, and a 3-D table ([V, E, D], L=None).
TABLE_SHAPES = [(11, 3, 4, 100), (7, 1, 1, 3), (5, 2, 3, 1), (13, None, 4, 1000), (9, 2, 16, 64)]
LEADING = [(), (6,), (2, 3)]


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
@pytest.mark.parametrize("lut_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("L", [2, None], ids=["4d", "3d"])
def test_fault_counter_mode_zero_rows_and_counts(device, lut_dtype, L):
    """Every form with faults= (the result allocated by the wrapper: shape and dtype from the table)."""
    V, E, D = 6, 2, 8
    lut = make_table(V, L, E, D, lut_dtype)
    ids = torch.tensor([1, -3, 5, 6, 2])
    weights = torch.rand(5, E)
    layer = None if L is None else 1
    lut_d, ids_d = place(lut, ids, device)
    faults = torch.zeros(1, dtype=torch.int64, device=ids_d.device)
    good = torch.tensor([True, False, True, False, True])
    safe = ids.where(good, 0)  # the reference's ids: bad ones replaced, their rows zeroed below
    forms = [(None, None, ref_rows), (None, layer, ref_rows), (weights, layer, ref_fused)]
    for k, (w, lay, ref) in enumerate(forms):
        got = lut_gather(lut_d, ids_d, None if w is None else w.to(ids_d.device), layer=lay, faults=faults)
        want = ref(lut, safe, layer=lay) if w is None else ref(lut, safe, w, lay)
        want[~good] = 0
        assert got.dtype == lut_dtype and got.shape == want.shape
        tol = TOLERANCES[lut_dtype] if w is not None else dict(rtol=0, atol=0)  # rows are copied exactly
        torch.testing.assert_close(got.cpu().double(), want, **tol)
        assert faults.item() == 2 * (k + 1)


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


@requires_cuda
def test_zero_copy_reads_the_pinned_table_in_place():
    """A pinned table is read where it lies: device memory grows by the results only (a copy of the
    table to VRAM would show as 256 MiB), for the float and the quantized table alike."""
    V, L, E, D = 8192, 4, 4, 1024  # bf16: 256 MiB
    lut = torch.empty(V, L, E, D, dtype=torch.bfloat16, pin_memory=True)
    ids = torch.tensor([V - 1, 3, V // 2, 3])
    lut[ids] = torch.randn(4, L, E, D).bfloat16()  # only the rows read hold data
    row_bytes = row_layout("nf4", D, 64)[2]
    q = QuantizedLUT(torch.empty(V, L, E, row_bytes, dtype=torch.uint8, pin_memory=True), "nf4", D, 64, torch.float32)
    q.data[ids] = quantize(lut[ids].float(), "nf4", 64).data
    w = torch.rand(4, E, device="cuda")
    lut_gather(lut, ids[:1].cuda())  # loads the kernels' code before the measurement
    lut_gather(q, ids[:1].cuda(), w[:1], layer=0)
    for table, want in ((lut, lut[ids].double()), (q, dequantize(QuantizedLUT(q.data[ids], "nf4", D, 64), torch.float64))):
        nbytes = table.data.numel() if isinstance(table, QuantizedLUT) else lut.numel() * 2
        torch.cuda.synchronize()
        free0, allocated0 = torch.cuda.mem_get_info()[0], torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        rows = lut_gather(table, ids.cuda())
        fused = lut_gather(table, ids.cuda(), w, layer=2)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - allocated0 < nbytes // 64  # results: 256 KiB + 32 KiB
        assert free0 - torch.cuda.mem_get_info()[0] < nbytes // 4  # nothing outside torch's allocator either
        assert rows.is_cuda and torch.equal(rows.cpu().double(), want)
        torch.testing.assert_close(fused.cpu().double(), (want[:, 2] * w.cpu().double()[..., None]).sum(-2),
                                   **TOLERANCES[torch.bfloat16])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (runs on cuda:1)")
def test_second_cuda_device():
    """Tables and ids on cuda:1 while cuda:0 is current: the kernels launch on the tensors' device."""
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    lut = make_table(40, 3, 4, 100, torch.bfloat16)
    q = quantize(lut, "nf4", 50)
    ids = random_ids(40, (2, 5))
    w = torch.rand(2, 5, 4)
    deq = dequantize(q, torch.float32)
    for table, ref_lut in ((lut.to(dev), lut), (lut.pin_memory(), lut), (q.to(dev), deq), (q.pin_memory(), deq)):
        rows = lut_gather(table, ids.to(dev))
        assert rows.device == dev and torch.equal(rows.cpu().double(), ref_rows(ref_lut, ids).to(rows.dtype).double())
        faults = torch.zeros(1, dtype=torch.int64, device=dev)
        out = torch.full((2, 5, 100), float("nan"), device=dev)
        lut_gather(table, ids.to(dev), w.to(dev), layer=1, out=out, faults=faults)
        torch.testing.assert_close(out.cpu().double(), ref_fused(ref_lut, ids, w, 1), **TOLERANCES[torch.bfloat16])
        assert faults.item() == 0
    with pytest.raises(ValueError, match="ids contains 40"):
        lut_gather(lut.to(dev), torch.tensor([1, 40], device=dev))
    assert torch.cuda.current_device() == 0


def sample_inputs(device):
    lut3 = make_table(9, None, 3, 10, torch.float16)  # [V, E, D]: one layer, no layer argument
    ids3, w3 = torch.randint(0, 9, (4,)), torch.rand(4, 3)
    lut3_d, ids3_d = place(lut3, ids3, device)
    yield torch.ops.mole_kernels.lut_gather.default, (lut3_d, ids3_d, None, None)
    yield torch.ops.mole_kernels.lut_gather.default, (lut3_d, ids3_d, w3.to(ids3_d.device), None)
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


def test_reported_cpu_isa_follows_the_cpu_and_the_cap():
    """build_info() names the instruction set the CPU kernels run: the best this CPU has (from
    /proc/cpuinfo, not from the extension), lowered by MOLE_KERNELS_CPU_ISA. The capped child runs
    below include this test, so a cap the kernels ignore fails there."""
    want = expected_cpu_isa(os.environ.get("MOLE_KERNELS_CPU_ISA"))
    if want is None:
        pytest.skip("cannot read this CPU's flags (no /proc/cpuinfo)")
    info = mole_kernels.build_info()
    assert (info["cpu_isa"], info["cpu_isa_quant"]) == want


# The child runs' selection: every CPU case of the fused tests, and the ISA report.
ISA_CHILD_K = "(test_fused and cpu and not instruction) or reported_cpu_isa"


@pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.child_run(args=[__file__, "-k", ISA_CHILD_K], env={"MOLE_KERNELS_CPU_ISA": isa}))
    for isa in ("scalar", "avx2")])
def test_cpu_instruction_set_paths(isa, request):
    """The CPU kernel picks AVX-512, AVX2 or scalar code at run time; run the fused tests on the lower paths too."""
    result = child_result(request)
    fused = module_tests(globals(), lambda fn: fn.__name__.startswith("test_fused"))
    assert_child_ran(result, count_cases(fused, {"device": "cpu"}) + (expected_cpu_isa() is not None))


# Bytes before the last rows: past 2**31 bytes for every kind, and past 2**31 elements for bf16 and uint8 rows.
BIG_TABLES = {"float32": 1 << 31, "bfloat16": 1 << 32, "int8": 1 << 31, "nf4": 1 << 31}


@pytest.mark.parametrize("kind", list(BIG_TABLES))
def test_table_over_2_gib_is_addressed_with_64_bit_offsets(kind):
    """The kernels themselves address rows past 2**31 bytes/elements (rows and fused forms, float
    and quantized). torch.empty maps pages lazily, so only the rows written and read are backed."""
    E, D = 2, 1024
    small = torch.randn(3, 1, E, D)
    if kind in ("float32", "bfloat16"):
        dtype = getattr(torch, kind)
        V = BIG_TABLES[kind] // (E * D * dtype.itemsize) + 3
        table = torch.empty(V, 1, E, D, dtype=dtype)
        payload, rows = table, small.to(dtype)
        want = rows.double()
    else:
        q = quantize(small, kind, None if kind == "int8" else 64)
        V = BIG_TABLES[kind] // q.bytes_per_token + 3
        payload = torch.empty(V, 1, E, q.row_bytes, dtype=torch.uint8)
        table, rows = QuantizedLUT(payload, kind, D, q.block_size, torch.float32), q.data
        want = dequantize(q, torch.float64)
    picked = torch.tensor([V - 1, 0, V - 2])
    payload[picked] = rows
    assert (V - 2) * payload[0].numel() * payload.element_size() > BIG_TABLES[kind]
    k = torch.randint(0, 3, (64,))  # rows of `picked`
    got = lut_gather(table, picked[k].int())
    torch.testing.assert_close(got.double(), want[k], rtol=0, atol=0)
    w = torch.rand(64, E)
    want_f = (want[k, 0] * w.double()[..., None]).sum(-2)
    tol = TOLERANCES[torch.bfloat16 if kind == "bfloat16" else torch.float32]
    for T in (64, 1):  # whole-token work items, and the column split of a decode-sized batch
        torch.testing.assert_close(lut_gather(table, picked[k[:T]], w[:T], layer=0).double(), want_f[:T], **tol)


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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("T", [0, 1, 7])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_direct_path_equals_the_op(dtype, T, id_dtype):
    """Plain CPU eager calls go past the dispatcher (mole_kernels._C._lut_gather): bit for bit the op's
    result in both forms, layer None or an int, repeated ids; anything a dispatch mode, a subclass or
    autograd would need to see goes through the op (NotImplemented)."""
    from mole_kernels import _C

    lut = make_table(9, 3, 4, 37, dtype)
    ids = torch.randint(0, 9, (T,), dtype=id_dtype)
    if T > 1:
        ids[-1] = ids[0]
    w = torch.rand(T, 4)
    for weights, layer in ((None, None), (None, 2), (w, 2)):
        got = _C._lut_gather(lut, ids, weights, layer, None)
        want = torch.ops.mole_kernels.lut_gather(lut, ids, weights, layer, None)
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert torch.equal(lut_gather(lut, ids, weights, layer=layer), want)
    torch.testing.assert_close(got.double(), (lut.double()[ids.long(), 2] * w.double()[..., None]).sum(-2),
                               **TOLERANCES[dtype])
    trainable = lut.clone().requires_grad_()
    assert _C._lut_gather(trainable, ids, w, 2, None) is NotImplemented
    with torch.no_grad():
        assert torch.equal(_C._lut_gather(trainable, ids, w, 2, None), got)
