"""router_softmax and mole_combine against a float64 reference on every backend.

Backends (the `backend` parameter):
- "torch":     CPU tensors, plain-torch fallback (this process);
- "interpret": CPU tensors through the Triton kernels under TRITON_INTERPRET=1;
- "cuda":      the compiled Triton kernels (skipped without a GPU).

Why a subprocess for "interpret": triton reads TRITON_INTERPRET once, when it and
the @triton.jit decorators are imported (tl.sum/tl.max are themselves jit
functions), so one process cannot run compiled-mode and interpreted kernels.
`test_triton_interpreter_subprocess` reruns this file's "interpret" cases in a
child with TRITON_INTERPRET=1 and fails unless every one of them passed (their
number is counted from the decorators here); in the parent those cases skip,
in the child everything else skips.

The Triton kernels tile: router_softmax runs BLOCK_T tokens per program,
mole_combine streams E in E_CHUNK slices and D in BLOCK_D slices, with wider
tiles for prefill (T > 64). The TILED_* cases reach each of those paths on every
backend and assert the block configuration that makes them do so.
"""
import itertools
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

import mole_kernels.combine as combine_mod
from mole_kernels.combine import MAX_EXPERTS, mole_combine, router_softmax

from conftest import HAS_CUDA, TOLERANCES, assert_child_ran, child_result, count_cases, module_tests, uses_fixture

INTERPRETER_CHILD = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["torch", "interpret", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


def _skip_unless_runnable(backend):
    """Skips with the true reason: what is missing here, or where the case runs instead."""
    if backend == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device (none visible)")
        if combine_mod.triton is None:
            pytest.skip("needs triton (not installed)")
    elif backend == "interpret":
        if combine_mod.triton is None:
            pytest.skip("needs triton (not installed): no Triton interpreter to run the kernels on CPU")
        if not INTERPRETER_CHILD:
            pytest.skip("runs in the TRITON_INTERPRET=1 child of test_triton_interpreter_subprocess, which fails "
                        "unless every such case passes there")
    elif INTERPRETER_CHILD:
        pytest.skip("the TRITON_INTERPRET=1 child runs the interpreter cases only")


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request):
    _skip_unless_runnable(request.param)
    # Guard against a test silently exercising the wrong path.
    probe = torch.empty(1, device=_device(request.param))
    want = {"torch": "torch", "interpret": "interpret", "cuda": "triton"}[request.param]
    assert combine_mod._backend(probe) == want
    return request.param


# ---------------------------------------------------------------------------
# References and input builders
# ---------------------------------------------------------------------------
def ref_softmax(logits):
    return torch.softmax(logits.double().cpu(), dim=-1)


def ref_combine(logits, rows, residual=None, shared=None):
    y = (ref_softmax(logits)[..., None] * rows.double().cpu()).sum(-2)
    if residual is not None:
        y = y + residual.double().cpu()
    if shared is not None:
        y = y + shared.double().cpu()
    return y


def make_rows(T, E, D, dtype, layout, device):
    """[T, E, D] rows in one of several memory layouts (values always random)."""
    if layout == "contig":
        return torch.randn(T, E, D, device=device).to(dtype)
    if layout == "layer":  # layer 1 of a [T, L=3, E, D] prefetch buffer: T-stride 3*E*D
        return torch.randn(T, 3, E, D, device=device).to(dtype)[:, 1]
    if layout == "dstride":  # every other element along D
        return torch.randn(T, E, 2 * D, device=device).to(dtype)[..., ::2]
    if layout == "emajor":  # stored [E, T, D]: expert-major
        return torch.randn(E, T, D, device=device).to(dtype).transpose(0, 1)
    raise AssertionError(layout)


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_matches(got, want, dtype):
    torch.testing.assert_close(got.double().cpu(), want, equal_nan=True, **TOLERANCES[dtype])


