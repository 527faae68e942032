"""Host time of one eager MoLE layer call on the CUDA path, measured on any machine (no GPU needed).

A decode step at batch 1 is latency-bound: every microsecond of Python per layer call is paid
L times per token (24 at 410M). This measures what a layer call costs on the host *up to the
kernel launch*, through the same Python code a GPU runs: :func:`stubbed_cuda_launch` makes the
Triton backend take CPU tensors (``combine._backend`` answers ``"triton"``), installs a Triton
driver that reports sm_90, stream 0 and as the current device -1 (a CPU tensor's ``get_device()``:
the layer's tensors are on the current device, as on a one-GPU machine), and compiles each
specialization into a stand-in whose ``run`` (the launcher: Triton's C launch and the CUDA driver)
only counts. Everything before it is real: our checks and bookkeeping, combine's launch cache,
Triton's argument binding, specialization, cache lookup and launch metadata. What a GPU adds that
is not here: ``torch.cuda.current_device()`` (the stand-in driver answers in one Python call), the
CUDA caching allocator behind the output's ``empty_like`` and cuBLAS's launch behind the router's
``F.linear`` (here the CPU allocator and a [B, D] x [D, E] CPU matmul), and the launcher itself
(same for every provider).

Providers (one process, interleaved, medians of --reps repetitions of --calls calls each):

- ``raw-launch`` (the baseline): ``kernel[grid](...)`` of the combine kernel, nothing else —
  Triton's own launch path.
- ``wrapped-launch``: the same through ``torch.library.wrap_triton`` (what every eager launch paid
  before issue 23: a higher-order-op dispatch and a never-freed kernel side-table entry per call).
- ``layer-direct``: a step's layer call for a table read in place (device tier, or the host tier's
  device alias): ``combine(l, x, residual, shared, router_weight)`` as the model makes it, on the
  model's decode shapes (ids [B, 1], hidden states [B, 1, D]).
- ``layer-direct-uncached``: the same with combine's launch cache off (``combine._Launches``: every
  launch through Triton's ``JITFunction.run``, as before the cache), to show what the cache saves.
- ``layer-prefetched``: the host tier's decode layer call over a real :class:`Prefetcher`'s rows (a
  CPU one: its per-layer CUDA event wait, ``current_stream().wait_event``, is the one thing left out).

    python bench/host_overhead.py [--calls 1000] [--reps 7] [--json out.jsonl]

Goal (issue 23): <= 20 us per layer call; retained memory is tested in
python_tests/test_host_overhead.py (0 bytes over 1,000 calls, tracemalloc).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch


class _FakeDriver:
    """What Triton's JITFunction.run asks the driver before a launch, answered without a GPU."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self._target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return -1  # what a CPU tensor's get_device() answers: the layer's tensors are on the current device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def get_active_torch_device(self):
        return torch.device("cpu")


class _CountingKernel:
    """A compiled kernel stand-in, one per Triton cache key (``key``; ``options``: what it was compiled
    with): ``run`` is the launch, which it counts and skips, noting the kernel and the arguments it got
    (``counter["last"]``, replaced per launch: nothing accumulates); ``launch_metadata`` is Triton's own."""

    name, src = "stub", None

    def __init__(self, counter, key=None, options=None):
        from triton.compiler.compiler import CompiledKernel

        self.function, self.packed_metadata, self._counter = None, None, counter
        self.key, self.options = key, options
        self.launch_metadata = CompiledKernel.launch_metadata.__get__(self)

    def _init_handles(self):  # loaded: a real kernel's handles are too after its first launch
        pass

    def run(self, *args):
        self._counter["launches"] += 1
        self._counter["last"] = (self, args)


@contextlib.contextmanager
def stubbed_cuda_launch():
    """Runs the CUDA path's Python with CPU tensors up to the launch; yields ``{"launches": n, "compiles": n,
    "last": (stand-in kernel, its run's arguments)}``."""
    import triton
    from triton.runtime import driver as triton_driver
    from triton.runtime import jit

    from mole_kernels import combine

    counter = {"launches": 0, "compiles": 0, "last": None}

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        counter["compiles"] += 1
        kernel = _CountingKernel(counter, key, options)
        self.device_caches[device][0][key] = kernel  # cached: later calls find it as a real launch would
        return kernel

    saved = (triton_driver._active, jit.JITFunction._do_compile, combine._backend)
    caches = {k: dict(k.device_caches) for k in (combine._mole_combine_kernel, combine._router_softmax_kernel)}
    triton_driver._active = _FakeDriver()
    jit.JITFunction._do_compile = fake_compile
    combine._backend = lambda t: "triton"
    try:
        yield counter
    finally:
        triton_driver._active, jit.JITFunction._do_compile, combine._backend = saved
        for k, cache in caches.items():  # forget the stand-in kernels
            k.device_caches.clear()
            k.device_caches.update(cache)
    del triton


