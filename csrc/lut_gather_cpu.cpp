// lut_gather on the CPU: rows are memcpy'd; the fused form accumulates
// E rows per token in float32, a column chunk at a time, across threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "lut_gather.h"

// Inner loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time (ifunc), so one wheel runs everywhere and is fast where it can be.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MOLE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MOLE_HAS_FLOAT16 1
#else
#define MOLE_MULTIVERSION
#define MOLE_HAS_FLOAT16 0
#endif

namespace mole {
namespace {

// Columns per work item: the float32 accumulator (1 KB) stays in L1 while E rows stream through.
constexpr int64_t kChunk = 256;

// acc[j] += w * row[j] for j < n, converting the table's element type to float32.
MOLE_MULTIVERSION void axpy_row(float* __restrict acc, const float* __restrict row, float w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] += w * row[j];
}

MOLE_MULTIVERSION void axpy_row(float* __restrict acc, const at::BFloat16* __restrict row, float w, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(bits[j]) << 16;  // bf16 is the top half of a float32
    float f;
    std::memcpy(&f, &u, sizeof f);
    acc[j] += w * f;
  }
}

MOLE_MULTIVERSION void axpy_row(float* __restrict acc, const at::Half* __restrict row, float w, int64_t n) {
#if MOLE_HAS_FLOAT16
  const _Float16* h = reinterpret_cast<const _Float16*>(row);  // vcvtph2ps where F16C exists
  for (int64_t j = 0; j < n; ++j) acc[j] += w * static_cast<float>(h[j]);
#else
  for (int64_t j = 0; j < n; ++j) acc[j] += w * static_cast<float>(row[j]);
#endif
}

template <typename out_t>
void store_row(out_t* out, const float* acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<out_t>(acc[j]);  // round to nearest even
}

template <typename out_t>
void load_row(float* acc, const out_t* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] = static_cast<float>(out[j]);
}

template <typename lut_t, typename out_t, typename id_t>
void fused_kernel(const GatherPlan& p, const lut_t* lut, const id_t* ids, const float* w, out_t* out,
                  bool accumulate) {
  const int64_t chunks = (p.D + kChunk - 1) / kChunk;
  const int64_t bytes_per_item = p.E * std::min(p.D, kChunk) * static_cast<int64_t>(sizeof(lut_t));
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, bytes_per_item));
  at::parallel_for(0, p.T * chunks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / chunks;
      const int64_t c0 = (item % chunks) * kChunk;
      const int64_t n = std::min(kChunk, p.D - c0);
      out_t* dst = out + t * p.D + c0;
      if (accumulate) {
        load_row(acc, dst, n);
      } else {
        std::fill(acc, acc + n, 0.f);
      }
      const int64_t id = static_cast<int64_t>(ids[t]);
      if (id >= 0 && id < p.V) {  // an id outside the table contributes nothing (counted in faults)
        const lut_t* base = lut + id * p.row_elems + p.seg_offset + c0;
        for (int64_t e = 0; e < p.E; ++e) axpy_row(acc, base + e * p.D, w[t * p.E + e], n);
      }
      store_row(dst, acc, n);
    }
  });
}

template <typename id_t>
void rows_kernel(const GatherPlan& p, const char* lut, size_t elem, const id_t* ids, char* out) {
  const int64_t seg_bytes = p.seg_elems * static_cast<int64_t>(elem);
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, seg_bytes));
  at::parallel_for(0, p.T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t id = static_cast<int64_t>(ids[t]);
      char* dst = out + t * seg_bytes;
      if (id >= 0 && id < p.V) {
        std::memcpy(dst, lut + (id * p.row_elems + p.seg_offset) * static_cast<int64_t>(elem), seg_bytes);
      } else {
        std::memset(dst, 0, seg_bytes);
      }
    }
  });
}

}  // namespace

void check_ids_cpu(const at::Tensor& ids, int64_t V, const std::optional<at::Tensor>& faults) {
  const at::Tensor flat = ids.contiguous().view(-1);
  MOLE_DISPATCH_ID_TYPES(flat.scalar_type(), "lut_gather_check_ids", [&] {
    const scalar_t* p = flat.const_data_ptr<scalar_t>();
    int64_t bad = 0;
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const int64_t id = static_cast<int64_t>(p[i]);
      if (id >= 0 && id < V) continue;
      MOLE_CHECK_ARG(faults.has_value(), "lut_gather: ids contains ", id, " (at flat position ", i,
                     "), outside the table's vocabulary [0, ", V, ")");
      ++bad;
    }
    if (bad > 0) faults->view(-1)[0].add_(bad);
  });
}

void lut_gather_into_cpu(const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                         const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                         bool accumulate, const std::optional<at::Tensor>& faults) {
  const GatherPlan p = plan_lut_gather(lut, ids, weights, layer);
  check_gather_outputs(p, lut, ids, out, faults);
  MOLE_CHECK_ARG(lut.device().is_cpu(), "lut_gather: a CUDA table needs ids on its device");
  if (p.T == 0) return;
  check_ids_cpu(ids, p.V, faults);
  const at::Tensor ids_c = ids.contiguous();  // ids are small; the table is never copied
  if (!p.fused) {
    MOLE_CHECK_ARG(!accumulate, "lut_gather: accumulate=True needs weights (the fused form)");
    MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_rows_cpu", [&] {
      rows_kernel(p, static_cast<const char*>(lut.const_data_ptr()), lut.element_size(),
                  ids_c.const_data_ptr<scalar_t>(), static_cast<char*>(out.data_ptr()));
    });
    return;
  }
  const at::Tensor w = kernel_weights(weights);
  MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_cpu", [&] {
    using id_t = scalar_t;
    MOLE_DISPATCH_FLOATING_TYPES(lut.scalar_type(), "lut_gather_cpu", [&] {
      using lut_t = scalar_t;
      MOLE_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lut_gather_cpu", [&] {
        fused_kernel<lut_t, scalar_t, id_t>(p, lut.const_data_ptr<lut_t>(), ids_c.const_data_ptr<id_t>(),
                                            w.const_data_ptr<float>(), out.data_ptr<scalar_t>(), accumulate);
      });
    });
  });
}

}  // namespace mole

TORCH_LIBRARY_IMPL(mole_kernels, CPU, m) {
  m.impl("lut_gather", &mole::lut_gather_functional<mole::lut_gather_into_cpu>);
  m.impl("lut_gather_out", &mole::lut_gather_into_cpu);
}