# E x D x T in full (80 cases); dtype, layout and which addends are present are drawn
# per case (seeded, uncorrelated), so the interpreter part stays well under a minute.
_rng = random.Random(1234)
_LAYOUTS = ["contig", "layer", "dstride", "emajor"]
_ADDENDS = [(True, True), (True, False), (False, True), (False, False)]
COMBINE_CASES = [
    (T, E, D, _rng.choice(DTYPES), _rng.choice(_LAYOUTS), _rng.choice(_ADDENDS))
    for E, D, T in itertools.product([1, 3, 4, 16], [1, 7, 64, 100, 257], [0, 1, 5, 33])
]
# Make sure the awkward corners are in regardless of the draw.
COMBINE_CASES += [
    (33, 16, 257, torch.bfloat16, "layer", (True, True)),
    (33, 3, 100, torch.float16, "emajor", (True, True)),
    (1, 4, 257, torch.float32, "dstride", (False, False)),
    (0, 4, 64, torch.bfloat16, "layer", (True, True)),
]


def _case_id(c):
    T, E, D, dt, layout, (r, s) = c
    return f"T{T}-E{E}-D{D}-{str(dt)[6:]}-{layout}-{'r' if r else ''}{'s' if s else ''}"


def _cdiv(a, b):
    return -(-a // b)


# Shapes that reach mole_combine's tiling paths: (case, the path it must reach; see _assert_reaches).
TILED_COMBINE = [
    ((3, 100, 130, torch.bfloat16, "layer", (True, True)), "e_chunks"),  # 4 E chunks, the last partial; 2 D blocks
    ((2, 64, 128, torch.float32, "emajor", (True, False)), "e_chunks"),  # E = 64: exactly 2 chunks
    ((64, 4, 1000, torch.float16, "dstride", (False, True)), "wide_d"),  # decode, BLOCK_D = 256, D tail
    ((130, 16, 1000, torch.bfloat16, "layer", (True, True)), "prefill"),  # BLOCK_D = 1024, 4 E chunks, D tail
    ((2, MAX_EXPERTS, 3, torch.float32, "contig", (False, False)), "max_e"),  # the documented E limit
]


def _assert_reaches(T, E, D, path):
    """The block configuration of (T, E, D) takes `path`: if the configuration changes so that it
    no longer does, this fails rather than leaving the path untested."""
    if combine_mod.triton is None:
        return  # no kernels, no configuration: the case still checks the torch fallback
    cfg = combine_mod._combine_config(T, E, D)
    chunks = _cdiv(E, cfg["E_CHUNK"])
    if path == "e_chunks":
        assert chunks >= 2, cfg
    elif path == "wide_d":
        assert T <= combine_mod._DECODE_T and cfg["BLOCK_D"] > 128 and D % cfg["BLOCK_D"], cfg
    elif path == "prefill":
        assert T >= 128 > combine_mod._DECODE_T and cfg["BLOCK_D"] >= 1024 > D and chunks >= 2, cfg
    else:
        assert path == "max_e" and E == MAX_EXPERTS and chunks >= 2, cfg


# ---------------------------------------------------------------------------
# mole_combine
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", COMBINE_CASES, ids=_case_id)
def test_combine_matches_float64_into_poisoned_out(backend, case):
    _check_combine(backend, case)


@pytest.mark.parametrize("case,path", TILED_COMBINE, ids=[f"{p}-{_case_id(c)}" for c, p in TILED_COMBINE])
def test_combine_tiling_paths_match_float64(backend, case, path):
    _assert_reaches(*case[:3], path)
    _check_combine(backend, case)


def _check_combine(backend, case):
    T, E, D, dtype, layout, (has_res, has_sh) = case
    dev = _device(backend)
    logits = (3 * torch.randn(T, E, device=dev)).to(dtype)
    rows = make_rows(T, E, D, dtype, layout, dev)
    residual = torch.randn(T, D, device=dev).to(dtype) if has_res else None
    shared = torch.randn(T, D, device=dev).to(dtype) if has_sh else None
    out = poisoned((T, D), dtype, dev)
    got = mole_combine(logits, rows, residual, shared, out=out)
    assert got is out
    assert_matches(out, ref_combine(logits, rows, residual, shared), dtype)


@pytest.mark.parametrize("rows_dtype,res_dtype,logit_dtype", [
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float64),
    (torch.bfloat16, None, torch.float16),
])
def test_combine_result_dtype_follows_residual_else_rows(backend, rows_dtype, res_dtype, logit_dtype):
    dev = _device(backend)
    T, E, D = 5, 3, 100
    logits = torch.randn(T, E, device=dev).to(logit_dtype)
    rows = make_rows(T, E, D, rows_dtype, "layer", dev)
    residual = None if res_dtype is None else torch.randn(T, D, device=dev).to(res_dtype)
    got = mole_combine(logits, rows, residual)
    want_dtype = rows_dtype if res_dtype is None else res_dtype
    assert got.dtype == want_dtype and got.shape == (T, D) and got.device.type == dev
    assert_matches(got, ref_combine(logits, rows, residual), want_dtype)


