"""The machine's own limits, measured in the same run as every kernel: the ceilings GB/s is judged against.

- host-copy: `dst.copy_(src)` of a buffer far larger than the caches; GB/s counts bytes read
  (= bytes written), which is how the gather kernels count their table reads.
- h2d-pinned (GPU): pinned host -> device DMA; d2d (GPU): HBM device-to-device copy.
- zero-copy-read (GPU): a copy kernel whose loads read pinned host memory in place through its
  device alias (SM loads over PCIe, no DMA engine): the ceiling for kernels that read a host table
  in place (the zero-copy gather and lut_combine on a pinned table).
"""
import pytest
import torch

from conftest import HAS_CUDA, run

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible)")


def test_host_copy(benchmark, memcpy_bytes):
    src = torch.ones(memcpy_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    benchmark.group = "limits"
    benchmark.extra_info.update(provider="limit", op="host-copy", bytes=memcpy_bytes, shape=f"{memcpy_bytes >> 20}MiB")
    run(benchmark, lambda: dst.copy_(src))


@requires_cuda
def test_h2d_pinned(benchmark, memcpy_bytes):
    src = torch.ones(memcpy_bytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(memcpy_bytes, dtype=torch.uint8, device="cuda")
    benchmark.group = "limits"
    benchmark.extra_info.update(provider="limit", op="h2d-pinned", bytes=memcpy_bytes, shape=f"{memcpy_bytes >> 20}MiB")
    run(benchmark, lambda: dst.copy_(src, non_blocking=True), device="cuda")


@requires_cuda
def test_d2d(benchmark, memcpy_bytes):
    src = torch.ones(memcpy_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    benchmark.group = "limits"
    benchmark.extra_info.update(provider="limit", op="d2d", bytes=memcpy_bytes, shape=f"{memcpy_bytes >> 20}MiB")
    run(benchmark, lambda: dst.copy_(src), device="cuda")


@requires_cuda
def test_zero_copy_read(benchmark, memcpy_bytes):
    import mole_kernels  # noqa: F401  (registers torch.ops.mole_kernels)

    src = torch.ones(memcpy_bytes, dtype=torch.uint8).pin_memory()
    alias = torch.ops.mole_kernels.device_view(src, torch.device("cuda"))  # a CUDA tensor over the host bytes
    dst = torch.empty(memcpy_bytes, dtype=torch.uint8, device="cuda")
    benchmark.group = "limits"
    benchmark.extra_info.update(provider="limit", op="zero-copy-read", bytes=memcpy_bytes,
                                shape=f"{memcpy_bytes >> 20}MiB")
    run(benchmark, lambda: dst.copy_(alias), device="cuda")
