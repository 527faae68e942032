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


def _retained_bytes(fn, calls=1000, more=0):
    """Bytes of Python memory still held after ``calls`` calls of ``fn`` (warmed first; collected), and
    with ``more``, how many more are held after ``more`` further calls (a growth, measured in the same
    trace: what a per-call leak shows as, whatever a first call keeps)."""
    for _ in range(50):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(calls):
            fn()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        for _ in range(more):
            fn()
        gc.collect()
        retained = after - before
        return (retained, tracemalloc.get_traced_memory()[0] - after) if more else retained
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("provider", ["layer-direct", "layer-prefetched", "raw-launch"])
def test_eager_layer_call_retains_nothing_over_1000_calls(stubbed, provider):
    fn, launches = overhead.layer_calls()[provider]
    before = stubbed["launches"]
    retained, growth = _retained_bytes(fn, 1000, more=2000)
    assert stubbed["launches"] - before == launches * 3050  # each call reached the (stubbed) launch
    # 0 bytes per call: anything kept per call is an object of >= 16 bytes, >= 16,000 bytes over 1,000
    # calls; a few KB in all is interpreter noise (a free list or a dict resizing once: 1,024 bytes were
    # seen after the whole suite had run in the process), not per call.
    assert retained < 4096, f"{provider}: {retained} bytes retained over 1,000 calls"
    # Nor over 2,000 more (>= 32,000 bytes if anything were kept per call; the measurement's own ints, a
    # free list's or a cache's one-off growth stay under a few KB: 816 bytes once, for Triton's own launch,
    # after the whole suite had run in the process).
    assert growth < 4096, f"{provider}: {growth} more bytes retained over 2,000 more calls"


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
    assert set(med) == {"raw-launch", "wrapped-launch", "layer-direct", "layer-direct-uncached", "layer-prefetched"}
    assert all(v > 0 for v in med.values())


# ---------------------------------------------------------------------------------------------------
# combine._Launches: a remembered launch is the one Triton itself would make, and Triton launches
# whenever the specialization or its state could differ.
# ---------------------------------------------------------------------------------------------------
KERNEL = combine._mole_combine_kernel


def _triton_key(pointers, scalars, meta):
    """The cache key JITFunction.run computes for this launch (its own code: binder, compute_cache_key)."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    device = combine._TRITON_DRIVER.active.get_current_device()
    _, key_cache, _, _, binder = KERNEL.device_caches[device]
    kw = dict(meta)
    kw["debug"] = kw.get("debug", KERNEL.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    _, specialization, options = binder(*pointers, *scalars, **kw)
    return compute_cache_key(key_cache, specialization, options)


@pytest.fixture
def launches(stubbed, monkeypatch):
    """Each _mole_combine_triton call's launch as ``(pointers, scalars, meta)`` (what _Launches got), how
    often Triton's own JITFunction.run ran, and a fresh _Launches (nothing remembered from other tests)."""
    seen = {"calls": [], "triton_runs": 0}
    monkeypatch.setitem(combine._LAUNCHES, KERNEL, combine._Launches(KERNEL))
    real_call, real_run = combine._Launches.__call__, KERNEL.run

    def call(self, device, grid, pointers, scalars, meta):
        seen["calls"].append((pointers, scalars, meta))
        return real_call(self, device, grid, pointers, scalars, meta)

    def run(*args, **kw):
        seen["triton_runs"] += 1
        return real_run(*args, **kw)

    monkeypatch.setattr(combine._Launches, "__call__", call)
    monkeypatch.setattr(KERNEL, "run", run)
    return seen