def test_combine_non_contiguous_everything(backend):
    dev = _device(backend)
    T, E, D = 5, 4, 100  # D < BLOCK_D: the kernel's last D lanes are masked
    logits = torch.randn(E, T, device=dev).t()  # stride (1, T)
    rows = make_rows(T, E, D, torch.float32, "emajor", dev)
    residual = torch.randn(T, 2 * D, device=dev)[:, ::2]
    shared = torch.randn(D, T, device=dev).t()
    out_buf = poisoned((T, 2 * D + 2), torch.float32, dev)
    out = out_buf[:, 1:2 * D:2]  # out[t, D] would be out_buf[t, 2 * D + 1]: in the buffer, outside the view
    mole_combine(logits, rows, residual, shared, out=out)
    assert_matches(out, ref_combine(logits, rows, residual, shared), torch.float32)
    outside = torch.ones(T, 2 * D + 2, dtype=torch.bool, device=dev)
    outside[:, 1:2 * D:2] = False
    assert torch.isnan(out_buf[outside]).all()  # nothing written outside the view


def test_combine_leading_dims(backend):
    dev = _device(backend)
    B, S, E, D = 2, 3, 4, 7
    logits = torch.randn(B, S, E, device=dev)
    rows = torch.randn(B, S, 2, E, D, device=dev)[:, :, 0]  # viewable as [B*S, E, D]
    residual = torch.randn(B, S, D, device=dev)
    got = mole_combine(logits, rows, residual)
    assert got.shape == (B, S, D)
    assert_matches(got, ref_combine(logits, rows, residual), torch.float32)


def test_combine_out_may_be_residual(backend):
    dev = _device(backend)
    T, E, D = 5, 3, 100
    logits, rows = torch.randn(T, E, device=dev), make_rows(T, E, D, torch.bfloat16, "layer", dev)
    residual = torch.randn(T, D, device=dev).bfloat16()
    shared = torch.randn(T, D, device=dev).bfloat16()
    want = ref_combine(logits, rows, residual, shared)
    got = mole_combine(logits, rows, residual, shared, out=residual)
    assert got is residual
    assert_matches(residual, want, torch.bfloat16)


