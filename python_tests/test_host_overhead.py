"""Issue 23: an eager GPU layer call costs the launch and keeps nothing.

Runs the CUDA path's Python on CPU tensors up to the kernel launch (bench/host_overhead.py's
``stubbed_cuda_launch``: Triton's driver answers for a GPU, the compiled kernel's ``run`` only counts).
Checked here: every layer call reaches exactly one launch, launches are raw in eager (never through
``torch.library.wrap_triton``) and wrapped where something traces, and 1,000 calls retain 0 bytes
(tracemalloc). The time per call is bench/host_overhead.py's to measure (no timing in tests).
"""
import gc
import importlib.util
import os
import tracemalloc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mole_kernels import combine

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "bench", "host_overhead.py")

if combine.triton is None:
    pytest.skip("needs triton (the CUDA path launches Triton kernels)", allow_module_level=True)
if combine._INTERPRET:
    pytest.skip("kernels are interpreted in this process (TRITON_INTERPRET=1): no launch to stub",
                allow_module_level=True)
if not os.path.isfile(SCRIPT):
    pytest.skip(f"needs the checkout's bench/host_overhead.py ({SCRIPT} not found)", allow_module_level=True)


def _load():
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


overhead = _load()


@pytest.fixture
def stubbed():
    with overhead.stubbed_cuda_launch() as counter, torch.no_grad():  # as a model's steps run
        yield counter


def _retained_bytes(fn, calls=1000):
    """Bytes of Python memory still held after ``calls`` calls of ``fn`` (warmed first; collected)."""
    for _ in range(50):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(calls):
            fn()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("provider", ["layer-direct", "layer-prefetched", "raw-launch"])
def test_eager_layer_call_retains_nothing_over_1000_calls(stubbed, provider):
    fn, launches = overhead.layer_calls()[provider]
    before = stubbed["launches"]
    retained = _retained_bytes(fn)
    assert stubbed["launches"] - before == launches * 1050  # each call reached the (stubbed) launch
    # 0 bytes per call: anything kept per call is an object of >= 16 bytes, >= 16,000 bytes over 1,000
    # calls; less than 1,000 in all is interpreter noise (a free list or dict resizing), not per call.
    assert retained < 1000, f"{provider}: {retained} bytes retained over 1,000 calls"


def test_retention_is_detected_where_it_exists(stubbed):
    """The check above can fail: a wrap_triton launch in eager keeps a kernel side-table entry per call."""
    retained = _retained_bytes(overhead.layer_calls()["wrapped-launch"][0], calls=200)
    assert retained > 200 * 100, f"only {retained} bytes over 200 wrapped launches"


def test_eager_launches_are_raw_and_traced_ones_wrapped(stubbed, monkeypatch):
    wrapped = []

    def spy(kernel):
        wrapped.append(kernel)
        return kernel  # launch it as is (the stub counts it)

    monkeypatch.setattr(combine, "_WRAP", spy)
    fn, _ = overhead.layer_calls()["layer-direct"]
    fn()
    assert wrapped == []  # eager, plain tensors: the JIT function itself

    class Passthrough(TorchDispatchMode):  # what make_fx / FakeTensorMode look like to the launch
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        fn()
    assert wrapped == [combine._mole_combine_kernel]


def test_layer_call_matches_the_op_up_to_the_launch(stubbed):
    """The per-layer fast path hands the kernel the arguments the op path would (same table view,
    ids, strides and constexprs), so skipping the dispatcher changes nothing but the cost."""
    seen = []
    real = combine._mole_combine_triton

    def record(*args, **kw):
        seen.append((args, kw))

    combine._mole_combine_triton = record
    try:
        V, L, E, D, T = 17, 3, 4, 64, 5
        lut = torch.randn(V, L, E, D)
        ids = torch.randint(0, V, (T,))
        x, res, sh = torch.randn(T, D), torch.randn(T, D), torch.randn(T, D)
        w = torch.randn(E, D)
        faults = torch.zeros(1, dtype=torch.int64)
        step = combine._lut_combine_step_cuda([lut[:, l] for l in range(L)], ids, faults)
        out = step(2, x, res, sh, w)
        assert out.shape == (T, D) and out.dtype == res.dtype
        (logits2, rows, res2, sh2, out2), kw = seen[0]
        assert rows.data_ptr() == lut[:, 2].data_ptr() and rows.stride() == (L * E * D, D, 1)
        torch.testing.assert_close(logits2, torch.nn.functional.linear(x, w))
        assert res2.data_ptr() == res.data_ptr() and sh2.data_ptr() == sh.data_ptr()
        assert kw["ids"].data_ptr() == ids.data_ptr() and kw["faults"] is faults
        with pytest.raises(ValueError, match=r"layer must be in \[0, 3\)"):
            step(3, x, res, sh, w)
        with pytest.raises(ValueError, match="needs logits"):
            step(0, x[:2], res, sh, w)
    finally:
        combine._mole_combine_triton = real


def test_host_overhead_script_runs():
    """The benchmark's measurement itself (a few calls): every provider reaches its launch."""
    med = overhead.measure(calls=20, reps=1)
    assert set(med) == {"raw-launch", "wrapped-launch", "layer-direct", "layer-prefetched"}
    assert all(v > 0 for v in med.values())
