"""The decode path: layer ranges in one gather, grouped prefetch launches, the per-step reader, and the
invariants that keep a MoLE step at dense cost (one fused call per layer, ids checked on entry only)."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mole_kernels import (DenseForCausalLM, LayerReader, LookupTable, MoLEConfig, MoLEForCausalLM, dequantize,
                          lut_gather, quantize)
from mole_kernels.model.layers import StaticKVCache
from mole_kernels.table.prefetch import layer_groups

from conftest import HAS_CUDA, assert_child_ran, child_result, requires_cuda

V, L, E, D = 40, 5, 3, 12


def random_ids(n, V=V):
    ids = torch.randint(0, V, (n,))
    if n > 1:
        ids[1] = ids[0]  # a repeated id
    return ids


# ------------------------------------------------------------------ layer ranges ----------------------


@pytest.mark.parametrize("quantized", [False, True])
def test_layer_range_into_a_strided_buffer(quantized):
    lut = torch.randn(V, L, E, D).bfloat16()
    table = quantize(lut, "int8") if quantized else lut
    ref = (dequantize(table) if quantized else lut).to(torch.bfloat16)
    ids = random_ids(6)
    buf = torch.full((8, L, E, D), float("nan"), dtype=torch.bfloat16)  # [max_tokens, L, E, D]
    got = lut_gather(table, ids, layer=slice(1, 4), out=buf[:6, 1:4])
    assert got.shape == (6, 3, E, D) and torch.equal(buf[:6, 1:4], ref[ids, 1:4])
    assert buf[:6, 0].isnan().all() and buf[:6, 4].isnan().all() and buf[6:].isnan().all()  # nothing else touched
    assert torch.equal(lut_gather(table, ids, layer=slice(2, None)), ref[ids, 2:])  # functional, open end
    assert torch.equal(lut_gather(table, ids, layer=slice(-1, None)), ref[ids, 4:])


def test_layer_range_errors():
    lut, ids = torch.randn(V, L, E, D), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="consecutive layers"):
        lut_gather(lut, ids, layer=slice(0, 4, 2))
    with pytest.raises(ValueError, match="consecutive layers"):
        lut_gather(lut, ids, layer=slice(3, 3))
    with pytest.raises(ValueError, match="rows form"):
        lut_gather(lut, ids, torch.rand(2, E), layer=slice(0, 2))
    with pytest.raises(ValueError, match="layer must be an int, a slice"):
        lut_gather(lut, ids, layer=True)
    buf = torch.empty(2, 2 * L, E, D)
    with pytest.raises(ValueError, match="out must be contiguous, or a \\[T, ...\\] view"):
        lut_gather(lut, ids, layer=slice(0, 2), out=buf[:, ::2][:, :2])  # layers strided: not a row block


def test_layer_groups_double_and_cover_every_layer():
    for n in range(1, 40):
        groups = layer_groups(n)
        assert [a for a, _ in groups] == [0] + [b for _, b in groups[:-1]] and groups[-1][1] == n
        sizes = [b - a for a, b in groups]
        assert all(s2 == 2 * s1 for s1, s2 in zip(sizes[1:-1], sizes[2:-1]))  # doubling (the last is cut at n)
    assert layer_groups(24) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 24)]


# ------------------------------------------------------------------ prefetcher: bad ids on every path --


@pytest.mark.parametrize("placement,path", [("host", "zero_copy"), ("host", "dma"), ("disk", "staged")])
def test_prefetcher_bad_ids_named_or_counted_on_every_path(placement, path):
    lut = torch.randn(V, L, E, D)
    t = LookupTable.from_tensor(lut, placement, device="cpu")
    ids = torch.tensor([3, V + 7, 5, -2, 3])
    with pytest.raises(ValueError, match=rf"ids contains {V + 7} \(at flat position 1\)"):  # the first, by position
        t.prefetcher(8).start(ids, path=path)
    with pytest.raises(ValueError, match=rf"ids contains {V + 7} \(at flat position 1\)"):  # not the smallest (-2)
        t.gather(ids, path=path)
    pf = t.prefetcher(8, strict=False)  # counted, never raised, on the dedupe paths too
    h = pf.start(ids, path=path)
    assert pf.faults == 2
    for l in range(L):
        rows = h.layer(l)
        assert torch.equal(rows[[0, 2, 4]], lut[ids[[0, 2, 4]], l]) and (rows[[1, 3]] == 0).all()


@pytest.mark.parametrize("path", ["zero_copy", "dma"])
def test_prefetcher_every_layer_count_from_1_to_25(path, monkeypatch):
    """Every L in [1, 25]: the prefetch launches are exactly layer_groups(L) (the group boundaries the
    GPU's per-group events wait on, launched on a CPU too), every layer's rows are right in a
    NaN-poisoned buffer, and with strict=False each bad id is counted exactly once per start."""
    import mole_kernels.table.prefetch as prefetch_mod

    launched = []
    real = prefetch_mod.lut_gather

    def spy(src, idx, **kw):
        launched.append((kw["layer"].start, kw["layer"].stop))
        return real(src, idx, **kw)

    monkeypatch.setattr(prefetch_mod, "lut_gather", spy)
    Vs, Es, Ds, T = 23, 2, 5, 9
    for nl in range(1, 26):
        lut = torch.randn(Vs, nl, Es, Ds)
        table = LookupTable.from_tensor(lut, "host", device="cpu")
        pf = table.prefetcher(T, strict=False)
        counted = 0
        for start in range(3):  # three starts: both buffers, then the first again; counts accumulate
            ids = torch.randint(0, Vs, (T,))
            ids[1] = ids[0]  # a repeated id
            bad_at = torch.randperm(T)[:start + 1]  # 1, 2, 3 bad ids, at random positions
            ids[bad_at] = torch.tensor([-1, Vs, Vs + 100, -7])[torch.randint(0, 4, (start + 1,))]
            for buf in pf._bufs:
                buf.fill_(float("nan"))
            launched.clear()
            handle = pf.start(ids, path=path)
            assert launched == layer_groups(nl), (nl, launched)
            counted += start + 1
            assert pf.faults == counted, (nl, start, pf.faults, counted)
            ok = (ids >= 0) & (ids < Vs)
            for l in range(nl):
                rows = handle.layer(l)
                assert torch.equal(rows[ok], lut[ids[ok], l]), (nl, l)
                assert (rows[~ok] == 0).all(), (nl, l)
        table.close()


def test_reader_counts_its_cpu_steps_into_the_table_stats():
    """table.stats counts every CPU step of every reader of a table (the usual step's fast path): each id's
    rows once per step, none after reset_stats; the general path (autograd on) into the same counters."""
    t = LookupTable.from_tensor(torch.randn(V, L, E, D), "host", device="cpu")
    readers = [t.reader(), t.reader()]
    sizes = [1, 5, 3, 8]
    x = torch.randn(8, D)
    with torch.no_grad():
        for i, n in enumerate(sizes):
            ids = torch.randint(0, V, (n,))
            readers[i % 2].start(ids)(1, x[:n], x[:n], x[:n], torch.randn(E, D))
            s = t.stats
            assert (s.calls, s.rows_requested) == (i + 1, sum(sizes[:i + 1]))
            assert s.bytes_read["host"] == sum(sizes[:i + 1]) * t.row_bytes
        readers[0].start(torch.arange(4))
        t.reset_stats()
        assert (t.stats.calls, t.stats.rows_requested, t.stats.bytes_read["host"]) == (0, 0, 0)
        readers[1].start(torch.arange(2))
    readers[0].start(torch.arange(3))  # autograd on: the general path
    assert (t.stats.calls, t.stats.rows_requested, t.stats.bytes_read["host"]) == (2, 5, 5 * t.row_bytes)
    t.close()


def test_reader_bulk_step_reads_unique_rows_once_and_counts_bad_ids():
    """The host tier's many-token step (ids on the GPU there; the same code on a CPU here): unique rows
    prefetched once, each layer combined at the tokens' positions among them, bad ids counted once."""
    lut = torch.randn(V, L, E, D)
    t = LookupTable.from_tensor(lut, "host", device="cpu")
    reader = t.reader()
    ids = torch.randint(0, 6, (3, 50))  # 150 tokens over at most 6 distinct ids
    ids[0, 3], ids[2, 7] = V, -4
    ok = (ids >= 0) & (ids < V)
    step = reader._start_bulk(ids)
    assert reader._prefetcher.max_tokens <= 7  # the unique ids (<= 6, plus the stand-in for bad ones)
    assert t.stats.bytes_read["host"] <= 7 * t.row_bytes  # each unique row read once, not once per token
    ref = torch.where(ok, ids, 0)
    for l in range(L):
        logits, h, shared = torch.randn(3, 50, E), torch.randn(3, 50, D), torch.randn(3, 50, D)
        got = step(l, logits, h, shared)
        rows = lut.double()[ref, l] * ok[..., None, None]
        want = h.double() + shared.double() + (torch.softmax(logits.double(), -1)[..., None] * rows).sum(-2)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert reader.faults == 2  # once per bad token and step, not once per layer
    t.close()


# ------------------------------------------------------------------ the reader ---------------------------


@pytest.mark.parametrize("placement,path", [("host", "cpu"), ("disk", "staged-cpu")])
@pytest.mark.parametrize("quantized", [False, True])
def test_reader_combines_every_layer(placement, path, quantized):
    lut = torch.randn(V, L, E, D)
    t = LookupTable.from_tensor(lut, placement, device="cpu", format="nf4" if quantized else None,
                                block_size=4 if quantized else None)
    ref = dequantize(t.read()).double() if quantized else lut.double()
    reader = t.reader()
    assert isinstance(reader, LayerReader) and reader._path(torch.tensor([1])) == path
    ids = torch.stack([random_ids(3), random_ids(3)])  # [B, S]
    step = reader.start(ids)
    for l in range(L):
        logits, h, shared = torch.randn(2, 3, E), torch.randn(2, 3, D), torch.randn(2, 3, D)
        got = step(l, logits, h, shared)
        want = h.double() + shared.double() + (torch.softmax(logits.double(), -1)[..., None] * ref[ids, l]).sum(-2)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=rf"ids contains {V} \(at flat position 2\)"):  # CPU: named, not counted
        reader.start(torch.tensor([[0, 1, V]]))(0, torch.randn(1, 3, E), torch.randn(1, 3, D), torch.randn(1, 3, D))


def test_rows_not_in_the_page_cache_are_read_together_and_equal(tmp_path):
    """The disk tier reads the rows the page cache holds without blocking and the others from storage, several
    at once (csrc/lookup_table.cpp, read_rows): a step whose file pages were dropped (all rows cold), half
    dropped, or kept gives the same rows and sums."""
    import os

    lut = torch.randn(300, 2, 3, 1000)  # 24 KB rows: each spans several pages
    path = tmp_path / "t.safetensors"
    LookupTable.from_tensor(lut, "disk", device="cpu", path=path).close()
    t = LookupTable.open(path, "disk")
    ids = torch.tensor([[5, 290, 5, 17, 100, 101, 102, 0, 299, 150, 17, 42]])
    fd = os.open(path, os.O_RDONLY)
    try:
        for drop in ("all", "half", "none"):
            if drop == "all":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            elif drop == "half":  # the first half of the file's pages: some rows cached, some not, one split
                os.posix_fadvise(fd, 0, os.path.getsize(path) // 2 + 4096, os.POSIX_FADV_DONTNEED)
            assert torch.equal(t.gather(ids), lut[ids])
            step = t.reader().start(ids)
            logits, h, shared = torch.randn(1, 12, 3), torch.randn(1, 12, 1000), torch.randn(1, 12, 1000)
            want = h.double() + shared.double() + (torch.softmax(logits.double(), -1)[..., None]
                                                   * lut.double()[ids, 1]).sum(-2)
            torch.testing.assert_close(step(1, logits, h, shared).double(), want, atol=1e-5, rtol=1e-5)
    finally:
        os.close(fd)
        t.close()


# ------------------------------------------------------------------ the model's step ---------------------


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _models(placement="host", layers=3):
    cfg = MoLEConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, num_experts=4)
    torch.manual_seed(0)
    mole = MoLEForCausalLM(cfg, reparameterized=True).eval()
    mole.set_lut(LookupTable.from_tensor(torch.randn(cfg.lut_shape), placement, device="cpu"))
    return cfg, mole, DenseForCausalLM.from_mole(mole).eval()


def _step_ops(model, cfg):
    cache = StaticKVCache(cfg, 2, 16, device="cpu", dtype=torch.float32)
    cache.valid[:, :4] = True
    tok, idx, pos = torch.tensor([3, 9]), torch.tensor([4]), torch.tensor([4, 4])
    with torch.no_grad():
        model._decode_step(cache, tok, idx, pos)  # warm-up: lazy buffers
        with _OpCounter() as c:
            model._decode_step(cache, tok, idx, pos)
    return c.ops


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_a_mole_step_is_the_dense_step_plus_router_and_one_fused_call_per_layer(placement):
    """The invariant that keeps per-layer overhead from creeping back: a MoLE decode step dispatches
    the dense step's ops plus, per layer, the router matmul and one mole_kernels op, minus the add
    that op replaces; anything else is per step, never per layer (the disk tier reads the step's rows
    once: the same few ops for 2 layers as for 5)."""
    extra = []
    for layers in (2, 5):
        cfg, mole, dense = _models(placement, layers)
        n = torch.randn(2, 1, cfg.hidden_size)
        with torch.no_grad(), _OpCounter() as c:
            mole.model.layers[0].router(n)
        router = len(c.ops)
        mole_ops, dense_ops = _step_ops(mole, cfg), _step_ops(dense, cfg)
        assert mole_ops.count("mole_kernels.lut_combine") == layers
        extra.append(len(mole_ops) - len(dense_ops) - layers * (router + 1 - 1))
    assert extra[0] == extra[1], extra
    if placement == "host":
        assert extra[0] == 0, extra  # the table is read in place: nothing at all per step


def _mixed_models(layers=3, placement="host", tmp_path=None):
    """The models of _models with the MoLE's table a column-normalised mixed table (int8 + factored + q2)
    on `placement` (disk: a save_mixed file in tmp_path), and the same MoLE over the float32 table that
    mixed table stands for."""
    from mole_kernels.mixed import dequantize_mixed, quantize_mixed, save_mixed
    from mole_kernels.table import MixedLookupTable

    cfg, mole, dense = _models("host", layers)
    lut = torch.randn(cfg.lut_shape)
    counts = torch.randint(0, 100, (cfg.vocab_size,))
    m = quantize_mixed(lut, counts, [("int8", 8), ("f6x5", 40), ("q2", None)], block_sizes=[None, None, 8],
                       normalize=True)
    if placement == "disk":
        save_mixed(tmp_path / "mixed.safetensors", m)
        mole.set_lut(MixedLookupTable.open(tmp_path / "mixed.safetensors", "disk"))
    else:
        mole.set_lut(MixedLookupTable(m))
    ref = MoLEForCausalLM(cfg, reparameterized=True).eval()
    ref.load_state_dict({k: v for k, v in mole.state_dict().items()}, strict=True)
    ref.set_lut(LookupTable.from_tensor(dequantize_mixed(m, torch.float32), "host", device="cpu"))
    return cfg, mole, ref, DenseForCausalLM.from_mole(mole).eval()


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_a_mixed_table_step_is_the_dense_step_plus_router_and_one_fused_call_per_layer(placement, tmp_path):
    """The dispatch invariant of test_a_mole_step_is_the_dense_step_plus_router_and_one_fused_call_per_layer
    for a mixed-precision table: one lut_combine_mixed per layer, nothing else per layer or (the table read
    in place, or each part's rows read by one C++ call per step) per step."""
    extra = []
    for layers in (2, 5):
        cfg, mole, _, dense = _mixed_models(layers, placement, tmp_path)
        n = torch.randn(2, 1, cfg.hidden_size)
        with torch.no_grad(), _OpCounter() as c:
            mole.model.layers[0].router(n)
        router = len(c.ops)
        mole_ops, dense_ops = _step_ops(mole, cfg), _step_ops(dense, cfg)
        assert mole_ops.count("mole_kernels.lut_combine_mixed") == layers
        extra.append(len(mole_ops) - len(dense_ops) - layers * router)
    assert extra[0] == extra[1] <= (0 if placement == "host" else 2), extra  # disk: the step's positions view


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_a_mixed_table_decodes_as_the_table_it_stands_for(placement, tmp_path):
    """generate over a MixedLookupTable (the direct C++ call per layer) gives the logits of the same model
    over the float32 table the mixed table dequantizes to; a compiled step the same tokens."""
    cfg, mole, ref, _ = _mixed_models(3, placement, tmp_path)
    prompt = torch.tensor([[3, 9, 17, 40], [5, 5, 60, 1]])
    with torch.no_grad():
        torch.testing.assert_close(mole(prompt).logits, ref(prompt).logits, rtol=1e-4, atol=1e-4)
    got = mole.generate(prompt, max_new_tokens=6)
    assert torch.equal(got, ref.generate(prompt, max_new_tokens=6))
    assert torch.equal(mole.generate(prompt, max_new_tokens=6, compile_step=True), got)
    with pytest.raises(ValueError):
        mole.generate(torch.tensor([[1, cfg.vocab_size]]), max_new_tokens=2)


def test_bad_ids_are_refused_on_entry_before_any_kernel():
    cfg, mole, _ = _models()
    for call in (lambda: mole.generate(torch.tensor([[1, cfg.vocab_size]]), max_new_tokens=2),
                 lambda: mole(torch.tensor([[-1, 2]]))):
        with _OpCounter() as c, pytest.raises(ValueError, match="outside the vocabulary"):
            call()
        assert not [op for op in c.ops if op.startswith("mole_kernels")]


@requires_cuda
def test_cuda_graph_refused_up_front_on_the_disk_tier():
    cfg, mole, _ = _models()
    mole = mole.cuda()
    mole.set_lut(LookupTable.from_tensor(torch.randn(cfg.lut_shape), "disk", device="cuda"))
    with _OpCounter() as c, pytest.raises(ValueError, match="disk tier"):
        mole.generate(torch.tensor([[1, 2]], device="cuda"), max_new_tokens=2, cuda_graph=True)
    assert not [op for op in c.ops if op.startswith("mole_kernels")]  # said before any work


@requires_cuda
@pytest.mark.parametrize("placement", ["device", "host"])
def test_cuda_decode_step_has_no_host_synchronisation(placement):
    """A decode step on the device tier and on pinned host memory never waits for the GPU: run it
    with synchronising calls turned into errors."""
    cfg, mole, _ = _models()
    mole = mole.cuda()
    mole.set_lut(LookupTable.from_tensor(torch.randn(cfg.lut_shape), placement, device="cuda"))
    cache = StaticKVCache(cfg, 2, 16, device="cuda", dtype=torch.float32)
    cache.valid[:, :4] = True
    tok, idx, pos = torch.tensor([3, 9], device="cuda"), torch.tensor([4], device="cuda"), torch.tensor([4, 4],
                                                                                                        device="cuda")
    with torch.no_grad():
        mole._decode_step(cache, tok, idx, pos)  # warm-up: lazy buffers, Triton compiles
        torch.cuda.set_sync_debug_mode("error")
        try:
            mole._decode_step(cache, tok, idx, pos)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only message")
def test_cuda_graph_on_cpu_says_why():
    _, mole, _ = _models()
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        mole.generate(torch.tensor([[1, 2]]), max_new_tokens=2, cuda_graph=True)


def test_compiled_decode_step_gives_the_eager_tokens():
    """generate(compile_step=True): the decode step through torch.compile (our ops as custom ops with
    fake kernels) gives the eager step's tokens and logits, on a table read in place and a staged one."""
    cfg = MoLEConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=3)
    train = MoLEForCausalLM(cfg, init_std=0.1).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 4))
    for placement in ("host", "disk"):
        inf = train.reparameterize(placement=placement, dtype=torch.float32, progress=False)
        eager = inf.generate(prompt, max_new_tokens=5, return_logits=True)
        compiled = inf.generate(prompt, max_new_tokens=5, return_logits=True, compile_step=True)
        assert torch.equal(compiled.sequences, eager.sequences)
        torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="compile_step must be a bool"):
        inf.generate(prompt, max_new_tokens=2, compile_step=1)


