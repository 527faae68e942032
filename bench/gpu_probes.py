"""GPU measurements that are not kernels: what bench/gpu_check.sh asks after the benchmark suites.

    python bench/gpu_probes.py [--jsonl out.jsonl] [--only NAME ...]

Each probe prints one line and appends one JSON line to --jsonl as soon as it finishes (a probe
killed by a time box loses only itself). Without a GPU every probe says so and nothing runs.

- ``exposed-prefetch-wait``: the host tier's decode at 410M-4E (L=24, E=4, D=1024, bf16; B = 1 and
  32): per layer, how long the main stream stalls on that layer's prefetch event. Two events on
  the main stream, one just before ``Prefetch.layer(l)``'s wait and one just after it: their
  distance is the stall (nothing else runs between them). Each layer's work between the waits is a
  stand-in of a 410M layer at that batch (attention-sized and MLP-sized matmuls plus the combine).
- ``host-register``: ``cudaHostRegister`` of a 410M-4E table's 9.9 GB (mmap, register, unregister),
  the time a host-tier ``LookupTable`` spends pinning before its first step.
- ``pcie-link``: the PCIe generation and width ``nvidia-smi`` reports while pinned host->device
  copies run (an idle link trains down to save power, so an idle reading says little), and the
  copies' GB/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

SHAPE_410M_4E = dict(V=50304, L=24, E=4, D=1024, FFN=4096)


def _emit(path, row):
    print(json.dumps(row, default=str), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def exposed_prefetch_wait(batches=(1, 32), steps=20, V=8192):
    """{B: per-layer median stall in us}. V is scaled down (the rows read and the per-layer work are
    the real shape's; the vocabulary only sets which rows exist)."""
    from mole_kernels import LookupTable, mole_combine

    s = SHAPE_410M_4E
    L, E, D, F = s["L"], s["E"], s["D"], s["FFN"]
    dev = torch.device("cuda")
    table = LookupTable.build((V, L, E, D), torch.bfloat16, lambda a, b, dst: dst.copy_(
        torch.empty(dst.shape, dtype=dst.dtype, device=dev).uniform_(-0.02, 0.02)), "host", dev, progress=False)
    w_attn = torch.randn(D, 4 * D, device=dev, dtype=torch.bfloat16) * 0.02  # qkv + o projections, fused
    w_up = torch.randn(D, F, device=dev, dtype=torch.bfloat16) * 0.02
    w_down = torch.randn(F, D, device=dev, dtype=torch.bfloat16) * 0.02
    router = torch.randn(D, E, device=dev, dtype=torch.bfloat16) * 0.02
    out = {}
    for B in batches:
        pf = table.prefetcher(B, strict=False)
        g = torch.Generator(device=dev).manual_seed(B)
        stalls = [[] for _ in range(L)]
        for step in range(steps + 2):  # two warm-up steps
            ids = torch.randint(0, V, (B,), device=dev, generator=g)
            h = torch.randn(B, D, device=dev, dtype=torch.bfloat16)
            handle = pf.start(ids)
            marks = []
            for l in range(L):
                a = h @ w_attn  # attention-sized work first: the prefetch runs meanwhile
                h = h + a[:, :D]
                before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                before.record()
                rows = handle.layer(l)
                after.record()
                shared = torch.nn.functional.gelu(h @ w_up) @ w_down
                h = mole_combine(h @ router, rows, h, shared)
                marks.append((before, after))
            torch.cuda.synchronize()
            if step >= 2:
                for l, (a, b) in enumerate(marks):
                    stalls[l].append(a.elapsed_time(b) * 1e3)
        out[B] = [statistics.median(v) for v in stalls]
    table.close()
    return out


def host_register(nbytes=None):
    """(seconds to allocate + register, seconds to release) for a 410M-4E table's bytes."""
    import mole_kernels  # noqa: F401  (registers torch.classes.mole_kernels)

    s = SHAPE_410M_4E
    nbytes = nbytes or s["V"] * s["L"] * s["E"] * s["D"] * 2
    torch.cuda.init()
    t0 = time.perf_counter()
    store = torch.classes.mole_kernels.TableStore("host", "", 0, nbytes, True)
    t1 = time.perf_counter()
    store.close()
    del store
    t2 = time.perf_counter()
    return nbytes, t1 - t0, t2 - t1


def pcie_link(seconds=2.0, nbytes=256 << 20):
    """(nvidia-smi's link readings during copies, GB/s of the copies)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stop, moved = threading.Event(), [0, 0.0]

    def load():
        t0 = time.perf_counter()
        while not stop.is_set():
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            moved[0] += nbytes
        moved[1] = time.perf_counter() - t0

    th = threading.Thread(target=load)
    th.start()
    time.sleep(seconds / 2)
    q = "pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max,pcie.link.width.max"
    try:
        reading = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        reading = f"nvidia-smi failed: {e}"
    time.sleep(seconds / 2)
    stop.set()
    th.join()
    return dict(zip(q.split(","), (x.strip() for x in reading.split(",")))) if "," in reading else reading, \
        moved[0] / moved[1] / 1e9


PROBES = {
    "exposed-prefetch-wait": lambda: {"us_per_layer_by_B": {str(b): [round(x, 2) for x in v]
                                                           for b, v in exposed_prefetch_wait().items()}},
    "host-register": lambda: dict(zip(("bytes", "register_s", "release_s"), host_register())),
    "pcie-link": lambda: dict(zip(("link_under_load", "h2d_GBps"), pcie_link())),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", help="append each probe's result here as one JSON line")
    p.add_argument("--only", nargs="*", choices=sorted(PROBES), help="run only these probes")
    a = p.parse_args(argv)
    names = a.only or list(PROBES)
    if not torch.cuda.is_available():
        for n in names:
            _emit(a.jsonl, {"probe": n, "skipped": "needs a CUDA device (none visible)"})
        return 0
    for n in names:
        t0 = time.perf_counter()
        try:
            row = {"probe": n, **PROBES[n]()}
        except Exception as e:  # one probe's failure must not cost the others
            row = {"probe": n, "error": f"{type(e).__name__}: {e}"}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        row["gpu"] = torch.cuda.get_device_name()
        _emit(a.jsonl, row)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
