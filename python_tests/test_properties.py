"""Property-based tests (hypothesis): every public op (lut_gather, router_softmax, mole_combine,
lut_combine) and table path against a float64 reference,
on random shapes (zero and odd sizes, E = 1, 3-D tables), dtypes, strided views, ids in and out of
range (repeated), float and quantized tables, host and disk tiers.

Outputs are poisoned (NaN) before each call so that an unwritten element fails. Tensors come from a
seed hypothesis draws, so a failing example replays. The Triton kernels of router_softmax and
mole_combine are covered by rerunning those properties in a child under TRITON_INTERPRET=1."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mole_kernels as mk
import mole_kernels.combine as combine_mod

from conftest import FLOAT_DTYPES, TOLERANCES

INTERPRETER_CHILD = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Examples are tiny (microseconds of kernel time each); the interpreter runs kernels in Python: fewer there.
EXAMPLES = 25 if INTERPRETER_CHILD else 150


def props(n: int = EXAMPLES):
    # The autouse seeding fixture is harmless here: each example seeds its own generator.
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def skip_in_interpreter_child(f):
    return pytest.mark.skipif(INTERPRETER_CHILD, reason="runs outside the interpreter child")(f)


# ---------------------------------------------------------------------------------------------
# Building blocks

def randn(gen, shape, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def strided(t: torch.Tensor, gen) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a larger buffer)."""
    buf = torch.empty((*t.shape, 2), dtype=t.dtype)
    buf[..., 0] = t
    buf[..., 1] = randn(gen, t.shape).to(t.dtype) if t.is_floating_point() else -7
    return buf[..., 0]


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@st.composite
def table_cases(draw, quantized: bool):
    """(table, its float64 values [V, L, E, D] or [V, E, D], the generator for further tensors)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    V = draw(st.integers(0, 9))
    L = draw(st.sampled_from([None, 1, 2, 3]))
    E = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    if quantized:
        fmt = draw(st.sampled_from(mk.FORMATS))
        block = draw(st.sampled_from([1, 2, 3, 5, 8, 16]))
        D = block * draw(st.integers(1, 4))
        block = D if fmt == "int8" else block
    else:
        D = draw(st.integers(0, 40))
    shape = (V, E, D) if L is None else (V, L, E, D)
    lut = randn(gen, shape) * torch.exp2(torch.randint(-6, 7, shape[:-1], generator=gen).double())[..., None]
    lut = lut.to(dtype)
    if quantized:
        table = mk.quantize(lut, fmt, block)
        ref = mk.dequantize(table, torch.float32).double()
    else:
        table, ref = lut, lut.double()
    return table, ref, gen


@st.composite
def gather_calls(draw, quantized: bool):
    table, ref, gen = draw(table_cases(quantized))
    V, E = ref.shape[0], ref.shape[-2]
    L = ref.shape[1] if ref.dim() == 4 else 1
    lead = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
    ids = torch.randint(0, max(V, 1), lead, generator=gen)
    if ids.numel() > 1:
        ids.view(-1)[-1] = ids.view(-1)[0]  # a repeated id
    bad = ids.numel() > 0 and (V == 0 or draw(st.booleans()))
    if bad:
        ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = draw(st.sampled_from([-1, V, V + 1000, -2 ** 31]))
    ids = ids.to(draw(st.sampled_from([torch.int32, torch.int64])))
    if draw(st.booleans()):
        ids = strided(ids, gen)
    fused = draw(st.booleans())
    layer = draw(st.none() | st.integers(0, L - 1)) if L > 0 else None
    if fused and ref.dim() == 4 and layer is None:
        layer = draw(st.integers(0, L - 1))
    weights = None
    if fused:
        weights = torch.rand((*lead, E), generator=gen, dtype=torch.float64).to(draw(st.sampled_from(FLOAT_DTYPES)))
        if draw(st.booleans()):
            weights = strided(weights, gen)
    return dict(table=table, ref=ref, ids=ids, weights=weights, layer=layer, bad=bad,
                with_out=draw(st.booleans()), accumulate=fused and draw(st.booleans()),
                with_faults=draw(st.booleans()),
                out_dtype=draw(st.sampled_from(FLOAT_DTYPES)) if fused else None, gen=gen)


def reference_gather(c) -> torch.Tensor:
    """float64 result of a gather call, with bad ids reading zero rows (as under `faults`)."""
    ref, ids, layer = c["ref"], c["ids"].long(), c["layer"]
    V = ref.shape[0]
    ok = (ids >= 0) & (ids < V)
    rows = ref[ids.clamp(0, max(V - 1, 0))] if V else ref.new_zeros((*ids.shape, *ref.shape[1:]))
    rows = rows * ok.reshape(*ids.shape, *([1] * (ref.dim() - 1)))
    if ref.dim() == 4 and layer is not None:
        rows = rows[..., layer, :, :]
    if c["weights"] is None:
        return rows
    return (rows * c["weights"].double()[..., None]).sum(-2)


def run_gather(c):
    """Calls lut_gather as the case says; returns (result, initial out for accumulate, faults)."""
    table, ids, w = c["table"], c["ids"], c["weights"]
    ref_shape = reference_gather({**c, "ids": ids.new_zeros(ids.shape)}).shape
    out = init = None
    if c["with_out"] or c["accumulate"]:
        dtype = c["out_dtype"] if w is not None else table.dtype  # rows: the table's (dequantized) dtype
        if c["accumulate"]:
            out = randn(c["gen"], ref_shape, dtype)
            init = out.double().clone()
        else:
            out = poisoned(ref_shape, dtype)
    faults = torch.zeros(1, dtype=torch.int64) if c["with_faults"] else None
    res = mk.lut_gather(table, ids, w, layer=c["layer"], out=out, accumulate=c["accumulate"], faults=faults)
    if out is not None:
        assert res is out
    return res, init, faults


def check_gather(c):
    if c["bad"] and not c["with_faults"]:
        with pytest.raises(ValueError, match="outside the table's vocabulary"):
            run_gather(c)
        return
    res, init, faults = run_gather(c)
    want = reference_gather(c)
    if init is not None:
        want = want + init
    if faults is not None:
        n_bad = int(((c["ids"] < 0) | (c["ids"] >= c["ref"].shape[0])).sum())
        assert faults.item() == n_bad
    assert tuple(res.shape) == tuple(want.shape)
    if c["weights"] is None:  # rows are copied (float) or dequantized with one rounding: exact
        torch.testing.assert_close(res.double(), want.to(res.dtype).double(), rtol=0, atol=0)
    else:
        scale = (c["ref"].abs().max().item() if c["ref"].numel() else 0.0) * max(1, c["ref"].shape[-2]) + 1
        tol = TOLERANCES[res.dtype]
        torch.testing.assert_close(res.double(), want, rtol=tol["rtol"], atol=tol["atol"] * scale)


# ---------------------------------------------------------------------------------------------
# lut_gather: float and quantized tables, every form

@skip_in_interpreter_child
@props()
@given(gather_calls(quantized=False))
def test_lut_gather_float_tables(case):
    check_gather(case)


@skip_in_interpreter_child
@props()
@given(gather_calls(quantized=True))
def test_lut_gather_quantized_tables(case):
    check_gather(case)


@skip_in_interpreter_child
@props(40)
@given(gather_calls(quantized=False), st.sampled_from(["expanded", "strided"]))
def test_lut_gather_refuses_non_contiguous_out(case, how):
    ref_shape = reference_gather(case).shape
    assume(len(ref_shape) >= 1 and ref_shape[-1] > 1 and 0 not in ref_shape)
    dtype = case["table"].dtype if case["weights"] is None else torch.float32
    out = torch.zeros(ref_shape[:-1] + (1,), dtype=dtype).expand(ref_shape) if how == "expanded" else \
        strided(torch.zeros(ref_shape, dtype=dtype), case["gen"])
    with pytest.raises(ValueError, match="out must be contiguous"):
        mk.lut_gather(case["table"], case["ids"], case["weights"], layer=case["layer"], out=out)


# ---------------------------------------------------------------------------------------------
# LookupTable on the host and disk tiers (path="auto")

@skip_in_interpreter_child
@props(60)
@given(st.booleans(), st.sampled_from(["host", "disk"]), st.data())
def test_lookup_table_tiers(quantized, placement, data):
    table, ref, gen = data.draw(table_cases(quantized))
    assume(ref.shape[0] > 0 and ref.shape[-1] > 0)
    V, E = ref.shape[0], ref.shape[-2]
    lead = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    ids = torch.randint(0, V, lead, generator=gen)
    ids.view(-1)[-1] = ids.view(-1)[0]
    L = ref.shape[1] if ref.dim() == 4 else 1
    layer = data.draw(st.integers(0, L - 1))
    w = torch.rand((*lead, E), generator=gen)
    ref4 = ref if ref.dim() == 4 else ref[:, None]
    with mk.LookupTable.from_tensor(table, placement, device="cpu") as lt:
        rows = lt.gather(ids)
        torch.testing.assert_close(rows.double(), ref4[ids].to(rows.dtype).double(), rtol=0, atol=0)
        one = lt.gather(ids, layer=layer)
        torch.testing.assert_close(one.double(), ref4[ids, layer].to(one.dtype).double(), rtol=0, atol=0)
        fused = lt.gather_combine(ids, w, layer)
        want = (ref4[ids, layer] * w.double()[..., None]).sum(-2)
        scale = ref.abs().max().item() * E + 1
        torch.testing.assert_close(fused.double(), want, rtol=TOLERANCES[fused.dtype]["rtol"],
                                   atol=TOLERANCES[fused.dtype]["atol"] * scale)
        bad = ids.clone()
        bad.view(-1)[0] = V
        with pytest.raises(ValueError, match=str(V)):
            lt.gather(bad)


# ---------------------------------------------------------------------------------------------
# router_softmax and mole_combine (torch fallback here; Triton kernels in the interpreter child)

def logits_strategy(E_max=6):
    return st.tuples(st.integers(0, 2 ** 31 - 1), st.lists(st.integers(0, 4), max_size=2),
                     st.integers(1, E_max), st.sampled_from(FLOAT_DTYPES + [torch.float64]),
                     st.booleans(), st.booleans(), st.booleans())


def make_logits(params):
    seed, lead, E, dtype, transposed, with_neg_inf, all_neg_inf_row = params
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, (*lead, E)) * 4
    if with_neg_inf and E > 1:
        x[..., 0] = float("-inf")
    if all_neg_inf_row and x.numel():
        x.view(-1, E)[0] = float("-inf")  # no defined softmax: a NaN row, on every backend
    x = x.to(dtype)
    if transposed and len(lead) == 1:
        x = x.t().contiguous().t()
    return gen, x


def reference_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.double(), -1)


def check_backend():
    want = "interpret" if INTERPRETER_CHILD else "torch"
    assert combine_mod._backend(torch.empty(1)) == want  # not silently the wrong path


@props()
@given(logits_strategy(), st.sampled_from(FLOAT_DTYPES))
def test_router_softmax(params, out_dtype):
    check_backend()
    _, x = make_logits(params)
    y = mk.router_softmax(x, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), reference_softmax(x).to(out_dtype).double(), equal_nan=True,
                               **TOLERANCES[out_dtype])


@props()
@given(logits_strategy(), st.integers(0, 40), st.sampled_from(FLOAT_DTYPES), st.sampled_from(FLOAT_DTYPES),
       st.booleans(), st.booleans(), st.sampled_from(["none", "separate", "residual"]), st.integers(0, 2))
def test_mole_combine(params, D, rows_dtype, add_dtype, with_residual, with_shared, out_kind, rows_layer):
    check_backend()
    gen, logits = make_logits(params)
    lead, E = tuple(logits.shape[:-1]), logits.shape[-1]
    if len(lead) == 1:  # rows as one layer of a [T, L, E, D] prefetch buffer: a strided view
        rows = randn(gen, (*lead, 3, E, D), rows_dtype)[:, rows_layer]
    else:
        rows = randn(gen, (*lead, E, D), rows_dtype)
    residual = randn(gen, (*lead, D), add_dtype) if with_residual or out_kind == "residual" else None
    shared = randn(gen, (*lead, D), add_dtype) if with_shared else None
    want = (reference_softmax(logits)[..., None] * rows.double()).sum(-2)
    for t in (residual, shared):
        if t is not None:
            want = want + t.double()
    out = {"none": None, "separate": poisoned((*lead, D), add_dtype), "residual": residual}[out_kind]
    res = mk.mole_combine(logits, rows, residual, shared, out=out)
    if out is not None:
        assert res is out
    dtype = out.dtype if out is not None else (residual.dtype if residual is not None else rows.dtype)
    assert res.dtype == dtype and tuple(res.shape) == (*lead, D)
    scale = (rows.double().abs().amax().item() if rows.numel() else 0.0) + 2
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(res.double(), want.to(dtype).double(), equal_nan=True, rtol=tol["rtol"],
                               atol=tol["atol"] * scale)


@skip_in_interpreter_child
@props()
@given(st.booleans(), st.data())
def test_lut_combine(quantized, data):
    table, ref, gen = data.draw(table_cases(quantized))
    V, E, D = ref.shape[0], ref.shape[-2], ref.shape[-1]
    L = ref.shape[1] if ref.dim() == 4 else 1
    lead = tuple(data.draw(st.lists(st.integers(0, 4), max_size=2)))
    layer = data.draw(st.integers(0, L - 1)) if ref.dim() == 4 else data.draw(st.sampled_from([None, 0]))
    ids = torch.randint(0, max(V, 1), lead, generator=gen)
    bad = ids.numel() > 0 and (V == 0 or data.draw(st.booleans()))
    if bad:
        ids.view(-1)[0] = data.draw(st.sampled_from([-1, V, V + 7]))
    logits = randn(gen, (*lead, E), data.draw(st.sampled_from(FLOAT_DTYPES))) * 3
    add_dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    residual = randn(gen, (*lead, D), add_dtype) if data.draw(st.booleans()) else None
    shared = randn(gen, (*lead, D), add_dtype) if data.draw(st.booleans()) else None
    out_kind = data.draw(st.sampled_from(["none", "separate"] + (["residual"] if residual is not None else [])))
    out = {"none": None, "separate": poisoned((*lead, D), add_dtype), "residual": residual}[out_kind]
    faults = torch.zeros(1, dtype=torch.int64) if data.draw(st.booleans()) else None
    ok = (ids >= 0) & (ids < V)
    rows = ref[ids.clamp(0, max(V - 1, 0))] if V else ref.new_zeros((*lead, *ref.shape[1:]))
    rows = (rows[..., layer, :, :] if ref.dim() == 4 else rows) * ok[..., None, None]
    want = (reference_softmax(logits)[..., None] * rows).sum(-2)
    for t in (residual, shared):
        if t is not None:
            want = want + t.double()
    call = lambda: combine_mod.lut_combine(table, ids, logits, layer=layer, residual=residual, shared=shared,
                                           out=out, faults=faults)
    if bad and faults is None:
        with pytest.raises(ValueError, match="outside the table's vocabulary"):
            call()
        return
    res = call()
    if out is not None:
        assert res is out
    if faults is not None:
        assert faults.item() == int((~ok).sum())
    scale = (ref.abs().max().item() if ref.numel() else 0.0) + 2
    tol = TOLERANCES[res.dtype]
    torch.testing.assert_close(res.double(), want.to(res.dtype).double(), rtol=tol["rtol"], atol=tol["atol"] * scale)


@skip_in_interpreter_child
@pytest.mark.skipif(combine_mod.triton is None, reason="needs triton (not installed)")
def test_combine_properties_under_the_triton_interpreter():
    here = os.path.dirname(os.path.abspath(__file__))
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(mk.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([pkg_root, here]))
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           "-k", "router_softmax or mole_combine"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=here)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and " passed" in proc.stdout, f"interpreter run failed:\n{tail}"