def test_each_model_compiles_its_own_step():
    """Dynamo keeps compiled graphs (and a recompile limit) per code object: every model gets a copy of
    _decode_step's code, so one model's steps never first fail the guards of another's graphs (a MoLE
    step compiled after the dense one once ran ~20 % longer at the demo shape). Made once per model."""
    _, mole, dense = _models()
    a, b = mole._compiled_decode_step(), dense._compiled_decode_step()
    code = lambda f: f._torchdynamo_orig_callable.__func__.__code__  # noqa: E731
    shared = type(mole)._decode_step.__code__
    assert code(a) is not code(b) and code(a) is not shared and code(b) is not shared  # (== compares contents)
    assert code(a).co_code == type(mole)._decode_step.__code__.co_code  # the same step
    assert mole._compiled_decode_step() is a


def test_compiling_the_step_says_nothing_about_a_cuda_toolkit_on_a_cpu(tmp_path):
    """torch's cpp_extension (imported by inductor) logs "No CUDA runtime is found, using CUDA_HOME=..."
    on a machine with a toolkit but no GPU; compile_step=True imports it quietly first."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: torch has nothing to warn about")
    plain = "import torch.utils.cpp_extension"
    quiet = "from mole_kernels.model.generation import import_cpp_extension_quietly as q; q(); " + plain
    # cwd: not the clone's root, whose source tree (no compiled extension where the package is installed)
    # `python -c` would import first
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
            for code in (plain, quiet)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    if "No CUDA runtime is found" not in runs[0].stderr:
        pytest.skip("torch finds no CUDA toolkit on this machine: it has nothing to warn about")
    assert "No CUDA runtime is found" not in runs[1].stderr, runs[1].stderr


@requires_cuda
@pytest.mark.parametrize("placement", ["device", "host"])
def test_cuda_compiled_decode_step_gives_the_eager_tokens(placement):
    """compile_step=True on a GPU: the host tier's step starts a Prefetcher (Python state, a side stream,
    events) inside the compiled function; the tokens and logits must be the eager step's."""
    cfg, mole, _ = _models()
    mole = mole.cuda()
    mole.set_lut(LookupTable.from_tensor(torch.randn(cfg.lut_shape), placement, device="cuda"))
    prompt = torch.randint(0, cfg.vocab_size, (2, 4), device="cuda")
    eager = mole.generate(prompt, max_new_tokens=5, return_logits=True)
    compiled = mole.generate(prompt, max_new_tokens=5, return_logits=True, compile_step=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (fewer visible)")
@pytest.mark.parametrize("placement", ["device", "host"])
def test_cuda_second_device_is_guarded(placement):
    """A table serving cuda:1 while cuda:0 is current: registration, the Triton launch and the step all
    run on cuda:1 (without a guard the kernel would read cuda:1's addresses on cuda:0)."""
    cfg, mole, _ = _models()
    lut = torch.randn(cfg.lut_shape)
    with torch.cuda.device(0):
        table = LookupTable.from_tensor(lut, placement, device="cuda:1")
        reader = table.reader()
        ids = torch.tensor([[3, 9, 3]], device="cuda:1")
        x, h, sh = (torch.randn(1, 3, cfg.num_experts, device="cuda:1"), torch.randn(1, 3, cfg.hidden_size,
                    device="cuda:1"), torch.randn(1, 3, cfg.hidden_size, device="cuda:1"))
        got = reader.start(ids)(1, x, h, sh)
        assert torch.cuda.current_device() == 0
    want = h.double().cpu() + sh.double().cpu() + (torch.softmax(x.double().cpu(), -1)[..., None]
                                                   * lut.double()[ids.cpu(), 1]).sum(-2)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)
    table.close()


