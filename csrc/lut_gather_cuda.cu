// lut_gather on CUDA: the table is in VRAM, or in pinned host memory read in
// place over PCIe (zero-copy through unified addressing).
//
// Designed for the bytes: every thread issues several independent 16-byte loads
// before it stores (a PCIe round trip is ~1-2 us, so many loads must be in
// flight), and work is split within a row as well as across tokens, so a
// single 72-192 KB decode row still spreads over many SMs.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "lut_gather.h"

namespace mole {
namespace {

using cuda::aligned;
using cuda::Pack;
using cuda::valid_id;

constexpr int kRowsThreads = 256;
constexpr int kRowsUnroll = 4;  // independent 16-byte loads in flight per thread
constexpr int kMaxGridY = 65535;

// Rows form: each token's segment is a contiguous byte range copied in vec_t units, to
// out + t * out_stride (bytes: a prefetch buffer's slice of several layers has strided tokens).
template <typename vec_t, typename id_t>
__global__ void rows_kernel(const char* __restrict__ lut, const id_t* __restrict__ ids, char* __restrict__ out,
                            int64_t T, int64_t V, int64_t row_bytes, int64_t seg_off_bytes, int64_t seg_vecs,
                            int64_t out_stride, unsigned long long* __restrict__ faults) {
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const id_t id = ids[t];
    const bool ok = valid_id(id, V);
    if (!ok && faults != nullptr && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(faults, 1ull);
    const vec_t* src = reinterpret_cast<const vec_t*>(lut + (ok ? int64_t(id) : 0) * row_bytes + seg_off_bytes);
    vec_t* dst = reinterpret_cast<vec_t*>(out + t * out_stride);
    const int64_t step = int64_t(gridDim.x) * blockDim.x * kRowsUnroll;
    for (int64_t base = int64_t(blockIdx.x) * blockDim.x * kRowsUnroll + threadIdx.x; base < seg_vecs;
         base += step) {
      vec_t v[kRowsUnroll];
#pragma unroll
      for (int u = 0; u < kRowsUnroll; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (i < seg_vecs) v[u] = ok ? src[i] : vec_t{};
      }
#pragma unroll
      for (int u = 0; u < kRowsUnroll; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (i < seg_vecs) dst[i] = v[u];
      }
    }
  }
}

// Fused form: block (t, column tile); each thread owns VEC columns and sums E rows.
template <typename lut_t, typename out_t, typename id_t, int VEC>
__global__ void fused_kernel(const lut_t* __restrict__ lut, const id_t* __restrict__ ids,
                             const float* __restrict__ w, out_t* __restrict__ out, int64_t V, int64_t row_elems,
                             int64_t seg_offset, int E, int64_t D, bool accumulate,
                             unsigned long long* __restrict__ faults) {
  const int64_t t = blockIdx.x;
  const int64_t col = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col >= D) return;
  const id_t id = ids[t];
  const bool ok = valid_id(id, V);
  if (!ok && faults != nullptr && blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(faults, 1ull);

  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (ok) {
    using LP = Pack<lut_t, VEC>;
    const lut_t* base = lut + int64_t(id) * row_elems + seg_offset + col;
    const float* wt = w + t * E;
    int e = 0;
    for (; e + 4 <= E; e += 4) {  // four rows' loads issued before any arithmetic
      LP r[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) r[k] = *reinterpret_cast<const LP*>(base + int64_t(e + k) * D);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float wk = wt[e + k];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += wk * static_cast<float>(r[k].v[j]);
      }
    }
    for (; e < E; ++e) {
      const LP r = *reinterpret_cast<const LP*>(base + int64_t(e) * D);
      const float we = wt[e];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += we * static_cast<float>(r.v[j]);
    }
  }
  using OP = Pack<out_t, VEC>;
  OP* dst = reinterpret_cast<OP*>(out + t * D + col);
  OP o;
  if (accumulate) o = *dst;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<out_t>(accumulate ? static_cast<float>(o.v[j]) + acc[j] : acc[j]);
  *dst = o;
}

template <typename id_t>
void launch_rows(const GatherPlan& p, const char* lut, size_t elem, const id_t* ids, char* out, int64_t out_stride,
                 unsigned long long* faults, cudaStream_t stream) {
  const int64_t row_bytes = p.row_elems * int64_t(elem);
  const int64_t seg_off = p.seg_offset * int64_t(elem);
  const int64_t seg_bytes = p.seg_elems * int64_t(elem);
  out_stride *= int64_t(elem);
  auto launch = [&](auto vec_tag) {
    using vec_t = decltype(vec_tag);
    const int64_t vecs = seg_bytes / int64_t(sizeof(vec_t));
    const int64_t per_block = int64_t(kRowsThreads) * kRowsUnroll;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((vecs + per_block - 1) / per_block, 4096)),
                    static_cast<unsigned>(std::min<int64_t>(p.T, kMaxGridY)));
    rows_kernel<vec_t, id_t><<<grid, kRowsThreads, 0, stream>>>(lut, ids, out, p.T, p.V, row_bytes, seg_off, vecs,
                                                               out_stride, faults);
  };
  // The widest unit that divides every row's start, the segment and both base pointers.
  auto fits = [&](int64_t w) {
    return row_bytes % w == 0 && seg_off % w == 0 && seg_bytes % w == 0 && out_stride % w == 0 && aligned(lut, w) &&
           aligned(out, w);
  };
  if (fits(16)) launch(uint4{});
  else if (fits(8)) launch(uint2{});
  else if (fits(4)) launch(uint32_t{});
  else if (fits(2)) launch(uint16_t{});
  else launch(uint8_t{});
}

