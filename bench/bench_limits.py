"""The machine's own limits, measured in the same run as every kernel: the ceilings GB/s is judged against.

- host-copy: `dst.copy_(src)` of a buffer far larger than the caches; GB/s counts bytes read
  (= bytes written), which is how the gather kernels count their table reads.
- h2d-pinned (GPU): pinned host -> device DMA (copy engine); d2d (GPU): HBM device-to-device copy.
- dma-from-alias (GPU): `dst.copy_(alias)` where `alias` is the CUDA tensor over pinned host memory:
  torch turns it into a copy-engine memcpy, so it is DMA too (what the old "zero-copy read" measured).
- zero-copy-sm-read (GPU): a Triton copy kernel whose *SM loads* read pinned host memory in place
  through its device alias (16-byte loads, 64 KB in flight per program, no copy engine): the
  ceiling for kernels that read a host table in place (the zero-copy gather and lut_combine on a
  pinned table), which "zero-copy rows >= 90 % of the SM-load baseline" is judged against.
"""
import pytest
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the SM-load baseline needs triton
    triton = tl = None

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
def test_dma_from_alias(benchmark, memcpy_bytes):
    import mole_kernels  # noqa: F401  (registers torch.ops.mole_kernels)

    src = torch.ones(memcpy_bytes, dtype=torch.uint8).pin_memory()
    alias = torch.ops.mole_kernels.device_view(src, torch.device("cuda"))  # a CUDA tensor over the host bytes
    dst = torch.empty(memcpy_bytes, dtype=torch.uint8, device="cuda")
    benchmark.group = "limits"
    benchmark.extra_info.update(provider="limit", op="dma-from-alias", bytes=memcpy_bytes,
                                shape=f"{memcpy_bytes >> 20}MiB")
    run(benchmark, lambda: dst.copy_(alias), device="cuda")


if triton is not None:
    @triton.jit
    def _sm_copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        # int64 offsets (buffers pass 2**31 bytes); contiguous int32 lanes, 16 per thread at 8 warps:
        # 16-byte vector loads, BLOCK * 4 bytes in flight per program.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def sm_copy(src: torch.Tensor, dst: torch.Tensor, block: int = 16384) -> None:
    """dst[:] = src[:] by SM loads and stores (int32 lanes; both contiguous, same byte size, a multiple of 4)."""
    s32, d32 = src.view(torch.int32), dst.view(torch.int32)
    n = s32.numel()
    _sm_copy_kernel[(triton.cdiv(n, block),)](s32, d32, n, BLOCK=block, num_warps=8)


@requires_cuda
@pytest.mark.skipif(triton is None, reason="needs triton")
def test_zero_copy_sm_read(benchmark, memcpy_bytes):
    import mole_kernels  # noqa: F401  (registers torch.ops.mole_kernels)

    src = torch.randint(0, 255, (memcpy_bytes,), dtype=torch.uint8).pin_memory()
    alias = torch.ops.mole_kernels.device_view(src, torch.device("cuda"))
    dst = torch.empty(memcpy_bytes, dtype=torch.uint8, device="cuda")
    sm_copy(alias, dst)  # compile, and check that it copies
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src), "the SM-load copy kernel did not copy its source"
    benchmark.group = "limits"
    benchmark.extra_info.update(provider="limit", op="zero-copy-sm-read", bytes=memcpy_bytes,
                                shape=f"{memcpy_bytes >> 20}MiB")
    run(benchmark, lambda: sm_copy(alias, dst), device="cuda")