@pytest.mark.child_run(args=[__file__, "-k", "with_the_lookup_inside_its_loops"],
                       env={"MOLE_TEST_COMPILE_FIRST": "1"})
def test_after_an_earlier_compile_a_compiled_mole_step_is_still_the_compiled_dense_step(request):
    """The invariant below in a fresh process that compiles something else before it enables the
    decomposition (as the whole suite in one process did, and a served model may): inductor copies its
    decomposition table at the first compile, and a registration after it once did not apply (the op
    stayed a call: 3 more torch.ops lines per layer)."""
    assert_child_ran(child_result(request), 1)


def test_a_compiled_mole_step_is_the_compiled_dense_step_with_the_lookup_inside_its_loops():
    """The compiled step's dispatch invariant (generate(compile_step=True)): dynamo's graph holds one
    lut_combine per layer, and inductor's code for the MoLE step calls no op and no GEMM beyond the
    dense step's: the router and the lookup are fused into its own loops (mole_kernels.combine's
    decompositions), the dequantization of a quantized table's rows too (int8, fp8, nf4: 2 layers).
    Its tokens equal the eager step's (test_compiled_decode_step_gives_the_eager_tokens)."""
    from torch._inductor.utils import run_and_get_code

    from mole_kernels.combine import enable_inductor_decomposition

    if os.environ.get("MOLE_TEST_COMPILE_FIRST") == "1":  # the child run above: a compile before the registration
        with torch._inductor.config.patch(fx_graph_cache=False):
            torch.compile(lambda x: x.sin() + 1)(torch.randn(4))
    enable_inductor_decomposition()
    calls = {}
    for layers in (2, 3):
        cfg, mole, dense = _models("host", layers)
        cache = StaticKVCache(cfg, 2, 16, device="cpu", dtype=torch.float32)
        cache.valid[:, :4] = True
        tok, idx, pos = torch.tensor([3, 9]), torch.tensor([4]), torch.tensor([4, 4])
        formats = [None] + (["int8", "fp8_e4m3", "nf4"] if layers == 2 else [])
        float_lut = mole.lut._lut
        for name, model in [("mole-" + str(f), mole) for f in formats] + [("dense", dense)]:
            if model is mole:  # the same model over each table (set_lut starts a new reader)
                fmt = name[5:]
                mole.set_lut(LookupTable.from_tensor(float_lut, "host", device="cpu",
                                                     format=None if fmt == "None" else fmt))
            graphs = []

            def backend(gm, inputs):
                graphs.append(gm)
                from torch._inductor.compile_fx import compile_fx
                return compile_fx(gm, inputs)

            torch._dynamo.reset()
            # Compiled fresh: inductor's on-disk graph cache does not key on registered decompositions, so
            # code cached by an earlier compile of the same graph without them could be replayed.
            with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
                model._decode_step(cache, tok, idx, pos)  # warm-up: lazy buffers
                _, code = run_and_get_code(torch.compile(model._decode_step, backend=backend, dynamic=False),
                                           cache, tok, idx, pos)
            code = "\n".join(code)
            targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
            calls[name, layers] = (sum(t.startswith("mole_kernels.lut_combine") for t in targets),
                                   code.count("extern_kernels."),
                                   code.count("torch.ops."))
        for f in formats:
            assert calls["mole-" + str(f), layers][0] == layers  # one combine per layer in the traced graph
            assert calls["mole-" + str(f), layers][1:] == calls["dense", layers][1:], calls  # no call of its own