def _case(T=3, E=4, D=64, V=11, dtype=torch.bfloat16, res="plain", ids_dtype=torch.int64, gather=True,
          faults=True):
    g = torch.Generator().manual_seed(T * 1000 + E * 100 + D)

    def t(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    residual = {"plain": lambda: t(T, D), "fp32": lambda: t(T, D, dt=torch.float32), "none": lambda: None,
                "strided": lambda: t(T, 2 * D)[:, ::2],  # element stride 2 (not the value 1), row stride 2D
                "misaligned": lambda: torch.randn(T * D + 1, generator=g).to(dtype)[1:].view(T, D)}[res]()
    ids = torch.randint(0, V, (T,), generator=g).to(ids_dtype) if gather else None
    return dict(logits=t(T, E), rows3=t(V, E, D) if gather else t(T, E, D), res=residual, sh=t(T, D),
                out=t(T, D), ids=ids, faults=torch.zeros(1, dtype=torch.int64) if faults else None)


# Each differs from "base" in one thing Triton specialises on (or a constexpr / launch option).
VARIANTS = {
    "base": {},
    "float32 residual (dtype)": dict(res="fp32"),
    "misaligned residual (address mod 16)": dict(res="misaligned"),
    "strided residual (stride values, stride 1 -> 2)": dict(res="strided"),
    "int32 ids (dtype)": dict(ids_dtype=torch.int32),
    "no residual (constexpr HAS_RES)": dict(res="none"),
    "no fault counter (constexpr COUNT_FAULTS)": dict(faults=False),
    "rows, no table (constexpr GATHER)": dict(gather=False),
    "E = 1 (an integer of value 1; BLOCK_E)": dict(E=1),
    "D = 40 (not a multiple of 16)": dict(D=40),
    "V = 16 (a multiple of 16)": dict(V=16),
    "T = 200 (prefill block sizes, num_warps)": dict(T=200, D=4096),
    "float16 everywhere": dict(dtype=torch.float16),
}


def _combine(c):
    combine._mole_combine_triton(c["logits"], c["rows3"], c["res"], c["sh"], c["out"], ids=c["ids"],
                                 faults=c["faults"])


def test_the_installed_triton_launches_as_the_cache_repeats_it():
    # Where this fails, a new Triton changed JITFunction.run: every launch then goes through it (correct,
    # slower: bench/host_overhead.py shows it); re-read run() and update combine._TRITON_RUN_LINES.
    assert combine._triton_run_mirrored()


def test_remembered_launches_are_the_ones_triton_would_make(stubbed, launches):
    """Every specialization change in VARIANTS, interleaved and repeated: each launch runs the compiled
    kernel Triton's own key picks, with the arguments Triton's launch passed it; Triton's run is entered
    once per variant (its first launch), every later launch is remembered."""
    import random

    cases = {name: _case(**kw) for name, kw in VARIANTS.items()}
    order = [name for _ in range(3) for name in cases]
    random.Random(0).shuffle(order)
    first_args, triton_keys = {}, set()
    for name in order:
        launches["calls"].clear()
        _combine(cases[name])
        (pointers, scalars, meta), = launches["calls"]
        kernel, args = stubbed["last"]
        assert kernel.key == _triton_key(pointers, scalars, meta), name
        triton_keys.add(kernel.key)
        # grid, stream, function, packed metadata and the kernel's arguments as Triton passed them the first
        # time (launch metadata and hooks: see test_launch_hooks_get_what_triton_gives_them)
        fixed = args[:6] + tuple((a.data_ptr(), a.dtype, a.shape, a.stride()) if isinstance(a, torch.Tensor) else a
                                 for a in args[9:])
        assert first_args.setdefault(name, fixed) == fixed, name
    assert launches["triton_runs"] == len(VARIANTS)
    assert len(triton_keys) == len(VARIANTS) == stubbed["compiles"]  # each variant its own compiled kernel


def test_a_cleared_or_replaced_triton_cache_is_never_launched_from(stubbed, launches):
    c = _case()
    _combine(c)
    _combine(c)
    old = stubbed["last"][0]
    assert launches["triton_runs"] == 1
    device = combine._TRITON_DRIVER.active.get_current_device()
    KERNEL.device_caches[device][0].clear()  # Triton's compiled-kernel cache emptied
    _combine(c)
    assert launches["triton_runs"] == 2 and stubbed["last"][0] is not old  # recompiled, launched through Triton
    new = stubbed["last"][0]
    KERNEL.device_caches.clear()  # every device's caches (binder included) dropped
    _combine(c)
    assert launches["triton_runs"] == 3 and stubbed["last"][0] not in (old, new)
    _combine(c)
    assert launches["triton_runs"] == 3  # remembered again


def test_triton_state_that_changes_its_key_or_runs_hooks_takes_its_launch(stubbed, launches, monkeypatch):
    from triton import knobs

    c = _case()
    _combine(c)
    plain = stubbed["last"][0]
    monkeypatch.setattr(knobs.runtime, "debug", True)  # part of Triton's key: another compiled kernel
    for n in (2, 3):
        _combine(c)
        assert launches["triton_runs"] == n and stubbed["last"][0] is not plain
        assert stubbed["last"][0].options.debug is True
    monkeypatch.setattr(knobs.runtime, "debug", False)
    _combine(c)
    assert launches["triton_runs"] == 3 and stubbed["last"][0] is plain  # remembered, as compiled without debug

    hooked = []
    KERNEL.add_pre_run_hook(lambda *a, **k: hooked.append(1))
    monkeypatch.setattr(KERNEL, "pre_run_hooks", KERNEL.pre_run_hooks)  # removed again after the test
    try:
        _combine(c)
        _combine(c)
        assert launches["triton_runs"] == 5 and hooked == [1, 1]
    finally:
        KERNEL.pre_run_hooks.clear()
    _combine(c)
    assert launches["triton_runs"] == 5

    monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", lambda: ("k", "h"))
    monkeypatch.setattr(combine, "_plain_triton_state", lambda: False)  # (the hook itself would need a compile)
    _combine(c)
    assert launches["triton_runs"] == 6


def test_launch_hooks_get_what_triton_gives_them(stubbed, launches):
    from triton import knobs

    c = _case()
    _combine(c)
    _, args = stubbed["last"]
    assert args[6] is not None and args[7] is knobs.runtime.launch_enter_hook  # Triton's own launch
    _combine(c)
    _, args = stubbed["last"]
    assert args[6:9] == (None, None, None)  # remembered, empty hook chains: nothing to call or describe

    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _combine(c)
        _, args = stubbed["last"]
        assert launches["triton_runs"] == 1  # still remembered, with the metadata and hooks Triton passes
        assert args[6].get()["name"] == "stub" and args[7] is knobs.runtime.launch_enter_hook
        assert args[8] is knobs.runtime.launch_exit_hook
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


def test_nothing_is_remembered_where_the_launch_cannot_be_repeated(stubbed, launches, monkeypatch):
    c = _case()
    monkeypatch.setattr(combine, "_triton_run_mirrored", lambda: False)  # another Triton's run()
    for n in (1, 2, 3):
        _combine(c)
        assert launches["triton_runs"] == n
    monkeypatch.setattr(combine, "_triton_run_mirrored", lambda: True)
    monkeypatch.setattr(KERNEL, "used_global_vals", {("G", 0): (1, {"G": 1})})  # Triton re-checks globals per call
    for n in (4, 5):
        _combine(c)
        assert launches["triton_runs"] == n
    monkeypatch.setattr(KERNEL, "used_global_vals", {})
    _combine(c)
    _combine(c)
    assert launches["triton_runs"] == 6


def test_the_cache_is_bounded(stubbed, launches, monkeypatch):
    monkeypatch.setattr(combine._Launches, "_MAX_KEYS", 4)
    for D in range(16, 16 * 7, 16):  # six shapes: six keys
        _combine(_case(D=D))
    assert 0 < len(combine._LAUNCHES[KERNEL].known) <= 4


def test_another_gpu_gets_a_device_guard_and_triton_s_launch(stubbed, launches, monkeypatch):
    """A tensor off the current device: launched by Triton under torch.cuda.device(its device)."""
    guarded = []

    class Guard:
        def __init__(self, device):
            guarded.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(combine._TRITON_DRIVER.active, "get_current_device", lambda: 7)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    c = _case()
    _combine(c)
    _combine(c)
    assert guarded == [c["out"].device] * 2 and launches["calls"] == [] and stubbed["launches"] >= 2


def test_prefetched_layer_call_checks_the_model_tensors_against_the_rows(stubbed):
    """The host tier's eager decode call: residual/shared of another hidden size are refused (the
    kernel would read D elements of each), not launched."""
    from mole_kernels import LookupTable
    from mole_kernels.table.reader import _Prefetched

    V, L, E, D, T = 13, 2, 4, 64, 3
    ids = torch.randint(0, V, (T, 1))
    handle = LookupTable.from_tensor(torch.randn(V, L, E, D), "host", device="cpu").prefetcher(T).start(ids)
    step = _Prefetched(handle).combine
    x, w = torch.randn(T, 1, D), torch.randn(E, D)
    out = step(1, x, torch.randn(T, 1, D), torch.randn(T, 1, D), w)
    assert out.shape == (T, 1, D) and stubbed["launches"] == 1
    half = torch.randn(T, 2, D // 2)  # T * D elements, last dim D / 2
    with pytest.raises(ValueError, match="needs logits"):
        step(1, x, torch.randn(T, 1, D // 2), torch.randn(T, 1, D // 2), w)
    out = step(1, x, half, half.clone(), w)  # T * D elements: read as [T, D] rows, like the op's reshape
    assert out.shape == half.shape and stubbed["launches"] == 2
