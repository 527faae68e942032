"""The fused CPU gather of mixed-precision tables (torch.ops.mole_kernels.lut_gather_mixed,
csrc/lut_gather_mixed_cpu.cpp) and its decode-step call (mole_kernels._C._lut_combine_mixed).

Every result is compared with a float64 reference built here from each part's own dequantization
(quantized parts: mole_kernels.dequantize, exact in float32; factored parts: coefficients times basis
in float64), column scale and offset applied in float64 and the rows put in place by rank.
"""
import pytest
import torch

from mole_kernels import _C
from mole_kernels.factored import FactoredLUT, factored_lut_gather, factorize
from mole_kernels.mixed import MixedLUT, mixed_lut_gather, mixed_op_args, quantize_mixed
from mole_kernels.quant import QuantizedLUT, dequantize
from conftest import assert_child_ran, child_result, count_cases, module_tests

# Plans that put rows in every kind of part: float, every quantized format, factored.
PLANS = [
    [(None, 3), ("int8", 4), ("fp8", 5), ("nf4", 6), ("q3", 7), ("q2", 8), ("q1", None)],
    [("int8", 5), ("f6x5", None)],
    [("nf4", 4), ("f3x8", 9), ("q2", None)],
    [("f5x2", None)],
]
# [V, L, E, D] or [V, E, D]: odd D, E = 1, block sizes that are not multiples of 16 (block 1 where D is odd).
SHAPES = [(60, 2, 3, 40), (50, 3, 1, 37), (45, 4, 24), (64, 1, 2, 130)]


def random_lut(shape):
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3 + torch.randn(shape[-1])  # column offsets
    return x


def mixed_case(plan, shape, normalize, seed=0):
    torch.manual_seed(seed)
    lut = random_lut(shape)
    counts = torch.randint(0, 1000, (shape[0],))
    D = shape[-1]
    blocks = [None if (fmt is None or fmt.startswith("f")) else (D if fmt == "int8" else (8 if D % 8 == 0 else 1))
              for fmt, _ in plan]
    return quantize_mixed(lut, counts, plan, block_sizes=blocks, normalize=normalize)


def ref_table(m: MixedLUT) -> torch.Tensor:
    """float64 [V, L, E, D] of a mixed table from each part's own dequantization."""
    out = torch.empty(m.shape, dtype=torch.float64)
    rank = m.rank.long()
    order = torch.empty_like(rank)
    order[rank] = torch.arange(m.vocab_size)
    for s, p in zip(m.starts, m.parts):
        if isinstance(p, QuantizedLUT):
            x = dequantize(p, torch.float32).double()
        elif isinstance(p, FactoredLUT):
            x = torch.einsum("...r,...rd->...d", p.coefficients().double(), p.basis.double())
        else:
            x = p.double()
        if m.normalized:
            x = x * m.col_scale.double() + m.offset.double()
        out[order[s:s + x.shape[0]]] = x
    return out


def close(got, want, dtype=torch.float32):
    scale = want.abs().max().item() + 1
    tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype] * scale
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