# Huge, tied and -inf logits. E = 3 leaves a padding expert in the kernels' power-of-two tiles
# (whose weight must stay exactly 0 even when exp(-max) overflows).
EXTREME_LOGITS = {
    4: [[1e4, -1e4, 0.0, 1e4],  # huge, tied maxima
        [-1e4, -1e4, -1e4, -1e4],  # all huge negative: uniform
        [NEG_INF, 2.0, NEG_INF, 1.0],  # two experts excluded
        [NEG_INF, NEG_INF, NEG_INF, 5e3],  # one survivor gets weight exactly 1
        [1e4, NEG_INF, -1e4, 0.5]],
    3: [[1e4, -1e4, 1e4],
        [-1e4, -1e4, -1e4],
        [NEG_INF, 2.0, 1.0],
        [NEG_INF, NEG_INF, -5e3],
        [-1e4, NEG_INF, -1e4]],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", list(EXTREME_LOGITS))
def test_combine_extreme_and_neg_inf_logits(backend, dtype, E):
    dev = _device(backend)
    T, D = 5, 33
    logits = torch.tensor(EXTREME_LOGITS[E], device=dev).to(dtype)
    rows = make_rows(T, E, D, dtype, "layer", dev)
    # A -inf expert's rows are huge: any nonzero weight on them would show.
    big = 6e4 if dtype == torch.float16 else 1e30
    rows[torch.isneginf(logits)] = big
    residual = torch.randn(T, D, device=dev).to(dtype)
    out = poisoned((T, D), dtype, dev)
    mole_combine(logits, rows, residual, out=out)
    assert torch.isfinite(out).all()
    assert_matches(out, ref_combine(logits, rows, residual), dtype)


def test_undefined_softmax_rows_give_nan_rows(backend):
    """Defined semantics: a token whose logits are all -inf, or hold +inf or NaN, has no softmax, so
    its output row (and its probabilities) are all NaN on every backend (a GPU kernel cannot raise
    without a sync). The other tokens' rows are exact."""
    dev = _device(backend)
    T, E, D = 7, 3, 7
    logits = torch.randn(T, E, device=dev)
    logits[1] = NEG_INF
    logits[2, 1] = float("inf")
    logits[3, 0] = float("nan")
    logits[4, 0], logits[4, 2] = float("inf"), NEG_INF
    logits[5] = float("nan")
    bad, keep = [1, 2, 3, 4, 5], [0, 6]
    rows = make_rows(T, E, D, torch.float32, "contig", dev)
    residual = torch.randn(T, D, device=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's inf-inf in the interpreter
        out = mole_combine(logits, rows, residual, out=poisoned((T, D), torch.float32, dev))
        probs = router_softmax(logits)
    assert torch.isnan(out[bad]).all() and torch.isnan(probs[bad]).all()
    assert torch.isfinite(out[keep]).all() and torch.isfinite(probs[keep]).all()
    assert_matches(out[keep], ref_combine(logits[keep], rows[keep], residual[keep]), torch.float32)
    assert_matches(probs[keep], ref_softmax(logits[keep]), torch.float32)


@pytest.mark.parametrize("with_out", [False, True])
def test_combine_empty_batch(backend, with_out):
    dev = _device(backend)
    E, D = 4, 64
    logits, rows = torch.randn(0, E, device=dev), torch.randn(0, 2, E, D, device=dev)[:, 1]
    out = torch.empty(0, D, device=dev) if with_out else None
    got = mole_combine(logits, rows, torch.randn(0, D, device=dev), out=out)
    assert got.shape == (0, D)


# ---------------------------------------------------------------------------
# router_softmax
# ---------------------------------------------------------------------------
SOFTMAX_CASES = [  # (leading, E, logit dtype, out dtype)
    ((1,), 1, torch.float32, torch.float32),
    ((5,), 3, torch.bfloat16, torch.float32),
    ((33,), 16, torch.float16, torch.float32),
    ((2, 3), 4, torch.float32, torch.bfloat16),
    ((7,), 100, torch.float64, torch.float16),
    ((3,), 256, torch.bfloat16, torch.float32),
    ((0,), 5, torch.float32, torch.float32),
]


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: f"{c[0]}-E{c[1]}-{str(c[2])[6:]}-{str(c[3])[6:]}")
def test_router_softmax_matches_float64(backend, case):
    leading, E, dtype, out_dtype = case
    dev = _device(backend)
    logits = (5 * torch.randn(*leading, E, device=dev)).to(dtype)
    got = router_softmax(logits, out_dtype=out_dtype)
    assert got.shape == logits.shape and got.dtype == out_dtype
    assert_matches(got, ref_softmax(logits), out_dtype)


# (T, E, logit dtype, out dtype): several BLOCK_T programs each, the last one partial.
TILED_SOFTMAX = [
    (130, 64, torch.float32, torch.float32),  # BLOCK_T = BLOCK_E = 64: 3 programs
    (1500, 3, torch.bfloat16, torch.float32),  # BLOCK_T = 1024, BLOCK_E = 4 (one padding expert)
    (130, 100, torch.float16, torch.bfloat16),  # BLOCK_T = 32: 5 programs, 28 padding experts
    (3, MAX_EXPERTS, torch.float32, torch.float16),  # the documented E limit: one token per program
]


@pytest.mark.parametrize("case", TILED_SOFTMAX, ids=lambda c: f"T{c[0]}-E{c[1]}-{str(c[2])[6:]}-{str(c[3])[6:]}")
def test_router_softmax_multi_program_matches_float64(backend, case):
    T, E, dtype, out_dtype = case
    if combine_mod.triton is not None:
        cfg = combine_mod._softmax_config(T, E)
        assert _cdiv(T, cfg["BLOCK_T"]) >= 2 and (T % cfg["BLOCK_T"] or cfg["BLOCK_T"] == 1), cfg  # last one partial
    dev = _device(backend)
    logits = (5 * torch.randn(E, T, device=dev)).to(dtype).t()  # token stride 1, expert stride T
    got = router_softmax(logits, out_dtype=out_dtype)
    assert got.shape == (T, E) and got.dtype == out_dtype
    assert_matches(got, ref_softmax(logits), out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_softmax_extreme_logits_strided(backend, dtype):
    dev = _device(backend)
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [NEG_INF, 3.0, NEG_INF],
                           [1e4, 1e4, NEG_INF]], device=dev).to(dtype)
    strided = torch.empty(4, 6, device=dev, dtype=dtype)[:, ::2]
    strided.copy_(logits)
    got = router_softmax(strided)
    assert torch.isfinite(got).all()
    assert (got[torch.isneginf(logits)] == 0).all()
    assert_matches(got, ref_softmax(logits), torch.float32)