template <typename lut_t, typename out_t, typename id_t>
void launch_fused(const GatherPlan& p, const lut_t* lut, const id_t* ids, const float* w, out_t* out,
                  bool accumulate, unsigned long long* faults, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(lut_t);  // one 16-byte load per row per thread
  auto launch = [&](auto vec_const) {
    constexpr int VEC = decltype(vec_const)::value;
    const int64_t cols = (p.D + VEC - 1) / VEC;
    const int threads = static_cast<int>(std::min<int64_t>(256, (cols + 31) / 32 * 32));
    const dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>((cols + threads - 1) / threads));
    fused_kernel<lut_t, out_t, id_t, VEC><<<grid, threads, 0, stream>>>(
        lut, ids, w, out, p.V, p.row_elems, p.seg_offset, static_cast<int>(p.E), p.D, accumulate, faults);
  };
  const bool vectorizable = p.D % kVec == 0 && aligned(lut, 16) && aligned(out, int64_t(sizeof(out_t)) * kVec);
  if (vectorizable) launch(std::integral_constant<int, kVec>{});
  else launch(std::integral_constant<int, 1>{});  // odd D or unaligned views: one element per thread
}

}  // namespace

void lut_gather_into_cuda(const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                          const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                          bool accumulate, const std::optional<at::Tensor>& faults,
                          std::optional<int64_t> layer_end) {
  const GatherPlan p = plan_lut_gather(lut, ids, weights, {layer, layer_end});
  const int64_t out_stride = check_gather_outputs(p, lut, ids, weights, out, faults);
  MOLE_CHECK_ARG(ids.is_cuda(), "lut_gather: the CUDA kernel needs ids on a CUDA device");
  MOLE_CHECK_ARG(p.fused || !accumulate, "lut_gather: accumulate=True needs weights (the fused form)");
  MOLE_CHECK_ARG(p.T <= std::numeric_limits<int32_t>::max(), "lut_gather: at most 2^31-1 ids per call, got ", p.T);
  const c10::cuda::CUDAGuard guard(ids.device());
  const void* table = cuda::table_device_pointer(
      lut, ids, "lut_gather", "lut", "lut.pin_memory() or mole_kernels.LookupTable(..., placement='host')");
  if (p.T == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor ids_c = ids.contiguous();  // ids are small; the table is never copied
  if (!faults.has_value()) cuda::raise_on_bad_id(ids_c, p.V, stream, "lut_gather");
  if (nothing_to_read(p, out, accumulate)) return;  // after the id check, as on the CPU
  unsigned long long* fptr =
      faults.has_value() ? reinterpret_cast<unsigned long long*>(faults->data_ptr<int64_t>()) : nullptr;

  if (!p.fused) {
    MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_rows_cuda", [&] {
      launch_rows(p, static_cast<const char*>(table), lut.element_size(), ids_c.const_data_ptr<scalar_t>(),
                  static_cast<char*>(out.data_ptr()), out_stride, fptr, stream);
    });
  } else {
    const at::Tensor w = kernel_weights(weights);
    MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_cuda", [&] {
      using id_t = scalar_t;
      MOLE_DISPATCH_FLOATING_TYPES(lut.scalar_type(), "lut_gather_cuda", [&] {
        using lut_t = scalar_t;
        MOLE_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lut_gather_cuda", [&] {
          launch_fused<lut_t, scalar_t, id_t>(p, static_cast<const lut_t*>(table), ids_c.const_data_ptr<id_t>(),
                                              w.const_data_ptr<float>(), out.data_ptr<scalar_t>(), accumulate,
                                              fptr, stream);
        });
      });
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A CUDA tensor over the same bytes as `t`: `t` itself when it is on `device`, or the device alias
// of pinned host memory (zero-copy over PCIe), which keeps `t`'s storage alive. Lets kernels that
// take device tensors (Triton) read a pinned table in place.
at::Tensor device_view(const at::Tensor& t, at::Device device) {
  MOLE_CHECK_ARG(device.is_cuda(), "device_view: device must be a CUDA device, got ", device);
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor probe = at::empty({0}, t.options().device(device));
  const void* p = cuda::table_device_pointer(t, probe, "device_view", "t", "t.pin_memory()");
  if (t.is_cuda()) return t;
  c10::Storage keep = t.storage();
  return at::from_blob(const_cast<void*>(p), t.sizes(), t.strides(), [keep](void*) {},
                       t.options().device(probe.device()));
}

}  // namespace mole

TORCH_LIBRARY_FRAGMENT(mole_kernels, m) {
  m.def("device_view(Tensor t, Device device) -> Tensor");
}

TORCH_LIBRARY_IMPL(mole_kernels, CPU, m) {
  m.impl("device_view", &mole::device_view);
}

TORCH_LIBRARY_IMPL(mole_kernels, CUDA, m) {
  m.impl("device_view", &mole::device_view);
  m.impl("lut_gather", &mole::lut_gather_functional<mole::lut_gather_into_cuda>);
  m.impl("lut_gather_out", &mole::lut_gather_into_cuda);
}
