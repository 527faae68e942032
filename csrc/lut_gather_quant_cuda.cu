// lut_gather_quant on CUDA: the quantized table is in VRAM, or pinned in host memory and read in
// place over PCIe (zero-copy): only quantized bytes cross the bus; codes are dequantized in
// registers. Layout: csrc/lut_gather_quant.h (one self-contained row per token/layer/expert).
//
// Each thread owns 16 payload bytes of a row (16 int8/fp8 codes or 32 nf4 codes, all in one scale
// block) and issues several independent 16-byte loads (plus their scales) before any arithmetic,
// so many loads are in flight to cover the PCIe round trip. Shapes that do not fit that (odd D,
// blocks smaller than a 16-byte chunk, unaligned views) take a one-element-per-thread path.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <limits>

#include "cuda_common.cuh"
#include "lut_gather_quant.h"

namespace mole {
namespace {

using cuda::aligned;
using cuda::Pack;
using cuda::valid_id;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread
constexpr int kMaxGridY = 65535;

__constant__ float kNf4Device[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

struct QArgs {
  const uint8_t* data;
  int64_t V;
  int64_t token_bytes;  // L * E * row_bytes
  int64_t seg_off;      // byte offset of the first row read within a token
  int64_t seg_rows;     // rows read per token
  int64_t row_bytes;
  int64_t D;
  int64_t block;
  int64_t scale_offset;
  int64_t out_stride;   // rows form: elements between consecutive tokens' results in `out`
};

// One code -> its value before scaling. e4m3 bits placed as fp16 s.0eeee.mmm0000000 are the value
// times 2^-8 (subnormals included), so the decode is exact; the NaN codes s.1111.111 (e4m3fn has no
// infinities) get an all-ones fp16 exponent: NaN, as on the CPU.
template <int FMT>
__device__ __forceinline__ float decode(uint32_t byte, int nibble, const float* nf4) {
  if constexpr (FMT == int(QFormat::kInt8)) {
    return static_cast<float>(static_cast<int8_t>(byte));
  } else if constexpr (FMT == int(QFormat::kFp8E4M3)) {
    const uint32_t mag = byte & 0x7fu;
    const unsigned short h =
        static_cast<unsigned short>((mag << 7) | (mag == 0x7fu ? 0x7c00u : 0u) | ((byte & 0x80u) << 8));
    return __half2float(__ushort_as_half(h)) * 256.f;
  } else {
    return nf4[(byte >> (4 * nibble)) & 15u];
  }
}

template <int FMT>
constexpr int codes_per_chunk() {
  return FMT == int(QFormat::kNf4) ? 32 : 16;
}

// 16 payload bytes -> codes_per_chunk() values before scaling.
template <int FMT>
__device__ __forceinline__ void decode_chunk(const uint4& c, const float* nf4, float* x) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const uint32_t byte = (w[i / 4] >> (8 * (i % 4))) & 0xffu;
    if constexpr (FMT == int(QFormat::kNf4)) {
      x[2 * i] = decode<FMT>(byte, 0, nf4);
      x[2 * i + 1] = decode<FMT>(byte, 1, nf4);
    } else {
      x[i] = decode<FMT>(byte, 0, nf4);
    }
  }
}

__device__ __forceinline__ float load_scale_bytes(const uint8_t* p) {  // any alignment
  const uint32_t u = uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
  return __uint_as_float(u);
}

__device__ __forceinline__ void load_nf4_levels(float* sh) {
  if (threadIdx.x < 16) sh[threadIdx.x] = kNf4Device[threadIdx.x];
  __syncthreads();
}

template <typename out_t, int N>
__device__ __forceinline__ void store_values(out_t* dst, const float* v) {
  constexpr int P = 16 / sizeof(out_t);
#pragma unroll
  for (int k = 0; k < N / P; ++k) {
    Pack<out_t, P> o;
#pragma unroll
    for (int j = 0; j < P; ++j) o.v[j] = static_cast<out_t>(v[k * P + j]);
    reinterpret_cast<Pack<out_t, P>*>(dst)[k] = o;
  }
}

// Rows form, vector path: grid (chunk groups, tokens); a chunk is 16 payload bytes of one row.
template <int FMT, typename out_t, typename id_t>
__global__ void rows_vec_kernel(QArgs a, const id_t* __restrict__ ids, out_t* __restrict__ out, int64_t T,
                                unsigned long long* __restrict__ faults) {
  constexpr int N = codes_per_chunk<FMT>();
  __shared__ float nf4[16];
  load_nf4_levels(nf4);
  const int64_t chunks_per_row = a.D / N;
  const int64_t chunks = a.seg_rows * chunks_per_row;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const id_t id = ids[t];
    const bool ok = valid_id(id, a.V);
    if (!ok && faults != nullptr && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(faults, 1ull);
    const uint8_t* seg = a.data + (ok ? int64_t(id) : 0) * a.token_bytes + a.seg_off;
    out_t* dst = out + t * a.out_stride;
    const int64_t step = int64_t(gridDim.x) * blockDim.x * kUnroll;
    for (int64_t base = int64_t(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x; base < chunks; base += step) {
      uint4 c[kUnroll];
      float s[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // every load issued before any decode
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (ok && i < chunks) {
          const int64_t r = i / chunks_per_row, col = (i % chunks_per_row) * N;
          const uint8_t* row = seg + r * a.row_bytes;
          c[u] = *reinterpret_cast<const uint4*>(row + (col / N) * 16);
          s[u] = *reinterpret_cast<const float*>(row + a.scale_offset + 4 * (col / a.block));
        } else {
          c[u] = make_uint4(0, 0, 0, 0);
          s[u] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (i >= chunks) continue;
        float x[N];
        decode_chunk<FMT>(c[u], nf4, x);
#pragma unroll
        for (int j = 0; j < N; ++j) x[j] = s[u] * x[j];  // one rounding, as in dequantize()
        store_values<out_t, N>(dst + (i / chunks_per_row) * a.D + (i % chunks_per_row) * N, x);
      }
    }
  }
}

// Fused form, vector path: block (token, column tile); each thread owns one chunk's N columns and
// sums the E rows, four rows' loads in flight at a time.
template <int FMT, typename out_t, typename id_t>
__global__ void fused_vec_kernel(QArgs a, const id_t* __restrict__ ids, const float* __restrict__ w,
                                 out_t* __restrict__ out, bool accumulate, unsigned long long* __restrict__ faults) {
  constexpr int N = codes_per_chunk<FMT>();
  __shared__ float nf4[16];
  load_nf4_levels(nf4);
  const int64_t t = blockIdx.x;
  const int64_t chunk = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t col = chunk * N;
  if (col >= a.D) return;
  const id_t id = ids[t];
  const bool ok = valid_id(id, a.V);
  if (!ok && faults != nullptr && blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(faults, 1ull);
  float acc[N];
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j] = 0.f;
  if (ok) {
    const int E = static_cast<int>(a.seg_rows);
    const uint8_t* seg = a.data + int64_t(id) * a.token_bytes + a.seg_off;
    const float* wt = w + t * E;
    const int64_t sc = a.scale_offset + 4 * (col / a.block);
    for (int e0 = 0; e0 < E; e0 += kUnroll) {
      uint4 c[kUnroll];
      float ws[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        if (e0 + k < E) {
          const uint8_t* row = seg + int64_t(e0 + k) * a.row_bytes;
          c[k] = *reinterpret_cast<const uint4*>(row + chunk * 16);
          ws[k] = *reinterpret_cast<const float*>(row + sc);
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        if (e0 + k >= E) continue;
        const float wk = wt[e0 + k] * ws[k];
        float x[N];
        decode_chunk<FMT>(c[k], nf4, x);
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j] = fmaf(wk, x[j], acc[j]);
      }
    }
  }
  out_t* dst = out + t * a.D + col;
  if (accumulate) {
    constexpr int P = 16 / sizeof(out_t);
#pragma unroll
    for (int k = 0; k < N / P; ++k) {
      const Pack<out_t, P> o = reinterpret_cast<const Pack<out_t, P>*>(dst)[k];
#pragma unroll
      for (int j = 0; j < P; ++j) acc[k * P + j] += static_cast<float>(o.v[j]);
    }
  }
  store_values<out_t, N>(dst, acc);
}

// Any shape: one element per thread, byte loads.
template <int FMT>
__device__ __forceinline__ float element(const QArgs& a, const uint8_t* row, int64_t j, const float* nf4) {
  const float s = load_scale_bytes(row + a.scale_offset + 4 * (j / a.block));
  if constexpr (FMT == int(QFormat::kNf4)) return s * decode<FMT>(row[j >> 1], int(j & 1), nf4);
  else return s * decode<FMT>(row[j], 0, nf4);
}

template <int FMT, typename out_t, typename id_t>
__global__ void rows_any_kernel(QArgs a, const id_t* __restrict__ ids, out_t* __restrict__ out, int64_t T,
                                unsigned long long* __restrict__ faults) {
  __shared__ float nf4[16];
  load_nf4_levels(nf4);
  const int64_t n = a.seg_rows * a.D;
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    const id_t id = ids[t];
    const bool ok = valid_id(id, a.V);
    if (!ok && faults != nullptr && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(faults, 1ull);
    const uint8_t* seg = a.data + (ok ? int64_t(id) : 0) * a.token_bytes + a.seg_off;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
      const float v = ok ? element<FMT>(a, seg + (i / a.D) * a.row_bytes, i % a.D, nf4) : 0.f;
      out[t * a.out_stride + i] = static_cast<out_t>(v);
    }
  }
}

template <int FMT, typename out_t, typename id_t>
__global__ void fused_any_kernel(QArgs a, const id_t* __restrict__ ids, const float* __restrict__ w,
                                 out_t* __restrict__ out, bool accumulate, unsigned long long* __restrict__ faults) {
  __shared__ float nf4[16];
  load_nf4_levels(nf4);
  const int64_t t = blockIdx.x;
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= a.D) return;
  const id_t id = ids[t];
  const bool ok = valid_id(id, a.V);
  if (!ok && faults != nullptr && blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(faults, 1ull);
  float acc = 0.f;
  if (ok) {
    const uint8_t* seg = a.data + int64_t(id) * a.token_bytes + a.seg_off;
    for (int64_t e = 0; e < a.seg_rows; ++e) {
      const uint8_t* row = seg + e * a.row_bytes;
      const float s = load_scale_bytes(row + a.scale_offset + 4 * (j / a.block));
      const float x = FMT == int(QFormat::kNf4) ? decode<FMT>(row[j >> 1], int(j & 1), nf4) : decode<FMT>(row[j], 0, nf4);
      acc = fmaf(w[t * a.seg_rows + e] * s, x, acc);
    }
  }
  out_t* dst = out + t * a.D + j;
  *dst = static_cast<out_t>(accumulate ? static_cast<float>(*dst) + acc : acc);
}

template <int FMT, typename out_t, typename id_t>
void launch(const QuantPlan& p, const QArgs& a, const id_t* ids, const float* w, out_t* out, bool accumulate,
            unsigned long long* faults, cudaStream_t stream) {
  constexpr int N = codes_per_chunk<FMT>();
  // Vector path: whole 16-byte chunks per row, each inside one scale block, aligned pointers.
  const bool vec = p.q.D % N == 0 && p.q.block % N == 0 && aligned(a.data, 16) && aligned(out, 16) &&
                   (a.out_stride * int64_t(sizeof(out_t))) % 16 == 0;
  if (!p.fused) {
    const int64_t per_row = vec ? p.q.D / N : p.q.D;
    const int64_t per_block = vec ? int64_t(kThreads) * kUnroll : kThreads;
    const int64_t items = p.seg_rows * per_row;
    if (items == 0) return;  // E = 0: nothing to write (a zero-sized grid is a launch error)
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((items + per_block - 1) / per_block, 4096)),
                    static_cast<unsigned>(std::min<int64_t>(p.T, kMaxGridY)));
    if (vec) rows_vec_kernel<FMT, out_t, id_t><<<grid, kThreads, 0, stream>>>(a, ids, out, p.T, faults);
    else rows_any_kernel<FMT, out_t, id_t><<<grid, kThreads, 0, stream>>>(a, ids, out, p.T, faults);
    return;
  }
  const int64_t cols = vec ? p.q.D / N : p.q.D;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (cols + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(p.T), static_cast<unsigned>((cols + threads - 1) / threads));
  if (vec) fused_vec_kernel<FMT, out_t, id_t><<<grid, threads, 0, stream>>>(a, ids, w, out, accumulate, faults);
  else fused_any_kernel<FMT, out_t, id_t><<<grid, threads, 0, stream>>>(a, ids, w, out, accumulate, faults);
}

}  // namespace