def ids_in_every_part(m: MixedLUT, n=3):
    """Ids of n ranks of every part (first, last, middle) plus a repeat."""
    order = torch.empty(m.vocab_size, dtype=torch.long)
    order[m.rank.long()] = torch.arange(m.vocab_size)
    ranks = []
    for s, p in zip(m.starts, m.parts):
        rows = p.shape[0] if isinstance(p, torch.Tensor) else p.vocab_size
        ranks += [s, s + rows - 1, s + rows // 2][:n]
    ids = order[torch.tensor(ranks)]
    return torch.cat([ids, ids[:2]])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("plan", range(len(PLANS)))
def test_rows_and_fused_match_float64(plan, shape, normalize):
    m = mixed_case(PLANS[plan], shape, normalize)
    full = ref_table(m)
    ids = ids_in_every_part(m)
    E = shape[-2]
    layers = range(shape[1]) if len(shape) == 4 else [None]
    close(mixed_lut_gather(m, ids, dtype=torch.float32), full[ids])  # all layers
    for id_dtype in (torch.int64, torch.int32):
        for layer in layers:
            rows = full[ids] if layer is None else full[ids, layer]
            close(mixed_lut_gather(m, ids.to(id_dtype), layer=layer, dtype=torch.float32), rows)
            w = torch.rand(E, ids.numel()).t()  # non-contiguous weights
            want = (w.double()[..., None] * rows).sum(-2)
            close(mixed_lut_gather(m, ids.to(id_dtype), w, layer=layer, dtype=torch.float32), want)
            for dtype in (torch.bfloat16, torch.float16):
                close(mixed_lut_gather(m, ids, w.to(dtype), layer=layer, dtype=dtype), want, dtype)
    if len(shape) == 4 and shape[1] > 2:
        close(mixed_lut_gather(m, ids, layer=slice(1, 3), dtype=torch.float32), full[ids, 1:3])


def test_shapes_empty_ids_and_ids_of_any_shape():
    m = mixed_case(PLANS[0], (60, 2, 3, 40), True)
    full = ref_table(m)
    empty = torch.empty(0, dtype=torch.long)
    assert mixed_lut_gather(m, empty, layer=1).shape == (0, 3, 40)
    assert mixed_lut_gather(m, empty, torch.rand(0, 3), layer=1).shape == (0, 40)
    ids = ids_in_every_part(m)[:12].view(3, 4)
    w = torch.rand(3, 4, 3)
    close(mixed_lut_gather(m, ids, w, layer=0, dtype=torch.float32), (w.double()[..., None] * full[ids, 0]).sum(-2))
    assert mixed_lut_gather(m, ids, w, layer=0).dtype == m.dtype


def test_bad_ids_layers_and_weights_are_refused():
    m = mixed_case(PLANS[1], (60, 2, 3, 40), True)
    for bad in (60, -1):
        with pytest.raises(ValueError, match=f"contains {bad}"):
            mixed_lut_gather(m, torch.tensor([1, bad]), torch.rand(2, 3), layer=0)
    with pytest.raises(ValueError, match="layer"):
        mixed_lut_gather(m, torch.tensor([1]), torch.rand(1, 3))  # fused needs a layer
    with pytest.raises(ValueError, match="layer"):
        mixed_lut_gather(m, torch.tensor([1]), layer=2)
    with pytest.raises(ValueError, match="weights"):
        mixed_lut_gather(m, torch.tensor([1, 2]), torch.rand(2, 4), layer=0)
    with pytest.raises(ValueError, match="float"):
        mixed_lut_gather(m, torch.tensor([1]), layer=0, dtype=torch.int32)
    (rank, parts, formats, blocks, bases, dim), _ = mixed_op_args(m)
    ops = torch.ops.mole_kernels
    with pytest.raises(ValueError, match="rank has"):
        ops.lut_gather_mixed(rank[:-1].contiguous(), parts, formats, blocks, bases, dim, torch.tensor([0]))
    with pytest.raises(ValueError, match="bases"):
        ops.lut_gather_mixed(rank, parts, formats, blocks, [], dim, torch.tensor([0]))
    with pytest.raises(ValueError, match="float16"):  # the basis as the table stores it, not a float32 copy
        ops.lut_gather_mixed(rank, parts, formats, blocks, [b.float() for b in bases], dim, torch.tensor([0]))
    with pytest.raises(ValueError, match="bytes"):
        ops.lut_gather_mixed(rank, parts, formats, [blocks[0], blocks[1] + 1], bases, dim, torch.tensor([0]))
    with pytest.raises(ValueError, match="one entry per part"):
        ops.lut_gather_mixed(rank, parts, "int8", blocks, bases, dim, torch.tensor([0]))
    bad_rank = rank.clone()
    bad_rank[5] = 1000
    with pytest.raises(ValueError, match="corrupt rank"):
        ops.lut_gather_mixed(bad_rank, parts, formats, blocks, bases, dim, torch.tensor([5]))


def test_factored_gather_alone_matches_float64():
    torch.manual_seed(1)
    lut = random_lut((40, 2, 3, 33))
    q = factorize(lut, 5, 6)
    full = torch.einsum("...r,...rd->...d", q.coefficients().double(), q.basis.double())
    ids = torch.tensor([0, 39, 7, 7, 20])
    w = torch.rand(5, 3)
    close(factored_lut_gather(q, ids, layer=1, dtype=torch.float32), full[ids, 1])
    close(factored_lut_gather(q, ids, w, layer=1, dtype=torch.float32), (w.double()[..., None] * full[ids, 1]).sum(-2))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_call_matches_float64(normalize, dtype):
    """_C._lut_combine_mixed: residual + shared + softmax(x @ W^T)-weighted rows, as a model's layer calls it."""
    m = mixed_case(PLANS[1 if normalize else 0], (60, 2, 3, 40), normalize)
    full = ref_table(m)
    handle = _C._mixed_table(*mixed_op_args(m)[0], *mixed_op_args(m)[1])
    for T in (1, 5, 70):  # 70: past the step's stack of token places
        ids = torch.randint(0, 60, (T,))
        ids[-1] = ids[0]
        x, W = torch.randn(T, 16).to(dtype), torch.randn(3, 16).to(dtype)
        res, sh = torch.randn(T, 40).to(dtype), torch.randn(T, 40).to(dtype)
        for layer in (0, 1):
            got = _C._lut_combine_mixed(handle, ids, layer, x, res, sh, W)
            w = torch.softmax(torch.nn.functional.linear(x, W).float(), -1).double()
            want = res.double() + sh.double() + (w[..., None] * full[ids, layer]).sum(-2)
            assert got.dtype == dtype
            close(got, want, dtype)
            logits = torch.randn(T, 3)
            weights = torch.softmax(logits, -1).double()
            want = res.double() + sh.double() + (weights[..., None] * full[ids, layer]).sum(-2)
            close(_C._lut_combine_mixed(handle, ids, layer, logits, res, sh, None), want, dtype)
    with pytest.raises(ValueError, match="contains 60"):
        _C._lut_combine_mixed(handle, torch.tensor([60]), 0, torch.randn(1, 3), None, None, None)
    with pytest.raises(ValueError, match="residual"):
        _C._lut_combine_mixed(handle, torch.tensor([1]), 0, torch.randn(1, 3), torch.randn(1, 39), None, None)
    with pytest.raises(ValueError, match="layer"):
        _C._lut_combine_mixed(handle, torch.tensor([1]), 2, torch.randn(1, 3), None, None, None)


@pytest.mark.parametrize("shape,plan", [((61, 3, 1, 37), [("int8", 5), ("f6x5", None)]),
                                        ((50, 2, 5, 130), [("nf4", 4), ("f3x8", 9), ("q2", None)]),
                                        ((40, 1, 2, 16), [(None, 3), ("int8", 4), ("f5x2", None)])])
@pytest.mark.parametrize("normalize", [False, True])
def test_decode_step_lean_path_matches_float64(shape, plan, normalize):
    """The step call's lean path (a layered table, up to 64 contiguous ids, x and W of one dtype, contiguous
    residual/shared) and the calls it leaves to the general path (empty, int32 ids, mixed dtypes, strided x,
    more tokens): odd D, E = 1, repeated ids, rows in every part, every layer, against float64."""
    V, L, E, D = shape
    m = mixed_case(plan, shape, normalize, seed=V)
    full = ref_table(m)
    handle = _C._mixed_table(*mixed_op_args(m)[0], *mixed_op_args(m)[1])
    every = ids_in_every_part(m)
    for T in (0, 1, 3, 16, 17, 64, 65):
        ids = torch.cat([every, torch.randint(0, V, (T,))])[:T]
        if T > 2:
            ids[T // 2] = ids[0]  # a repeat
        for ids_dtype, x_dtype, dtype, strided in [(torch.int64, torch.float32, torch.float32, False),
                                                   (torch.int32, torch.float32, torch.float32, False),
                                                   (torch.int64, torch.bfloat16, torch.bfloat16, False),
                                                   (torch.int64, torch.float32, torch.bfloat16, False),
                                                   (torch.int64, torch.float32, torch.float32, True)]:
            step_ids = ids.to(ids_dtype).view(1, T)
            K = 9
            x = torch.randn(1, T, 2 * K)[..., ::2] if strided else torch.randn(1, T, K)
            x, W = x.to(x_dtype), torch.randn(E, K).to(x_dtype)
            res, sh = torch.randn(1, T, D).to(dtype), torch.randn(1, T, D).to(dtype)
            w = torch.softmax(torch.nn.functional.linear(x.float(), W.float()), -1).double()
            for layer in range(L):
                got = _C._lut_combine_mixed(handle, step_ids, layer, x, res, sh, W)
                want = res.double() + sh.double() + (w[..., None] * full[step_ids.long(), layer]).sum(-2)
                assert got.dtype == dtype and got.shape == (1, T, D)
                if T:
                    close(got, want, dtype if x_dtype == torch.float32 else torch.bfloat16)
    with pytest.raises(ValueError, match=f"contains {V}"):  # the lean path leaves a bad id to the general one
        _C._lut_combine_mixed(handle, torch.tensor([0, V]), 0, torch.randn(2, 4), torch.randn(2, D),
                              torch.randn(2, D), torch.randn(E, 4))


@pytest.mark.parametrize("shape,rank", [((90, 2, 3, 37), 9), ((90, 1, 1, 130), 17), ((90, 2, 2, 16), 1),
                                        ((90, 1, 4, 48), 8)])
@pytest.mark.parametrize("normalize", [False, True])
def test_factored_products_of_every_group_size_and_bits(shape, rank, normalize):
    """The factored product (AVX-512: float16 basis widened in registers, column scale after each expert's
    sum; AVX2, in a child run below: the same in 8-column vectors; scalar path, in another: a float32 copy of the
    basis, column scale after each expert's sum) in
    groups of 1 to 8 tokens, a part per code width (2 to 8 bits: codes 8 at a time, a rank that is not a
    multiple of 8 leaves a tail), odd D and D past one column block, E = 1: the rows and fused gathers and
    the step call (lean path up to 64 tokens, general path beyond), T = 1 to 65, against float64."""
    V, L, E, D = shape
    plan = [("int8", 5)] + [(f"f{rank}x{bits}", 10) for bits in range(2, 9)] + [("nf4", None)]
    m = mixed_case(plan, shape, normalize, seed=D)
    full = ref_table(m)
    order = torch.empty(V, dtype=torch.long)
    order[m.rank.long()] = torch.arange(V)
    handle = _C._mixed_table(*mixed_op_args(m)[0], *mixed_op_args(m)[1])
    g = torch.Generator().manual_seed(V)
    for T in (1, 2, 3, 5, 8, 9, 32, 64, 65):
        # runs of 1 to 9 tokens of one factored part between int8 / nf4 tokens: every group size and flush
        part_of = torch.randint(1, 8, (T,), generator=g)
        part_of[torch.randperm(T, generator=g)[:T // 5]] = 0
        part_of = part_of.sort(stable=True).values if T % 2 else part_of
        ranks = torch.where(part_of == 0, torch.randint(0, 5, (T,), generator=g),
                            5 + 10 * (part_of - 1) + torch.randint(0, 10, (T,), generator=g))
        ids = order[ranks]
        if T > 2:
            ids[-1] = ids[0]  # a repeat
        for layer in range(L):
            close(mixed_lut_gather(m, ids, layer=layer, dtype=torch.float32), full[ids, layer])
            w = torch.rand(T, E, generator=g)
            close(mixed_lut_gather(m, ids, w, layer=layer, dtype=torch.float32),
                  (w.double()[..., None] * full[ids, layer]).sum(-2))
            x, W = torch.randn(1, T, 6, generator=g), torch.randn(E, 6, generator=g)
            res, sh = torch.randn(1, T, D, generator=g), torch.randn(1, T, D, generator=g)
            wt = torch.softmax(torch.nn.functional.linear(x, W), -1).double()
            got = _C._lut_combine_mixed(handle, ids.view(1, T), layer, x, res, sh, W)
            close(got, res.double() + sh.double() + (wt[..., None] * full[ids.view(1, T), layer]).sum(-2))


def test_compiled_gather_matches_eager():
    m = mixed_case(PLANS[1], (60, 2, 3, 40), True)
    ids, w = ids_in_every_part(m), torch.rand(ids_in_every_part(m).numel(), 3)

    def fused(ids, w):
        return mixed_lut_gather(m, ids, w, layer=1, dtype=torch.float32)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fused, fullgraph=True)(ids, w), fused(ids, w), rtol=0, atol=0)


SCALAR_CHILD_TESTS = ("test_rows_and_fused_match_float64", "test_decode_step_call_matches_float64",
                      "test_decode_step_lean_path_matches_float64", "test_factored_products_of_every_group_size_and_bits")


@pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.child_run(args=[__file__, "-k", " or ".join(SCALAR_CHILD_TESTS)],
                                                  env={"MOLE_KERNELS_CPU_ISA": isa}))
    for isa in ("scalar", "avx2")])