def test_direct_calls_equal_the_ops_and_check_their_arguments():
    """The CPU decode path calls the ops' functions directly (mole_kernels._C), the router matmul in
    the same call: same results as torch.ops (and F.linear) up to float32 summation order, one-line
    errors on bad arguments, and a closed table's file is never read."""
    from mole_kernels import _C

    ops = torch.ops.mole_kernels
    lut, ids, logits = torch.randn(V, L, E, D), torch.tensor([[3, 9]]), torch.randn(1, 2, E)
    h, shared = torch.randn(1, 2, D).bfloat16(), torch.randn(1, 2, D).bfloat16()
    assert torch.equal(_C._lut_combine(lut, ids, 2, logits, h, shared, None), ops.lut_combine(lut, ids, logits, 2, h, shared))
    lut3 = lut[:, 0].contiguous()  # [V, E, D]: no layer
    assert torch.equal(_C._lut_combine(lut3, ids, None, logits, None, None, None),
                       ops.lut_combine(lut3, ids, logits, None, None, None))
    x, w = torch.randn(1, 2, 48), torch.randn(E, 48)  # the router's input and weight
    for dtype in (torch.float32, torch.bfloat16):
        routed = _C._lut_combine(lut, ids, 1, x.to(dtype), h, shared, w.to(dtype))
        want = ops.lut_combine(lut, ids, torch.nn.functional.linear(x.to(dtype), w.to(dtype)), 1, h, shared)
        torch.testing.assert_close(routed, want, atol=2e-2, rtol=2e-2)  # logits rounded to dtype, as linear's
    big = torch.randn(1, 2000, 48), torch.randint(0, V, (1, 2000))  # beyond the hand loop: at::linear
    torch.testing.assert_close(_C._lut_combine(lut, big[1], 0, big[0], None, None, w),
                               ops.lut_combine(lut, big[1], torch.nn.functional.linear(big[0], w), 0, None, None))
    q = quantize(lut, "nf4", 4)
    assert torch.equal(_C._lut_combine_quant(q.data, q.format, q.dim, q.block_size, ids, 1, logits, h, shared, None),
                       ops.lut_combine_quant(q.data, q.format, q.dim, q.block_size, ids, logits, 1, h, shared, None))
    with pytest.raises(ValueError, match=r"ids contains 40 \(at flat position 1\)"):
        _C._lut_combine(lut, torch.tensor([[3, V]]), 2, logits, h, shared, None)
    with pytest.raises(ValueError, match=r"router: weight must be \[E, D\]"):
        _C._lut_combine(lut, ids, 2, x, h, shared, torch.randn(E, 47))
    with pytest.raises(TypeError, match="takes 7 positional arguments"):
        _C._lut_combine(lut, ids, 2, logits, h)
    with pytest.raises(TypeError, match="layer must be an int"):
        _C._lut_combine(lut, ids, True, logits, h, shared, None)
    with pytest.raises(TypeError, match="logits must be a tensor"):
        _C._lut_combine(lut, ids, 2, [1.0], h, shared, None)

    t = LookupTable.from_tensor(lut, "disk", device="cpu")
    row = t.row_bytes
    slots = torch.empty(4 * row, dtype=torch.uint8).fill_(0xFF)  # poisoned: a slot never read shows as NaN
    cache = _C._row_cache(t._store.handle(), slots, row)
    tally = torch.zeros(3, dtype=torch.int64)
    slot, ticket = _C._read_cached(cache, torch.tensor([[7, 2, 7]]), False, tally)
    assert ticket == 0 and slot.shape == (1, 3) and slot[0, 0] == slot[0, 2] != slot[0, 1]  # foreground: none left
    rows = slots.view(torch.float32).view(4, L, E, D)
    assert torch.equal(rows[slot[0]], lut[[7, 2, 7]])
    assert tally.tolist() == [1, 3, 2]  # a step counts itself: 3 ids, 2 tokens' rows read
    again, _ = _C._read_cached(cache, torch.tensor([2, 7]), False, tally)
    assert tally.tolist() == [2, 5, 2] and again.tolist() == [slot[0, 1], slot[0, 0]]  # both in slots: none read
    with pytest.raises(ValueError, match="tally must be"):
        _C._read_cached(cache, torch.tensor([1]), False, torch.zeros(3))
    with pytest.raises(ValueError, match="a step of 5 ids needs 5 slots, the cache has 4"):
        _C._read_cached(cache, torch.arange(5), False, None)
    with pytest.raises(ValueError, match=rf"ids contains {V} \(at flat position 1\)"):
        _C._read_cached(cache, torch.tensor([3, V]), False, None)
    with pytest.raises(ValueError, match="slots must be a contiguous uint8 CPU tensor of whole rows"):
        _C._row_cache(t._store.handle(), torch.empty(row + 1, dtype=torch.uint8), row)
    assert torch.equal(rows[_C._read_cached(cache, torch.tensor([2, 7]), False, None)[0]], lut[[2, 7]])
    handle = t._store.handle()
    t.close()
    with pytest.raises(RuntimeError, match="the table was closed"):
        _C._read_cached(cache, torch.tensor([2]), False, None)  # even a row a slot holds: the table is gone
    with pytest.raises(RuntimeError, match="the table was closed"):
        _C._row_cache(handle, slots, row)