void lut_gather_quant_into_cuda(const at::Tensor& out, const at::Tensor& data, c10::string_view format, int64_t dim,
                                int64_t block_size, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                                std::optional<int64_t> layer, bool accumulate,
                                const std::optional<at::Tensor>& faults, std::optional<int64_t> layer_end) {
  const QuantPlan p = plan_lut_gather_quant(data, format, dim, block_size, ids, weights, {layer, layer_end});
  const int64_t out_stride = check_quant_outputs(p, data, ids, weights, out, faults);
  MOLE_CHECK_ARG(ids.is_cuda(), "lut_gather_quant: the CUDA kernel needs ids on a CUDA device");
  MOLE_CHECK_ARG(p.fused || !accumulate, "lut_gather_quant: accumulate=True needs weights (the fused form)");
  MOLE_CHECK_ARG(p.T <= std::numeric_limits<int32_t>::max(), "lut_gather_quant: at most 2^31-1 ids per call, got ",
                 p.T);
  const c10::cuda::CUDAGuard guard(ids.device());
  const auto* table = static_cast<const uint8_t*>(
      cuda::table_device_pointer(data, ids, "lut_gather_quant", "data", "QuantizedLUT.pin_memory()"));
  if (p.T == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor ids_c = ids.contiguous();
  if (!faults.has_value()) cuda::raise_on_bad_id(ids_c, p.V, stream, "lut_gather_quant");
  unsigned long long* fptr =
      faults.has_value() ? reinterpret_cast<unsigned long long*>(faults->data_ptr<int64_t>()) : nullptr;
  const QArgs a{table, p.V, p.L * p.E * p.q.row_bytes, p.seg_row0 * p.q.row_bytes, p.seg_rows,
                p.q.row_bytes, p.q.D, p.q.block, p.q.scale_offset, out_stride};
  const at::Tensor w = p.fused ? kernel_weights(weights) : at::Tensor();
  const float* wp = p.fused ? w.const_data_ptr<float>() : nullptr;
  MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_quant_cuda", [&] {
    using id_t = scalar_t;
    const id_t* idp = ids_c.const_data_ptr<id_t>();
    MOLE_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lut_gather_quant_cuda", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      switch (p.q.fmt) {
        case QFormat::kInt8:
          launch<int(QFormat::kInt8)>(p, a, idp, wp, op, accumulate, fptr, stream);
          break;
        case QFormat::kFp8E4M3:
          launch<int(QFormat::kFp8E4M3)>(p, a, idp, wp, op, accumulate, fptr, stream);
          break;
        case QFormat::kNf4:
          launch<int(QFormat::kNf4)>(p, a, idp, wp, op, accumulate, fptr, stream);
          break;
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mole

TORCH_LIBRARY_IMPL(mole_kernels, CUDA, m) {
  m.impl("lut_gather_quant", &mole::lut_gather_quant_functional<mole::lut_gather_quant_into_cuda>);
  m.impl("lut_gather_quant_out", &mole::lut_gather_quant_into_cuda);
}