# ---------------------------------------------------------------------------
# Errors name the argument (checked before any backend runs)
# ---------------------------------------------------------------------------
def _good(dev="cpu", T=4, E=3, D=8):
    return torch.randn(T, E, device=dev), torch.randn(T, E, D, device=dev), torch.randn(T, D, device=dev)


@pytest.mark.parametrize("bad,match", [
    (lambda l, r, s: dict(logits=l[:, :2]), "rows must have shape"),
    (lambda l, r, s: dict(rows=r[:, :, None]), "rows must be"),
    (lambda l, r, s: dict(rows=r[:3]), "rows must have shape"),
    (lambda l, r, s: dict(rows=r.double()), "rows must be float32"),
    (lambda l, r, s: dict(rows=r.to("meta")), "rows is on meta"),
    (lambda l, r, s: dict(logits=l.long()), "logits must be float"),
    (lambda l, r, s: dict(logits=l[0, 0]), "logits must be"),
    (lambda l, r, s: dict(residual=s[:, :5]), "residual must have shape"),
    (lambda l, r, s: dict(residual=s.int()), "residual must be float32"),
    (lambda l, r, s: dict(shared=s[:3]), "shared must have shape"),
    (lambda l, r, s: dict(shared=s.to("meta")), "shared is on meta"),
    (lambda l, r, s: dict(out=s.t()), "out must have shape"),
    (lambda l, r, s: dict(out=s.double()), "out must be float32"),
    (lambda l, r, s: dict(residual=s.tolist()), "residual must be a tensor"),
])
def test_combine_bad_arguments_name_the_argument(bad, match):
    logits, rows, res = _good()
    kw = dict(logits=logits, rows=rows, residual=res, shared=None, out=None)
    kw.update(bad(logits, rows, res))
    with pytest.raises(ValueError, match="mole_combine: .*" + match):
        mole_combine(kw.pop("logits"), kw.pop("rows"), kw.pop("residual"), kw.pop("shared"), **kw)


