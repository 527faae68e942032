"""lut_combine (one MoLE layer's lookup branch in one call) against a float64 reference.

Backends (the `backend` parameter):
- "cpu":       the C++ kernel (csrc/lut_combine.cpp), through the public function and the ops;
- "interpret": the Triton kernel's table-reading form on CPU tensors under TRITON_INTERPRET=1
               (run by `test_triton_interpreter_subprocess` in a child process; Triton reads the
               variable at import, so one process cannot run both modes);
- "cuda":      the CUDA implementation (Triton on a VRAM or pinned table), skipped without a GPU.
"""
import os

import pytest
import torch

import mole_kernels.combine as combine_mod
from mole_kernels import QuantizedLUT, dequantize, lut_combine, quantize
from mole_kernels.combine import MAX_EXPERTS

from conftest import HAS_CUDA, TOLERANCES, assert_child_ran, child_result

INTERPRETER_CHILD = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ops = torch.ops.mole_kernels


@pytest.fixture(params=["cpu", "interpret", "cuda"])
def backend(request):
    b = request.param
    if b == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device (none visible)")
    if b in ("interpret", "cuda") and combine_mod.triton is None:
        pytest.skip("needs triton (not installed)")
    if b == "interpret" and not INTERPRETER_CHILD:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_interpreter_subprocess")
    if b != "interpret" and INTERPRETER_CHILD:
        pytest.skip("this child process runs the interpreter cases only")
    return b


def reference(lut, ids, logits, layer, residual=None, shared=None):
    """float64: residual + shared + sum_e softmax(logits)_e * lut[ids, layer, e]; bad ids add nothing."""
    lut64 = (dequantize(lut) if isinstance(lut, QuantizedLUT) else lut).double().cpu()
    if lut64.dim() == 3:
        lut64 = lut64.unsqueeze(1)
    ids = ids.cpu().long()
    ok = (ids >= 0) & (ids < lut64.shape[0])
    rows = torch.zeros(*ids.shape, *lut64.shape[2:], dtype=torch.float64)
    rows[ok] = lut64[ids[ok], layer]
    y = (torch.softmax(logits.double().cpu(), -1)[..., None] * rows).sum(-2)
    for t in (residual, shared):
        if t is not None:
            y = y + t.double().cpu()
    return y


def run(backend, lut, ids, logits, layer, residual=None, shared=None, out=None, faults=None):
    """lut_combine on one backend; out poisoned with NaN when not given."""
    if backend == "interpret":  # the Triton kernel itself (the public function runs the C++ one on CPU)
        T, D = ids.numel(), lut.shape[-1]
        out = torch.full((T, D), float("nan"), dtype=(residual if residual is not None else lut).dtype)
        table = lut if lut.dim() == 3 else lut[:, layer]
        combine_mod._mole_combine_triton(logits, table, residual, shared, out, ids=ids, faults=faults)
        return out.view(*ids.shape, D)
    if out is None:
        dtype = residual.dtype if residual is not None else shared.dtype if shared is not None else lut.dtype
        out = torch.full((*ids.shape, lut.shape[-1]), float("nan"), dtype=dtype, device=ids.device)
    return lut_combine(lut, ids, logits, layer=layer, residual=residual, shared=shared, out=out, faults=faults)


def place(backend, *tensors, pinned_table=False):
    """Tensors on the backend's device (the first is the table: pinned host memory when asked)."""
    if backend != "cuda":
        return tensors
    lut, rest = tensors[0], tensors[1:]
    lut = lut.pin_memory() if pinned_table else lut.cuda()
    return (lut, *[None if t is None else t.cuda() for t in rest])