@pytest.mark.parametrize("fmt", [None, "int8", "nf4"])
@torch.no_grad()  # a decode step's
def test_the_row_cache_serves_every_step_as_the_file(fmt, monkeypatch):
    """The CPU disk tier's row cache at its smallest (16 slots: rows replaced all the time) over 60 steps of
    1-16 Zipf-like ids (repeated ids included) against float64 for every layer; a step reads from the file
    only the rows no slot holds (the table's stats count them); drop_cached_rows makes the next step read
    them all again; a step of more ids than slots gets a larger cache."""
    monkeypatch.setattr(LayerReader, "row_cache_bytes", 0)
    V_, L_, E_, D_ = 64, 2, 3, 20
    lut = torch.randn(V_, L_, E_, D_)
    block = 4 if fmt == "nf4" else None
    t = LookupTable.from_tensor(lut if fmt is None else quantize(lut, fmt, block), "disk", device="cpu")
    ref = lut.double() if fmt is None else dequantize(quantize(lut, fmt, block), torch.float64)
    reader = t.reader()
    g = torch.Generator().manual_seed(1)
    zipf = 1.0 / torch.arange(1, V_ + 1).double()
    w = torch.randn(E_, 8, generator=g)

    def step(ids):
        before = t.stats.bytes_read["disk"]
        combine = reader.start(ids)
        for l in range(L_):
            x, residual, shared = (torch.randn(*ids.shape, k, generator=g) for k in (8, D_, D_))
            torch.testing.assert_close(combine(l, x, residual, shared, w).double(),
                                       _step_reference(ref, ids, l, x, w, residual, shared), atol=1e-5, rtol=1e-5)
        return (t.stats.bytes_read["disk"] - before) // t.row_bytes

    seen = set()  # the ids whose rows the cache may hold (a step reads at least the others)
    for k in range(60):
        ids = torch.multinomial(zipf, [1, 3, 16, 5, 11][k % 5], replacement=True, generator=g).view(-1, 1)
        uniq = set(ids.view(-1).tolist())
        assert len(uniq - seen) <= step(ids) <= len(uniq)
        seen |= uniq
        assert step(ids) == 0  # the same ids again: every row in a slot
    reader.drop_cached_rows()
    assert step(ids) == len(uniq)
    t.drop_cached_rows()  # the table reaches its readers' caches
    assert step(ids) == len(uniq)
    big = torch.arange(40).view(2, 20)  # more ids than slots: a cache of 40 slots
    assert step(big) == 40 and step(big) == 0 and reader._cache_rows == 40
    t.close()