def test_raw_ops_validate_too():
    logits, rows, res = _good()
    with pytest.raises(ValueError, match="mole_combine: residual must have shape"):
        torch.ops.mole_kernels.mole_combine(logits, rows, res[:, :3], None)
    with pytest.raises(ValueError, match="mole_combine: out must have shape"):
        torch.ops.mole_kernels.mole_combine_out(logits, rows, res, None, res[:2])
    with pytest.raises(ValueError, match="router_softmax: out_dtype"):
        torch.ops.mole_kernels.router_softmax(logits, torch.int64)


def test_combine_unflattenable_rows_is_an_error_not_a_copy():
    logits = torch.randn(2, 3, 4)
    rows = torch.randn(3, 2, 4, 5).transpose(0, 1)  # [2, 3, 4, 5], leading dims not mergeable
    with pytest.raises(ValueError, match="rows' leading dims cannot be flattened"):
        mole_combine(logits, rows)


def test_too_many_experts_is_an_error():
    with pytest.raises(ValueError, match=f"in \\[1, {MAX_EXPERTS}\\]"):
        router_softmax(torch.randn(2, MAX_EXPERTS + 1))
    with pytest.raises(ValueError, match=f"mole_combine: logits' last dim .*in \\[1, {MAX_EXPERTS}\\], got {MAX_EXPERTS + 1}"):
        mole_combine(torch.randn(2, MAX_EXPERTS + 1), torch.randn(2, MAX_EXPERTS + 1, 3))
    with pytest.raises(ValueError, match="logits' last dim"):
        mole_combine(torch.randn(2, 0), torch.randn(2, 0, 3))


def test_router_softmax_bad_arguments():
    with pytest.raises(ValueError, match="router_softmax: logits must be float"):
        router_softmax(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="router_softmax: out_dtype"):
        router_softmax(torch.randn(3, 2), out_dtype=torch.int32)


# ---------------------------------------------------------------------------
# Torch integration (CPU fallback path; the interpreter is not for tracing)
# ---------------------------------------------------------------------------
def _sample_inputs():
    logits = torch.randn(5, 3)
    rows = torch.randn(5, 2, 3, 7)[:, 1]
    res, sh = torch.randn(5, 7).bfloat16(), torch.randn(5, 7)
    return logits, rows, res, sh


@pytest.mark.skipif(INTERPRETER_CHILD, reason="runs outside the interpreter subprocess")
def test_opcheck():
    logits, rows, res, sh = _sample_inputs()
    torch.library.opcheck(torch.ops.mole_kernels.router_softmax.default, (logits, torch.float32))
    torch.library.opcheck(torch.ops.mole_kernels.router_softmax.default, (logits.bfloat16(), torch.bfloat16))
    for r, s in [(res, sh), (None, None), (None, sh)]:
        torch.library.opcheck(torch.ops.mole_kernels.mole_combine.default, (logits, rows, r, s))
    out = torch.empty(5, 7, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.mole_kernels.mole_combine_out.default, (logits, rows, res, sh, out))


@pytest.mark.skipif(INTERPRETER_CHILD, reason="runs outside the interpreter subprocess")
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_layer(compile_backend):
    def layer(h, router_logits, rows, shared):
        probs = router_softmax(router_logits)
        return mole_combine(router_logits, rows, h, shared), probs

    torch._dynamo.reset()
    # aot_eager: the dynamo + AOT (fake, functionalised) trace alone; inductor adds
    # codegen (~10 s cold on a small CPU, tiny shapes keep it at one kernel or two).
    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    logits, rows, res, sh = _sample_inputs()
    h = res.float()
    got, probs = compiled(h, logits, rows, sh)
    want, want_p = layer(h, logits, rows, sh)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(probs, want_p)
    assert_matches(got, ref_combine(logits, rows, h, sh), torch.float32)