def test_capped_cpu_paths(isa, request):
    """The kernels pick AVX-512, AVX2 (the factored product; the rest scalar) or scalar code at run time; run
    the gather tests capped at each lower one."""
    result = child_result(request)
    assert_child_ran(result, count_cases(module_tests(globals(), lambda fn: fn.__name__ in SCALAR_CHILD_TESTS)))


@pytest.mark.parametrize("normalize", [False, True])
def test_host_and_disk_tables_serve_steps_as_float64(tmp_path, normalize):
    """MixedLookupTable from a save_mixed file, host and disk tiers: gathers and the readers' step calls
    (the disk tier's rows read per step into staging, ids repeated, in every part, a growing batch)."""
    from mole_kernels.mixed import save_mixed
    from mole_kernels.table import MixedLookupTable

    m = mixed_case(PLANS[0] if not normalize else PLANS[1], (60, 2, 3, 40), normalize)
    full = ref_table(m)
    path = tmp_path / "mixed.safetensors"
    save_mixed(path, m)
    for placement in ("host", "disk"):
        t = MixedLookupTable.open(path, placement)
        assert t.placement == placement and t.shape == m.shape
        ids = ids_in_every_part(m)
        close(t.gather(ids, layer=1).float(), full[ids, 1].to(m.dtype).double(), torch.bfloat16)
        reader = t.reader()
        for T in (1, 7, ids.numel(), 40):
            step_ids = torch.cat([ids, torch.randint(0, 60, (40,))])[:T].view(1, T)
            logits, res, sh = torch.randn(1, T, 3), torch.randn(1, T, 40), torch.randn(1, T, 40)
            call = reader.start(step_ids)
            for layer in (0, 1):
                want = res.double() + sh.double() + (torch.softmax(logits, -1).double()[..., None]
                                                     * full[step_ids, layer]).sum(-2)
                close(call(layer, logits, res, sh), want)
        with pytest.raises(ValueError, match="contains 60"):
            reader.start(torch.tensor([3, 60]))(0, torch.randn(2, 3), torch.randn(2, 40), torch.randn(2, 40))
        t.close()
    raw = bytearray(path.read_bytes())
    (tmp_path / "short.safetensors").write_bytes(bytes(raw[:-7]))
    with pytest.raises(Exception):
        MixedLookupTable.open(tmp_path / "short.safetensors", "disk")


def test_opcheck():
    """torch.library.opcheck on both ops (schema, fake kernel, dispatch), rows and fused forms."""
    m = mixed_case(PLANS[1], (60, 2, 3, 40), True)
    head, norm = mixed_op_args(m)
    ids = ids_in_every_part(m)
    ops = torch.ops.mole_kernels
    T = ids.numel()
    for args in [(*head, ids, None, 1, *norm, torch.float32, None),
                 (*head, ids, torch.rand(T, 3), 0, *norm, torch.bfloat16, None),
                 (*head, ids.int(), None, 0, *norm, None, 2)]:
        torch.library.opcheck(ops.lut_gather_mixed, args)
    torch.library.opcheck(ops.lut_combine_mixed, (*head, ids, torch.randn(T, 3), 1, *norm, torch.randn(T, 40),
                                                  torch.randn(T, 40)))