@torch.no_grad()  # a decode step's
def test_a_file_changed_under_the_row_cache_is_a_clear_error(tmp_path):
    """A step whose rows are all in the row cache reads nothing and serves the rows read before the file
    changed; the first step that reads from the file raises, and so does every later one (the cache forgot
    its rows: they would be read from the changed file)."""
    import time

    lut = torch.randn(V, L, E, D)
    path = tmp_path / "t.safetensors"
    LookupTable.from_tensor(lut, "host", device="cpu").save(path)
    t = LookupTable.open(path, "disk")
    reader = t.reader()
    ids, other = torch.tensor([[1, 2]]), torch.tensor([[V - 1]])

    def layer0(ids):
        logits, h, shared = torch.randn(*ids.shape, E), torch.randn(*ids.shape, D), torch.randn(*ids.shape, D)
        want = h.double() + shared.double() + (torch.softmax(logits.double(), -1)[..., None]
                                               * lut.double()[ids, 0]).sum(-2)
        torch.testing.assert_close(reader.start(ids)(0, logits, h, shared, None).double(), want, atol=1e-5, rtol=1e-5)

    layer0(ids)
    time.sleep(0.01)  # a later modification time, even on coarse clocks
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 64)
        f.write(os.urandom(64))
    layer0(ids)  # every row in a slot: as read before the change
    for step in (other, ids):
        with pytest.raises(RuntimeError, match="changed after it was opened"):
            layer0(step)
    t.close()


@pytest.mark.parametrize("placement", ["host", "disk"])
@torch.no_grad()
def test_a_mixed_table_step_serves_many_steps_as_the_table_it_stands_for(placement, tmp_path, monkeypatch):
    """Decode steps over a mixed table (disk: through the smallest row caches, rows replaced all the time) give
    the float32 table's output over 40 steps of 1-16 ids whose rows land in every part; a step of more ids than
    slots gets larger caches."""
    monkeypatch.setattr(LayerReader, "row_cache_bytes", 0)
    cfg, mole, ref, _ = _mixed_models(2, placement, tmp_path)
    table = ref.lut.read().double()
    reader = mole.lut.reader()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(cfg.num_experts, cfg.hidden_size, generator=g)
    for k in range(40):
        B = [1, 16, 5, 12][k % 4] if k < 39 else 40
        ids = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)
        combine = reader.start(ids)
        for l in range(cfg.num_hidden_layers):
            x, residual, shared = (torch.randn(B, 1, cfg.hidden_size, generator=g) for _ in range(3))
            torch.testing.assert_close(combine(l, x, residual, shared, w).double(),
                                       _step_reference(table, ids, l, x, w, residual, shared), atol=1e-4, rtol=1e-4)
    mole.lut.drop_cached_rows()
    if placement == "disk":
        assert reader._cap == 40


