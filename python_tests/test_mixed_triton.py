"""The Triton GPU path of factored and mixed tables (mole_kernels.lowbit_triton), run under the Triton
interpreter on the CPU, against float64 references built from the packed bytes by independent decoders
(Python integers and float16/float32 bytes; test_lowbit.py's and this file's)."""
import os
import struct

import pytest
import torch

from mole_kernels.factored import FactoredLUT, factored_lut_gather, factorize
from mole_kernels.mixed import MixedLUT, mixed_lut_gather, quantize_mixed
from mole_kernels.quant import NF4_LEVELS, QuantizedLUT, row_layout
from conftest import assert_child_ran, child_result, count_cases, module_tests, requires_cuda
from test_lowbit import factored_ref, int8_decode, random_lut, ref_decode

# Triton reads TRITON_INTERPRET once at import, so the interpreted cases run in a child process
# (test_mixed_triton_interpreter_subprocess), which fails unless every one of them passed.
INTERPRETER_CHILD = os.environ.get("TRITON_INTERPRET", "0") == "1"
interpreted = pytest.mark.skipif(not INTERPRETER_CHILD, reason="runs in the TRITON_INTERPRET=1 child of "
                                 "test_mixed_triton_interpreter_subprocess, which fails unless it passed")


def nf4_ref(q: QuantizedLUT) -> torch.Tensor:
    """float64 rows of an nf4 table: nibble codes (element 2k low) times the block's float32 scale."""
    _, off, row_bytes = row_layout(q.format, q.dim, q.block_size)
    levels = [struct.unpack("<f", struct.pack("<f", v))[0] for v in NF4_LEVELS]
    rows = q.data.reshape(-1, row_bytes).tolist()
    out = torch.empty(len(rows), q.dim, dtype=torch.float64)
    for r, row in enumerate(rows):
        scales = struct.unpack(f"<{q.dim // q.block_size}f", bytes(row[off:off + 4 * (q.dim // q.block_size)]))
        for j in range(q.dim):
            out[r, j] = scales[j // q.block_size] * levels[(row[j // 2] >> (4 * (j % 2))) & 15]
    return out.float().double().reshape(q.shape)


def e4m3(code: int) -> float:
    sign, exp, man = -1.0 if code & 128 else 1.0, (code >> 3) & 15, code & 7
    if exp == 15 and man == 7:
        return float("nan")
    return sign * (man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))


def fp8_ref(q: QuantizedLUT) -> torch.Tensor:
    """float64 rows of an fp8_e4m3 table: e4m3 codes decoded by hand times the block's float32 scale."""
    _, off, row_bytes = row_layout(q.format, q.dim, q.block_size)
    rows = q.data.reshape(-1, row_bytes).tolist()
    out = torch.empty(len(rows), q.dim, dtype=torch.float64)
    for r, row in enumerate(rows):
        scales = struct.unpack(f"<{q.dim // q.block_size}f", bytes(row[off:off + 4 * (q.dim // q.block_size)]))
        for j in range(q.dim):
            out[r, j] = scales[j // q.block_size] * e4m3(row[j])
    return out.float().double().reshape(q.shape)


def part_ref(p) -> torch.Tensor:
    if isinstance(p, FactoredLUT):
        return factored_ref(p)
    if isinstance(p, QuantizedLUT):
        return {"int8": int8_decode, "nf4": nf4_ref, "fp8_e4m3": fp8_ref}.get(p.format, ref_decode)(p)
    return p.double()


def mixed_ref(m: MixedLUT) -> torch.Tensor:
    """float64 [V, L, E, D] of a mixed table: each part's reference rows put back at their ids, un-normalised."""
    order = torch.empty(m.vocab_size, dtype=torch.long)
    order[m.rank.long()] = torch.arange(m.vocab_size)
    out = torch.empty(m.shape, dtype=torch.float64)
    for s, p in zip(m.starts, m.parts):
        rows = part_ref(p)
        out[order[s:s + rows.shape[0]]] = rows
    return out * m.col_scale.double() + m.offset.double() if m.normalized else out


@pytest.fixture
def poisoned(monkeypatch):
    """Every result buffer of the Triton gathers starts as NaN: an element no kernel wrote shows."""
    import mole_kernels.lowbit_triton as lt

    monkeypatch.setattr(lt, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


def close(got, want, rtol=2e-6):
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * max(1.0, want.abs().max().item()))


def check_forms(gather, table, want, ids, E, four, L):
    """Rows (every layer, each layer, a slice) and the fused form of each layer, int32 and int64 ids."""
    close(gather(table, ids, dtype=torch.float32), want[ids])
    close(gather(table, ids.int(), dtype=torch.float32), want[ids])
    w = torch.rand(*ids.shape, E)
    for layer in (range(L) if four else [None]):
        rows = want[ids] if layer is None else want[ids, layer]
        if layer is not None:
            close(gather(table, ids, layer=layer, dtype=torch.float32), rows)
        fused = gather(table, ids.int(), w, layer=layer, dtype=torch.float32)
        close(fused, (w.double()[..., None] * rows).sum(-2), rtol=1e-5)
        bf = gather(table, ids, w, layer=layer, dtype=torch.bfloat16)
        assert bf.dtype == torch.bfloat16
        close(bf.float(), (w.double()[..., None] * rows).sum(-2), rtol=1e-2)
    if four and L > 1:
        close(gather(table, ids, layer=slice(1, L), dtype=torch.float32), want[ids, 1:])
        close(gather(table, ids, layer=-1, dtype=torch.float32), want[ids, -1])


def check_faults_and_errors(gather, table, V, E, four):
    layer = 0 if four else None
    with pytest.raises(ValueError, match=f"contains {V}"):
        gather(table, torch.tensor([0, V]), layer=layer)
    faults = torch.zeros(1, dtype=torch.int64)
    ids = torch.tensor([1, V, -3, 1])
    w = torch.rand(4, E)
    rows = gather(table, ids, layer=layer, faults=faults, dtype=torch.float32)
    fused = gather(table, ids, w, layer=layer, faults=faults, dtype=torch.float32)
    assert faults.tolist() == [4]  # two bad ids, two calls: counted once per token, not per block of columns
    assert (rows[1:3] == 0).all() and (fused[1:3] == 0).all() and torch.equal(rows[0], rows[3])
    empty = gather(table, torch.zeros(0, dtype=torch.long), layer=layer)
    assert empty.shape == (0, *rows.shape[1:])
    assert gather(table, torch.zeros(0, 3, dtype=torch.int32), torch.rand(0, 3, E), layer=layer).shape[:2] == (0, 3)
    with pytest.raises(ValueError, match="weights"):
        gather(table, ids[:1], torch.rand(1, E + 1), layer=layer)


# (shape, rank, bits): odd D, E = 1, a [V, E, D] table, two blocks of columns (D > 128) and two rank chunks;
# every code width from 2 to 8 bits (3, 5, 6, 7 straddle bytes)
FACTORED_CASES = [((13, 2, 3, 37), 5, 3), ((9, 1, 1, 24), 24, 8), ((11, 3, 19), 7, 5), ((10, 2, 2, 130), 20, 6),
                  ((8, 1, 2, 20), 9, 2), ((7, 2, 21), 6, 4), ((6, 1, 2, 11), 11, 7)]


@interpreted
@pytest.mark.parametrize("shape, rank, bits", FACTORED_CASES)
def test_interpreted_factored_gather_matches_float64(shape, rank, bits, poisoned):
    from mole_kernels.lowbit_triton import factored_gather_triton

    q = factorize(random_lut(shape), rank, bits, counts=torch.randint(0, 50, (shape[0],)))
    want = factored_ref(q)
    ids = torch.randint(0, shape[0], (2, 3))
    ids[1, 2] = ids[0, 1]  # a repeated id
    four = len(shape) == 4
    check_forms(factored_gather_triton, q, want, ids, shape[-2], four, shape[1] if four else 1)
    check_faults_and_errors(factored_gather_triton, q, shape[0], shape[-2], four)


# every part format the mixed gather reads: float, int8, nf4, fp8, q3, q2, q1 and factored
MIXED_PLAN = [(None, 3), ("int8", 4), ("nf4", 3), ("fp8", 3), ("q3", 4), ("q2", 4), ("q1", 4), ("f5x6", None)]


@interpreted
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(31, 2, 3, 24), (29, 1, 1, 17), (27, 2, 20)])
def test_interpreted_mixed_gather_matches_float64(shape, normalize, poisoned):
    from mole_kernels.lowbit_triton import mixed_gather_triton

    lut = random_lut(shape)
    lut += torch.randn(shape[1:]) * 3  # column offsets
    counts = torch.randint(0, 1000, (shape[0],))
    m = quantize_mixed(lut, counts, MIXED_PLAN, normalize=normalize)
    want = mixed_ref(m)
    order = torch.empty(m.vocab_size, dtype=torch.long)
    order[m.rank.long()] = torch.arange(m.vocab_size)
    ids = torch.stack([order[s] for s in m.starts] + [order[m.starts[4]], order[-1]])  # every part, a repeat
    assert len(set(m.rank[ids].tolist())) == len(m.parts) + 1
    four = len(shape) == 4
    check_forms(mixed_gather_triton, m, want, ids.view(2, -1), shape[-2], four, shape[1] if four else 1)
    check_faults_and_errors(mixed_gather_triton, m, shape[0], shape[-2], four)


@interpreted
def test_interpreted_lowbit_gather_reads_every_layer_and_counts_faults(poisoned):
    from mole_kernels.lowbit_triton import lowbit_gather_triton
    from mole_kernels.quant import quantize

    q = quantize(random_lut((15, 3, 2, 40)), "q3", 8)
    check_forms(lowbit_gather_triton, q, ref_decode(q), torch.tensor([[3, 0, 14], [3, 7, 2]]), 2, True, 3)
    check_faults_and_errors(lowbit_gather_triton, q, 15, 2, True)


@pytest.mark.skipif(INTERPRETER_CHILD, reason="the parent of the interpreter child")
@pytest.mark.child_run(args=[__file__, "-k", "interpreted"], env={"TRITON_INTERPRET": "1"})
def test_mixed_triton_interpreter_subprocess(request):
    pytest.importorskip("triton")
    result = child_result(request)
    assert_child_ran(result, count_cases(module_tests(globals(), lambda fn: fn.__name__.startswith("test_interpreted"))))


@requires_cuda
def test_cuda_mixed_and_factored_gathers_use_triton_and_match_the_cpu():
    lut = random_lut((200, 2, 3, 64))
    m = quantize_mixed(lut, torch.randint(0, 100, (200,)), [("int8", 16), ("f12x5", None)], normalize=True)
    ids = torch.randint(0, 200, (5, 7))
    w = torch.rand(5, 7, 3)
    mc = MixedLUT(m.rank.cuda(), [m.parts[0].to("cuda"), FactoredLUT(m.parts[1].data.cuda(), m.parts[1].basis.cuda(),
                                                                     m.parts[1].bits, m.parts[1].dtype)],
                  m.offset.cuda(), m.col_scale.cuda())
    for layer in (0, 1):
        cpu = mixed_lut_gather(m, ids, w, layer=layer, dtype=torch.float32)
        torch.testing.assert_close(mixed_lut_gather(mc, ids.cuda(), w.cuda(), layer=layer, dtype=torch.float32).cpu(),
                                   cpu, rtol=1e-5, atol=1e-4)
    f = mc.parts[1]
    torch.testing.assert_close(factored_lut_gather(f, ids.cuda(), dtype=torch.float32).cpu(),
                               factored_lut_gather(m.parts[1], ids, dtype=torch.float32), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kernel", ["codebook", "factored"])
def test_kernels_compile_for_a_cuda_target(kernel, fused):
    """The interpreter is more lenient than the compiler: compile both kernels (mixed, normalised, fused or
    rows, faults: every constexpr branch that the GPU runs) for sm_90, through ptxas, with no GPU."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 replaces the kernels with interpreted functions; run without it to compile")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import mole_kernels.lowbit_triton as lt

    if kernel == "codebook":
        fn, ptrs = lt._codebook_kernel, ["*u8", "*i64", "*i32", "*fp32", "*fp32", "*fp32", "*fp32", "*bf16", "*i64"]
        const = dict(BITS=3, BLOCK=64, SCALE_BYTES=2, FLOAT=False)
    else:
        fn, ptrs = lt._factored_kernel, ["*u8", "*fp16", "*i32", "*i32", "*fp32", "*fp32", "*fp32", "*fp32", "*i64"]
        const = dict(BITS=5, ROW_BYTES=24, R_BLK=16)
    const.update(MIXED=True, ZERO_BAD=True, HAS_FAULTS=True, NORM=True, FUSED=fused, BLOCK_D=128)
    signature = {name: ptrs[i] if i < len(ptrs) else "i64" for i, name in enumerate(fn.arg_names)}  # pointers first
    signature.update({k: "constexpr" for k in const})
    compiled = triton.compile(ASTSource(fn, signature, constexprs=const), target=GPUTarget("cuda", 90, 32))
    assert ".target sm_90" in compiled.asm["ptx"] and compiled.asm["cubin"]