@pytest.mark.skipif(INTERPRETER_CHILD, reason="runs outside the interpreter subprocess")
def test_dispatch_modes_see_the_ops_and_agree_with_the_direct_path():
    """Eager plain-tensor calls skip the dispatcher; under a TorchDispatchMode the
    same call must go through torch.ops.mole_kernels.* and give the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    logits, rows, res, sh = _sample_inputs()
    direct = mole_combine(logits, rows, res, sh)
    direct_p = router_softmax(logits)
    with Record() as rec:
        via_op = mole_combine(logits, rows, res, sh)
        via_op_out = mole_combine(logits, rows, res, sh, out=torch.empty_like(res))
        via_op_p = router_softmax(logits)
    assert {"mole_kernels.mole_combine.default", "mole_kernels.mole_combine_out.default",
            "mole_kernels.router_softmax.default"} <= set(rec.ops)
    torch.testing.assert_close(via_op, direct, rtol=0, atol=0)
    torch.testing.assert_close(via_op_out, direct, rtol=0, atol=0)
    torch.testing.assert_close(via_op_p, direct_p, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible)")
def test_cuda_graph_replay_matches():
    T, E, D = 8, 4, 1024
    logits = torch.randn(T, E, device="cuda")
    rows = torch.randn(T, 2, E, D, device="cuda").bfloat16()[:, 1]
    res = torch.randn(T, D, device="cuda").bfloat16()
    out = torch.empty(T, D, device="cuda", dtype=torch.bfloat16)
    mole_combine(logits, rows, res, out=out)  # warm-up: compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        mole_combine(logits, rows, res, out=out)
    logits.copy_(torch.randn(T, E, device="cuda"))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert_matches(out, ref_combine(logits, rows, res), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (runs on cuda:1)")
def test_second_cuda_device():
    """Operands on cuda:1 while cuda:0 is current: the kernels launch on the operands' device."""
    dev = torch.device("cuda", 1)
    T, E, D = 5, 4, 300
    logits = torch.randn(T, E, device=dev)
    rows = make_rows(T, E, D, torch.bfloat16, "layer", dev)
    residual = torch.randn(T, D, device=dev).bfloat16()
    out = mole_combine(logits, rows, residual)
    probs = router_softmax(logits)
    assert out.device == dev and probs.device == dev and torch.cuda.current_device() == 0
    assert_matches(out, ref_combine(logits, rows, residual), torch.bfloat16)
    assert_matches(probs, ref_softmax(logits), torch.float32)


@pytest.mark.skipif(INTERPRETER_CHILD, reason="runs outside the interpreter subprocess")
def test_imports_and_falls_back_without_triton():
    """A machine without triton still gets both ops (torch fallback). Subprocess:
    triton must be unimportable before mole_kernels is first imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, mole_kernels.combine as c\n"
        "assert c.triton is None and c._backend(torch.empty(1)) == 'torch'\n"
        "torch.manual_seed(0)\n"
        "l, r = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, 5)\n"
        "want = (torch.softmax(l, -1)[..., None] * r.double()).sum(1)\n"
        "tol = dict(rtol=1e-5, atol=1e-5)\n"  # float32 results against float64
        "torch.testing.assert_close(c.mole_combine(l, r).double(), want, **tol)\n"
        "torch.testing.assert_close(torch.ops.mole_kernels.mole_combine(l, r, None, None).double(), want, **tol)\n"
        "torch.testing.assert_close(c.router_softmax(l).double(), torch.softmax(l, -1), **tol)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd: the tests folder, so the child imports the installed package, not the source tree's
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---------------------------------------------------------------------------
# The interpreter run (see the module docstring)
# ---------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETER_CHILD, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(combine_mod.triton is None, reason="needs triton (not installed)")
@pytest.mark.child_run(args=[__file__, "-k", "interpret and not subprocess", "-W", "ignore::RuntimeWarning"],
                       env={"TRITON_INTERPRET": "1"})
def test_triton_interpreter_subprocess(request):
    result = child_result(request)
    assert_child_ran(result, count_cases(module_tests(globals(), uses_fixture("backend"))))
    print(result["output"].strip().splitlines()[-1])