def _step_reference(lut, ids, layer, x, w, residual, shared):
    """float64 of residual + shared + sum_e softmax(linear(x, w))_e * lut[ids, layer, e], the logits
    rounded to x's dtype first (as linear's result and the decode step's are)."""
    logits = (x.double() @ w.double().T).to(x.dtype).double()
    p = torch.softmax(logits, -1)
    return residual.double() + shared.double() + (p[..., None] * lut.double()[ids, layer]).sum(-2)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_decode_step_call_matches_float64(lut_dtype, act_dtype, id_dtype):
    """_C._lut_combine with a router weight, as a decode step calls it: its lean path (a few contiguous
    ids and operands) and every case it leaves to the general path (too many ids, a strided operand,
    mixed addend dtypes, a [V, E, D] table) against float64; odd sizes, E = 1, repeated ids."""
    from mole_kernels import _C

    tol = dict(atol=1e-5, rtol=1e-5) if act_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for V_, L_, E_, D_, K in [(40, 5, 3, 12, 12), (33, 2, 1, 37, 29), (17, 3, 5, 300, 7)]:
        lut = torch.randn(V_, L_, E_, D_).to(lut_dtype)
        w = torch.randn(E_, K).to(act_dtype)
        for shape in [(1, 1), (2, 3), ()]:  # decode steps of 1 and 6 tokens, and a 0-d id
            ids = torch.randint(0, V_, shape, dtype=id_dtype)
            if ids.numel() > 1:
                ids.view(-1)[1] = ids.view(-1)[0]  # a repeated id
            x = torch.randn(*shape, K).to(act_dtype)
            residual, shared = torch.randn(*shape, D_).to(act_dtype), torch.randn(*shape, D_).to(act_dtype)
            layer = L_ - 1
            got = _C._lut_combine(lut, ids, layer, x, residual, shared, w)
            assert got.dtype == act_dtype and got.shape == residual.shape
            torch.testing.assert_close(got.double(), _step_reference(lut, ids, layer, x, w, residual, shared), **tol)
    # What the lean path leaves to the general one gives the same sums.
    lut, w = torch.randn(V, L, E, D).to(lut_dtype), torch.randn(E, 48).to(act_dtype)
    ids = random_ids(100).to(id_dtype).view(1, 100)  # 100 x E weights: more than the lean path's stack holds
    x = torch.randn(1, 100, 48).to(act_dtype)
    h, shared = torch.randn(1, 100, D).to(act_dtype), torch.randn(1, 100, D).to(act_dtype)
    torch.testing.assert_close(_C._lut_combine(lut, ids, 2, x, h, shared, w).double(),
                               _step_reference(lut, ids, 2, x, w, h, shared), **tol)
    ids, x = ids[:, :3], torch.randn(1, 48, 3).to(act_dtype).transpose(1, 2)  # a strided x
    h, shared = h[:, :3].contiguous(), shared[:, :3].contiguous()
    torch.testing.assert_close(_C._lut_combine(lut, ids, 0, x, h, shared, w).double(),
                               _step_reference(lut, ids, 0, x, w, h, shared), **tol)
    x = x.contiguous()
    got = _C._lut_combine(lut, ids, 1, x, h, shared.float(), w)  # addends of two dtypes: residual's wins
    assert got.dtype == act_dtype
    torch.testing.assert_close(got.double(), _step_reference(lut, ids, 1, x, w, h, shared.float()), **tol)
    lut3 = lut[:, 0].contiguous()  # [V, E, D]: no layer
    torch.testing.assert_close(_C._lut_combine(lut3, ids, None, x, h, shared, w).double(),
                               _step_reference(lut3[:, None], ids, 0, x, w, h, shared), **tol)
    # A router with no input features gives zero logits (uniform weights), never uninitialised memory.
    got = _C._lut_combine(lut, ids, 1, torch.randn(1, 3, 0).to(act_dtype), h, shared, torch.randn(E, 0).to(act_dtype))
    torch.testing.assert_close(got.double(), h.double() + shared.double() + lut.double()[ids, 1].mean(-2), **tol)
    # A bad id is named, whichever path would have run.
    for bad in (torch.tensor([[3, V]]), torch.tensor([[-1]])):
        with pytest.raises(ValueError, match=r"ids contains -?\d+ \(at flat position \d\)"):
            _C._lut_combine(lut, bad.to(id_dtype), 2, x[:, :bad.numel()], h[:, :bad.numel()],
                            shared[:, :bad.numel()], w)


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_decode_step_call_in_registers_matches_float64(lut_dtype, act_dtype):
    """The lean path's router dot and row sum run sixteen columns at a time in SIMD registers, the rest
    one by one: sizes of whole blocks only (the demo's D = K = 128, and 16), a block and a tail (17, 33),
    a tail only (5), E = 1 and E = 8, batches of 0, 1, 7 and 8 tokens with repeated ids, against
    float64 on fresh inputs; every output element is written (the result is never uninitialised)."""
    from mole_kernels import _C

    tol = dict(atol=1e-5, rtol=1e-5) if act_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for E_, D_, K in [(4, 128, 128), (1, 16, 16), (8, 17, 33), (3, 33, 5), (2, 5, 17)]:
        V_, L_ = 29, 3
        lut = torch.randn(V_, L_, E_, D_).to(lut_dtype)
        w = torch.randn(E_, K).to(act_dtype)
        for B_ in (0, 1, 7, 8):
            ids = torch.randint(0, V_, (B_, 1))
            if B_ > 2:
                ids[2] = ids[0]  # a repeated id
            x = torch.randn(B_, 1, K).to(act_dtype)
            residual, shared = torch.randn(B_, 1, D_).to(act_dtype), torch.randn(B_, 1, D_).to(act_dtype)
            for layer in range(L_):
                got = _C._lut_combine(lut, ids, layer, x, residual, shared, w)
                assert got.dtype == act_dtype and got.shape == (B_, 1, D_)
                torch.testing.assert_close(got.double(), _step_reference(lut, ids, layer, x, w, residual, shared),
                                           **tol)
    # Large logits (a softmax near one-hot) and tiny ones (near uniform) both stay exact.
    lut, w = torch.randn(11, 2, 4, 64).to(lut_dtype), torch.randn(4, 48).to(act_dtype)
    ids = torch.tensor([[3], [3], [10]])
    residual, shared = torch.randn(3, 1, 64).to(act_dtype), torch.randn(3, 1, 64).to(act_dtype)
    for scale in (30.0, 1e-3):
        x = (torch.randn(3, 1, 48) * scale).to(act_dtype)
        torch.testing.assert_close(_C._lut_combine(lut, ids, 1, x, residual, shared, w).double(),
                                   _step_reference(lut, ids, 1, x, w, residual, shared), **tol)


FLOAT_STEP_K = "the_decode_step_call_in_registers or (the_decode_step_call_matches and id_dtype0)"


@pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.child_run(args=[__file__, "-k", FLOAT_STEP_K], env={"MOLE_KERNELS_CPU_ISA": isa}))
    for isa in ("scalar", "avx2")])
def test_the_decode_step_call_on_capped_paths(isa, request):
    """The lean path's router and row sum pick AVX-512, AVX2 or four-lane vectors once per process: its two
    float tests again (every table and activation dtype) on each lower instruction set."""
    assert_child_ran(child_result(request), 18)


# nf4 block 5: odd block starts; low-bit blocks of 20: a block starting off the 8-column vector boundary
QUANT_FORMATS = [("int8", None), ("fp8_e4m3", None), ("nf4", 64), ("nf4", 5), ("q3", 20), ("q1", 20)]


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,block", QUANT_FORMATS, ids=[f"{f}-{b}" for f, b in QUANT_FORMATS])
def test_the_quantized_decode_step_call_matches_float64(fmt, block, act_dtype, id_dtype):
    """_C._lut_combine_quant with a router weight, as a decode step calls it on a quantized table: its lean
    path (the row sum dequantizes in place) against float64 of the dequantized table; odd sizes, E = 1,
    more experts than one summing group (20 > 16), repeated ids; it equals the general path bit for bit
    (the same summing routine) wherever the general path takes the call, and a bad id is named."""
    from mole_kernels import _C

    ops = torch.ops.mole_kernels
    tol = dict(atol=1e-5, rtol=1e-5) if act_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for V_, L_, E_, D_, K in [(40, 5, 3, 40, 12), (33, 2, 1, 35, 29), (17, 3, 20, 300, 7), (9, 1, 4, 5, 16)]:
        if block is not None and D_ % block:
            continue
        q = quantize(torch.randn(V_, L_, E_, D_), fmt, block)
        ref = dequantize(q, torch.float32)
        w = torch.randn(E_, K).to(act_dtype)
        for shape in [(1, 1), (2, 3), ()]:
            ids = torch.randint(0, V_, shape, dtype=id_dtype)
            if ids.numel() > 1:
                ids.view(-1)[1] = ids.view(-1)[0]  # a repeated id
            x = torch.randn(*shape, K).to(act_dtype)
            residual, shared = torch.randn(*shape, D_).to(act_dtype), torch.randn(*shape, D_).to(act_dtype)
            head = (q.data, q.format, q.dim, q.block_size, ids, L_ - 1)
            got = _C._lut_combine_quant(*head, x, residual, shared, w)
            assert got.dtype == act_dtype and got.shape == residual.shape
            torch.testing.assert_close(got.double(), _step_reference(ref, ids, L_ - 1, x, w, residual, shared), **tol)
            strided = torch.randn(*shape, 2 * K).to(act_dtype)[..., ::2]  # a strided x: the general path
            strided.copy_(x)
            assert torch.equal(_C._lut_combine_quant(*head, strided, residual, shared, w), got)
            logits = torch.randn(*shape, E_).to(act_dtype)  # no router weight: the op itself
            assert torch.equal(_C._lut_combine_quant(*head, logits, residual, shared, None),
                               ops.lut_combine_quant(*head[:5], logits, L_ - 1, residual, shared, None))
        bad = torch.tensor([[2, V_]], dtype=id_dtype)
        with pytest.raises(ValueError, match=rf"ids contains {V_} \(at flat position 1\)"):
            _C._lut_combine_quant(q.data, q.format, q.dim, q.block_size, bad, 0, torch.randn(1, 2, K).to(act_dtype),
                                  torch.randn(1, 2, D_).to(act_dtype), torch.randn(1, 2, D_).to(act_dtype), w)


@pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.child_run(args=[__file__, "-k", "quantized_decode_step_call and act_dtype0-id_dtype0"],
                                                  env={"MOLE_KERNELS_CPU_ISA": isa}))
    for isa in ("scalar", "avx2")])
def test_the_quantized_decode_step_call_on_capped_paths(isa, request):
    """The quantized sums pick AVX-512, AVX2 or scalar decoding once per process: the lean path's test again
    on the routines of each lower one."""
    assert_child_ran(child_result(request), len(QUANT_FORMATS))


def test_direct_calls_run_only_where_nothing_needs_to_see_the_op():
    """_C._plain_eager: the check before every direct call (grad mode, tensor subclass, Python dispatch
    mode, functorch transform)."""
    from mole_kernels import _C

    ids = torch.tensor([1, 2])
    assert not _C._plain_eager(ids)  # grad mode on: autograd must see the op
    with torch.no_grad():
        assert _C._plain_eager(ids)

        class Sub(torch.Tensor):
            pass

        assert not _C._plain_eager(ids.as_subclass(Sub))
        with _OpCounter():
            assert not _C._plain_eager(ids)
        seen = []
        torch.vmap(lambda y: seen.append(_C._plain_eager(y)) or y)(torch.ones(3, 2))
        assert seen == [False]
        with pytest.raises(TypeError, match="takes 1 or 2 positional arguments"):
            _C._plain_eager()
        # A tally ([steps, ids, tokens read], a table's count of its CPU steps) counts plain calls only, and is taken once.
        tally = torch.zeros(3, dtype=torch.int64)
        assert _C._plain_eager(torch.ones(2, 3), tally) and _C._plain_eager(ids, tally)
        assert not _C._plain_eager(ids.as_subclass(Sub), tally)
        assert _C._take_tally(tally) == (2, 8, 8) and _C._take_tally(tally) == (0, 0, 0)
        for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(3), torch.zeros(6, dtype=torch.int64)[::2]):
            with pytest.raises(ValueError, match="tally must be a contiguous int64 CPU tensor of 3 elements"):
                _C._plain_eager(ids, bad)


def _drop_from_page_cache(path) -> bool:
    """Writes `path` back and drops its pages; whether none of them is in memory now (False on a
    filesystem that keeps files in memory, e.g. tmpfs). Asked with mincore, which reads nothing (a
    probing read would start the kernel's read-ahead)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), "mmap failed"
        resident = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), resident) == 0, "mincore failed"
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        return not any(b & 1 for b in resident)
    finally:
        os.close(fd)


# A read without blocking (preadv2 RWF_NOWAIT) of a page just dropped may still succeed: the kernel starts its
# read-ahead for the miss and can find the page read before it answers (seen here: about 1 step in 30, and every
# step while the other core was busy). So a test that needs a step's rows read in the background tries again.
_COLD_TRIES = 20


def _until_cold(path, attempt):
    """attempt() after dropping the file's pages, until it returns something (it left reads running, else
    None); skips when no try does."""
    for _ in range(_COLD_TRIES):
        _drop_from_page_cache(path)
        got = attempt()
        if got is not None:
            return got
    pytest.skip(f"every non-blocking read of a dropped page was answered at once ({_COLD_TRIES} tries): no read "
                "here is still running")


def _start_cold(reader, path, ids):
    """reader.start(ids) for a step whose storage reads are left running (reader._pending); each try first
    forgets the reader's cached rows."""
    def attempt():
        reader.drop_cached_rows()
        combine = reader.start(ids)
        return combine if reader._pending else None
    return _until_cold(path, attempt)


@pytest.mark.parametrize("fmt", [None, "nf4"])
@torch.no_grad()  # a decode step's (the background reads are the eager step's)
def test_cold_disk_rows_are_read_in_the_background(tmp_path, fmt):
    """A CPU disk step whose rows are not in the page cache leaves their reads running and computes
    meanwhile; its first layer waits for them. Against float64 for every layer (float and quantized
    tables), a repeated id, a step abandoned before its first layer (the next step waits for its reads),
    and a ticket waited for twice."""
    from mole_kernels import _C

    V_, L_, E_, D_ = 300, 3, 2, 136
    lut = torch.randn(V_, L_, E_, D_)
    path = str(tmp_path / "t.safetensors")
    t = LookupTable.from_tensor(lut if fmt is None else quantize(lut, fmt), "disk", device="cpu", path=path)
    ref_lut = lut if fmt is None else dequantize(quantize(lut, fmt), torch.float64)
    reader = t.reader()
    if not _drop_from_page_cache(path):
        pytest.skip(f"{tmp_path} keeps files in memory: its rows can never be cold")
    w = torch.randn(E_, 24)
    # Step 2's id lies pages away from step 1's: step 1's abandoned reads may still be bringing their pages in
    # when step 2 drops the file (a neighbouring row in one of those pages would then be warm, read in the
    # foreground: seen on a loaded CI machine).
    for step, ids in enumerate([torch.tensor([[5, 290, 5, 17]]), torch.tensor([[1, 2]]), torch.tensor([[200]])]):
        combine = _start_cold(reader, path, ids)  # step 2: its first try's start waits for step 1's reads
        if step == 1:
            continue  # abandoned: the next step's start waits for its reads
        for l in range(L_):
            x = torch.randn(*ids.shape, 24)
            residual, shared = torch.randn(*ids.shape, D_), torch.randn(*ids.shape, D_)
            got = combine(l, x, residual, shared, w)
            assert reader._pending == 0
            torch.testing.assert_close(got.double(), _step_reference(ref_lut, ids, l, x, w, residual, shared),
                                       atol=1e-5, rtol=1e-5)
    def read_cold():  # a ticket of reads still running (and its cache, kept for them), waited for twice below
        cache = _C._row_cache(t._store.handle(), torch.empty(t.row_bytes, dtype=torch.uint8), t.row_bytes)
        ticket = _C._read_cached(cache, torch.tensor([7]), True, None)[1]
        return (cache, ticket) if ticket > 0 else None
    cache, ticket = _until_cold(path, read_cold)
    _C._wait_reads(ticket)
    with pytest.raises(ValueError, match=f"no reads are pending under ticket {ticket}"):
        _C._wait_reads(ticket)
    t.close()