CASES = [  # (V, L, E, D, ids shape, layer)
    (50, 3, 4, 64, (5,), 1),
    (7, 1, 1, 1, (3,), 0),        # E = 1, D = 1
    (20, 2, 3, 130, (2, 3), 1),   # odd D, 2-D ids
    (9, 4, 8, 16, (1,), 3),       # decode: one token, the last layer
    (30, 2, 5, 33, (0,), 0),      # an empty batch
    (11, 1, 3, 24, (6,), None),   # [V, E, D] table, no layer
    (40, 2, 64, 40, (3,), 0),     # E = 64: several expert chunks in the Triton kernel
    (16, 1, 4, 1100, (2,), 0),    # D > 1024: several D blocks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "V{}-L{}-E{}-D{}-ids{}-l{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("addends", ["rs", "r", "s", ""])
def test_matches_float64(backend, case, dtype, addends):
    V, L, E, D, shape, layer = case
    lut = torch.randn(V, L, E, D).to(dtype)
    if case[5] is None:
        lut = lut[:, 0]  # [V, E, D]
    ids = torch.randint(0, V, shape)
    if ids.numel() > 2:
        ids.view(-1)[1] = ids.view(-1)[0]  # a repeated id
    logits = (3 * torch.randn(*shape, E)).to(dtype)
    residual = torch.randn(*shape, D).to(dtype) if "r" in addends else None
    shared = torch.randn(*shape, D).to(dtype) if "s" in addends else None
    want = reference(lut, ids, logits, layer or 0, residual, shared)
    lut, ids, logits, residual, shared = place(backend, lut, ids, logits, residual, shared)
    got = run(backend, lut, ids, logits, layer, residual, shared)
    assert got.shape == (*shape, D) and got.dtype == (residual if residual is not None else shared
                                                      if shared is not None else lut).dtype
    torch.testing.assert_close(got.double().cpu(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("fmt,block", [("int8", None), ("fp8_e4m3", 16), ("nf4", 8)])
def test_quantized_tables(backend, fmt, block):
    if backend == "interpret":
        pytest.skip("quantized tables combine through the CUDA gather, not the Triton kernel")
    V, L, E, D = 40, 3, 4, 48
    q = quantize(torch.randn(V, L, E, D), fmt, block)
    ids, logits = torch.randint(0, V, (2, 5)), torch.randn(2, 5, E)
    residual, shared = torch.randn(2, 5, D).bfloat16(), torch.randn(2, 5, D).bfloat16()
    want = reference(q, ids, logits, 2, residual, shared)
    if backend == "cuda":
        q, ids, logits, residual, shared = q.to("cuda"), ids.cuda(), logits.cuda(), residual.cuda(), shared.cuda()
    got = run(backend, q, ids, logits, 2, residual, shared)
    torch.testing.assert_close(got.double().cpu(), want, **TOLERANCES[torch.bfloat16])
    plain = lut_combine(q, ids, logits, layer=2)  # no addends: the table's dtype
    assert plain.dtype == q.dtype
    torch.testing.assert_close(plain.double().cpu(), reference(q, ids.cpu(), logits, 2), **TOLERANCES[q.dtype])


@pytest.mark.parametrize("pinned", [False, True])
def test_cuda_table_in_vram_and_pinned(backend, pinned):
    if backend != "cuda":
        pytest.skip("the zero-copy read of a pinned table is a CUDA path")
    V, L, E, D = 64, 2, 4, 96
    lut, ids, logits = torch.randn(V, L, E, D).bfloat16(), torch.randint(0, V, (9,)), torch.randn(9, E)
    residual = torch.randn(9, D).bfloat16()
    want = reference(lut, ids, logits, 1, residual)
    lut, ids, logits, residual = place(backend, lut, ids, logits, residual, pinned_table=pinned)
    before = torch.cuda.memory_allocated()
    got = run(backend, lut, ids, logits, 1, residual)
    # zero-copy: nothing of the table's size was allocated on the device
    assert torch.cuda.memory_allocated() - before < lut.numel() * lut.element_size() // 4
    torch.testing.assert_close(got.double().cpu(), want, **TOLERANCES[torch.bfloat16])


def test_bad_ids_counted_or_named(backend):
    V, E, D = 10, 3, 8
    lut, logits = torch.randn(V, 2, E, D), torch.randn(6, E)
    ids = torch.tensor([1, -1, 9, 10, 3, 1 << 40])
    residual, shared = torch.randn(6, D), torch.randn(6, D)
    want = reference(lut, ids, logits, 1, residual, shared)  # bad ids: residual + shared only
    lut, ids, logits, residual, shared = place(backend, lut, ids, logits, residual, shared)
    faults = torch.zeros(1, dtype=torch.int64, device=ids.device)
    got = run(backend, lut, ids, logits, 1, residual, shared, faults=faults)
    torch.testing.assert_close(got.double().cpu(), want, **TOLERANCES[torch.float32])
    assert faults.item() == 3
    if backend != "interpret":
        with pytest.raises(ValueError, match=r"ids contains -1 \(at flat position 1\)"):
            lut_combine(lut, ids, logits, layer=1, residual=residual)


def test_softmax_edge_logits(backend):
    V, E, D = 6, 3, 5
    lut = torch.randn(V, E, D)
    ninf = float("-inf")
    logits = torch.tensor([[1e4, -1e4, 0.0], [ninf, ninf, ninf], [ninf, 2.0, ninf], [float("inf"), 0.0, 0.0],
                           [float("nan"), 0.0, 1.0]])
    ids = torch.tensor([0, 1, 2, 3, 4])
    want = reference(lut, ids, logits, 0)
    assert want[1].isnan().all() and want[3].isnan().all() and want[4].isnan().all()  # as torch.softmax gives
    lut, ids, logits = place(backend, lut, ids, logits)
    got = run(backend, lut, ids, logits, None)
    torch.testing.assert_close(got.double().cpu(), want, equal_nan=True, **TOLERANCES[torch.float32])


def test_strided_operands_and_int32_ids(backend):
    V, L, E, D = 30, 2, 4, 20
    lut = torch.randn(V, L, E, D)
    id_pairs = torch.randint(0, V, (7, 2), dtype=torch.int32)
    logits = torch.randn(E, 7).t()                    # transposed
    residual = torch.randn(7, 2 * D)[:, ::2]          # every other element
    shared = torch.randn(7, D + 3)[:, :D]             # row stride D + 3
    want = reference(lut, id_pairs[:, 1], logits, 1, residual, shared)
    lut, id_pairs, logits, residual, shared = place(backend, lut, id_pairs, logits, residual, shared)
    ids = id_pairs[:, 1]                              # stride 2 (the kernel reads ids[t] at ids_ptr + t)
    assert not ids.is_contiguous()
    got = run(backend, lut, ids, logits, 1, residual, shared)
    torch.testing.assert_close(got.double().cpu(), want, **TOLERANCES[torch.float32])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible)")
def test_remembered_launches_on_a_gpu():
    """combine's launch cache on a real GPU: a specialization's first launch goes through Triton, the
    next ones call the compiled kernel it returned (the real launcher, given no hook metadata); every
    one matches float64 on fresh inputs. (The cache's choices are tested on CPU: test_host_overhead.py.)"""
    V, L, E, D, T = 50, 3, 4, 96, 5
    lut = torch.randn(V, L, E, D, device="cuda")
    launches = combine_mod._LAUNCHES[combine_mod._mole_combine_kernel]
    for _ in range(3):
        ids = torch.randint(0, V, (T,), device="cuda")
        logits, res, sh = (torch.randn(T, E, device="cuda"), torch.randn(T, D, device="cuda"),
                           torch.randn(T, D, device="cuda"))
        got = lut_combine(lut, ids, logits, layer=1, residual=res, shared=sh)
        torch.testing.assert_close(got.double().cpu(), reference(lut, ids, logits, 1, res, sh),
                                   **TOLERANCES[torch.float32])
    assert launches.known or not combine_mod._triton_run_mirrored()


def test_in_place_on_the_residual(backend):
    if backend == "interpret":
        pytest.skip("out= is the public function's; the kernel is covered by the other cases")
    V, E, D = 12, 3, 16
    lut, ids, logits = torch.randn(V, E, D).half(), torch.randint(0, V, (4,)), torch.randn(4, E)
    h = torch.randn(4, D).half()
    want = reference(lut, ids, logits, 0, h)
    lut, ids, logits, h = place(backend, lut, ids, logits, h)
    assert lut_combine(lut, ids, logits, residual=h, out=h) is h
    torch.testing.assert_close(h.double().cpu(), want, **TOLERANCES[torch.float16])


def test_out_overlap_and_bad_arguments_are_errors():
    V, L, E, D = 10, 2, 3, 8
    lut, ids, logits = torch.randn(V, L, E, D), torch.tensor([1, 2]), torch.randn(2, E)
    shared = torch.randn(2, D)
    big = torch.randn(4, D)
    with pytest.raises(RuntimeError, match="overlap|single memory location"):
        lut_combine(lut, ids, logits, layer=0, residual=big[:2], out=big[1:3])  # partial overlap
    with pytest.raises(RuntimeError, match="overlap|single memory location"):
        lut_combine(lut, ids, logits, layer=0, shared=shared, out=shared)
    with pytest.raises((RuntimeError, ValueError), match="single memory location|must be contiguous"):
        lut_combine(lut, ids, logits, layer=0, out=torch.empty(1, D).expand(2, D))  # internal overlap
    for kwargs, msg in [
        (dict(layer=None), "`layer` must say"),
        (dict(layer=2), r"layer must be in \[0, 2\)"),
        (dict(layer=True), "layer must be an int"),
        (dict(layer=0, residual=torch.randn(3, D)), r"residual must have shape"),
        (dict(layer=0, shared=torch.randn(2, D).int()), "shared must be float32"),
        (dict(layer=0, out=torch.empty(2, D + 1)), "out must have shape"),
    ]:
        with pytest.raises(ValueError, match=msg):
            lut_combine(lut, ids, logits, **kwargs)
    with pytest.raises(ValueError, match=r"logits must have shape ids.shape \+ \[E\]"):
        lut_combine(lut, ids, torch.randn(2, E + 1), layer=0)
    with pytest.raises(ValueError, match="lut must be contiguous"):
        lut_combine(lut.transpose(0, 1).contiguous().transpose(0, 1), ids, logits, layer=0)
    with pytest.raises(ValueError, match="lut must be a tensor or a QuantizedLUT"):
        lut_combine([1, 2], ids, logits)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="pinned"):
            lut_combine(lut, ids.cuda(), logits.cuda(), layer=0)  # an ordinary CPU table cannot be read in place


def test_custom_op_registration():
    """opcheck: schema, fake (meta) kernel and dispatch agree; torch.compile traces the op."""
    lut, ids, logits = torch.randn(10, 2, 3, 8), torch.tensor([[1, 2]]), torch.randn(1, 2, 3)
    residual, shared = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    torch.library.opcheck(ops.lut_combine.default, (lut, ids, logits, 1, residual, shared))
    out = torch.empty(1, 2, 8)
    torch.library.opcheck(ops.lut_combine_out.default, (out, lut, ids, logits, 1, residual, shared, None))
    q = quantize(lut, "int8")
    torch.library.opcheck(ops.lut_combine_quant.default, (q.data, q.format, q.dim, q.block_size, ids, logits, 1,
                                                          residual, shared, None))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(h, n_logits, s):
        return lut_combine(lut, ids, n_logits, layer=1, residual=h, shared=s)

    torch.testing.assert_close(layer(residual, logits, shared), lut_combine(lut, ids, logits, layer=1,
                                                                            residual=residual, shared=shared))


# Inductor's own code for lut_combine / lut_combine_quant (mole_kernels.combine.enable_inductor_decomposition,
# what generate(compile_step=True) and the vLLM plugin turn on): (table, its dtype or format and block, ids
# shape and dtype, layer, addends' dtype or None, residual strided). Odd D and blocks, E = 1, a table
# without a layer dim, int32 ids, no addends (the result takes the table's dtype, or float32 / `dtype`).
_DECOMPOSED = [
    ((13, 3, 4, 40), torch.float32, (2, 3), torch.int64, 2, torch.float32, False),
    ((13, 2, 1, 24), torch.bfloat16, (5,), torch.int32, 1, torch.bfloat16, True),
    ((13, 3, 24), torch.float16, (1, 1), torch.int64, None, None, False),
    ((13, 3, 5, 96), ("int8", None), (2, 3), torch.int64, 1, torch.bfloat16, False),
    ((13, 3, 5, 96), ("fp8_e4m3", 32), (3,), torch.int32, 2, torch.float32, True),
    ((13, 2, 1, 96), ("nf4", 32), (2, 2), torch.int64, 0, torch.float16, False),
    ((13, 3, 64), ("nf4", 64), (4,), torch.int64, None, None, False),
    ((13, 2, 3, 48), ("q3", 16), (2, 1), torch.int32, 1, torch.float32, False),
]


@pytest.mark.parametrize("case", _DECOMPOSED, ids=lambda c: f"{c[1] if isinstance(c[1], tuple) else str(c[1])[6:]}-"
                                                        f"{'x'.join(map(str, c[0]))}")
def test_inductor_decomposition_matches_float64(case):
    """The decompositions inductor compiles instead of calling the ops: the float64 reference on fresh
    inputs, the op's dtype, no call of the op left in inductor's code, and a bad id still raises."""
    from torch._inductor.utils import run_and_get_code

    from mole_kernels.combine import enable_inductor_decomposition

    enable_inductor_decomposition()
    shape, kind, id_shape, id_dtype, layer, add_dtype, strided = case
    table = torch.randn(shape) * 0.5
    if isinstance(kind, tuple):
        table = quantize(table, *kind)
        E, D = table.shape[-2], table.dim
        head, op = (table.data, table.format, table.dim, table.block_size), ops.lut_combine_quant
    else:
        table = table.to(kind)
        E, D = shape[-2:]
        head, op = (table,), ops.lut_combine
    ids = torch.randint(0, shape[0], id_shape, dtype=id_dtype)
    logits = torch.randn(*id_shape, E) * 3
    addends = [None, None]
    if add_dtype is not None:
        addends = [torch.randn(*id_shape, 2 * D if strided else D, dtype=add_dtype)[..., ::2 if strided else 1]
                   for _ in range(2)]
    extra = (None,) if op is ops.lut_combine_quant else ()

    def step(ids, logits, residual, shared):
        return op(*head, ids, logits, layer, residual, shared, *extra)

    compiled = torch.compile(step, dynamic=False)
    with torch._inductor.config.patch(fx_graph_cache=False):
        got, code = run_and_get_code(compiled, ids, logits, *addends)
    want = op(*head, ids, logits, layer, *addends, *extra)
    assert got.dtype == want.dtype and got.shape == want.shape
    ref = reference(table, ids, logits, layer or 0, *addends)
    torch.testing.assert_close(got.double(), ref, **TOLERANCES[got.dtype])
    torch.testing.assert_close(got, want, **TOLERANCES[got.dtype])  # and the op (dequantized in C++)
    calls = [ln for ln in "\n".join(code).splitlines() if "mole_kernels." in ln and not ln.lstrip().startswith("#")]
    assert calls == [], calls  # inductor's own loops, not the op
    bad = ids.clone().view(-1)
    bad[-1] = shape[0]  # one past the end
    with pytest.raises(RuntimeError):  # inductor's bounds check (the op itself raises ValueError, naming it)
        compiled(bad.view(id_shape), logits, *addends)


def test_e_limit_is_shared_with_mole_combine():
    # lut_combine holds a token's logits in registers like mole_combine: the same documented limit.
    assert MAX_EXPERTS == 4096


# The interpreter cases of this file, run in a TRITON_INTERPRET=1 child started right after collection
# (conftest.child_run): the float64 comparisons on every case, dtype and addend set, the fault
# counter, the edge logits and the strided operands. (The quantized and out= cases use the C++
# kernel, not Triton: they have no interpreter form.)
_INTERPRETED = "test_matches_float64 or test_bad_ids_counted or test_softmax_edge or test_strided_operands"


@pytest.mark.skipif(combine_mod.triton is None, reason="needs triton (not installed): the interpreter cases cannot run")
@pytest.mark.skipif(INTERPRETER_CHILD, reason="this is the child")
@pytest.mark.child_run(args=[__file__, "-k", f"interpret and ({_INTERPRETED})", "-W", "ignore::RuntimeWarning"],
                       env={"TRITON_INTERPRET": "1"})
def test_triton_interpreter_subprocess(request):
    assert_child_ran(child_result(request), len(CASES) * len(DTYPES) * 4 + 3)