def layer_calls(T: int = 1, E: int = 4, D: int = 1024, L: int = 24, V: int = 512, dtype=torch.bfloat16):
    """{provider: (one layer call, launches it makes)} over CPU tensors at a decode shape (410M-4E, B=T).
    Call them under ``torch.no_grad()``, as a model's steps run (with grad mode on the eager fast paths
    step aside for the op, which autograd can see)."""
    from mole_kernels import combine
    from mole_kernels import LookupTable
    from mole_kernels.table.reader import _Prefetched

    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, L, E, D, generator=g).to(dtype)
    # The model's decode-step shapes: ids [B, 1], hidden states [B, 1, D] (MoLEForCausalLM._ffn).
    ids = torch.randint(0, V, (T, 1), generator=g)
    x = torch.randn(T, 1, D, generator=g).to(dtype)
    residual = torch.randn(T, 1, D, generator=g).to(dtype)
    shared = torch.randn(T, 1, D, generator=g).to(dtype)
    router = torch.randn(E, D, generator=g).to(dtype)
    faults = torch.zeros(1, dtype=torch.int64)
    prefetch = LookupTable.from_tensor(table, "host", device="cpu").prefetcher(T, strict=False).start(ids)
    logits = torch.randn(T, E, generator=g).to(dtype)
    out = torch.empty(T, D, dtype=dtype)
    layer = L // 2

    cfg = combine._combine_config(T, E, D)
    grid = (T, -(-D // cfg["BLOCK_D"]))
    kern = combine._mole_combine_kernel
    res2, sh2 = residual.view(T, D), shared.view(T, D)
    args = (logits, table[:, layer], res2, sh2, out, ids.view(T), faults, E, D, V,
            logits.stride(0), logits.stride(1), table.stride(0), table.stride(2), table.stride(3),
            res2.stride(0), res2.stride(1), sh2.stride(0), sh2.stride(1), out.stride(0), out.stride(1))
    kw = dict(HAS_RES=True, HAS_SH=True, GATHER=True, COUNT_FAULTS=True, **cfg)

    def raw():
        kern[grid](*args, **kw)

    def wrapped():
        torch.library.wrap_triton(kern)[grid](*args, **kw)

    direct = combine._lut_combine_step_cuda([table[:, l] for l in range(L)], ids, faults)
    prefetched = _Prefetched(prefetch).combine
    return {
        "raw-launch": (raw, 1),
        "wrapped-launch": (wrapped, 1),
        "layer-direct": (lambda: direct(layer, x, residual, shared, router), 1),
        "layer-direct-uncached": (lambda: direct(layer, x, residual, shared, router), 1, launch_cache_off),
        "layer-prefetched": (lambda: prefetched(layer, x, residual, shared, router), 1),
    }


@contextlib.contextmanager
def launch_cache_off():
    """combine's launch cache off for the combine kernel: each launch through Triton's JITFunction.run."""
    from mole_kernels import combine

    class NeverRemembers(combine._Launches):
        __slots__ = ()

        def _remember(self, *args):
            pass

    kernel = combine._mole_combine_kernel
    saved = combine._LAUNCHES[kernel]
    combine._LAUNCHES[kernel] = NeverRemembers(kernel)
    try:
        yield
    finally:
        combine._LAUNCHES[kernel] = saved


def measure(calls: int = 1000, reps: int = 7, providers=None, log=None, clock=time.perf_counter) -> dict:
    """{provider: median us per call}; providers interleaved within each repetition. ``clock``:
    ``time.perf_counter`` (wall) or ``time.thread_time`` (this thread's CPU time: on a machine loaded by
    others, wall time also counts the time other processes held the core)."""
    with stubbed_cuda_launch() as counter, torch.no_grad():  # as generate() runs its steps
        cases = layer_calls()
        names = providers or list(cases)
        times = {n: [] for n in names}
        for n in names:  # warm: the first launch "compiles" (caches the stand-in)
            fn, _, setting = (*cases[n], contextlib.nullcontext)[:3]
            with setting():
                for _ in range(20):
                    fn()
        for rep in range(reps):
            for n in names:
                fn, launches, setting = (*cases[n], contextlib.nullcontext)[:3]
                before = counter["launches"]
                with setting():
                    t0 = clock()
                    for _ in range(calls):
                        fn()
                    dt = clock() - t0
                if counter["launches"] - before != launches * calls:
                    raise RuntimeError(f"{n}: {counter['launches'] - before} launches for {calls} calls, expected "
                                       f"{launches * calls} (the path did not reach the kernel launch)")
                times[n].append(dt / calls * 1e6)
            if log:
                log(rep)
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000, help="calls per repetition (default 1000)")
    p.add_argument("--reps", type=int, default=7, help="repetitions, interleaved across providers (default 7)")
    p.add_argument("--json", help="append one JSON line per provider to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()
    print(f"host time per call up to the launch (CPU, launch stubbed), median of {a.reps} x {a.calls}, "
          f"providers interleaved; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows = []
    for clock_name, clock in (("wall", time.perf_counter), ("thread CPU", time.thread_time)):
        med = measure(a.calls, a.reps, clock=clock)
        base = med["raw-launch"]
        print(f" {clock_name} time:")
        for n, us in med.items():
            print(f"  {n:22s} {us:8.2f} us   x{us / base:5.2f} raw-launch")
            rows.append({"bench": "host_overhead", "clock": clock_name, "provider": n, "us_per_call": us,
                         "ratio_vs_raw_launch": us / base, "load1": load[0]})
        goal = max(med["layer-direct"], med["layer-prefetched"])
        print(f"  goal <= 20 us per eager layer call ({clock_name}): {'met' if goal <= 20 else 'NOT met'} "
              f"({goal:.2f} us)")
    if a.json:
        with open(a.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
