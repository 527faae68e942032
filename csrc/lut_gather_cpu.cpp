// lut_gather on the CPU: rows are memcpy'd; the fused form sums E rows per token
// in float32 registers (AVX-512 or AVX2/F16C when the CPU has them, chosen at run
// time, so one build runs on every x86-64 CPU), across threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "direct_calls.h"
#include "lut_gather.h"
#include "lut_gather_quant.h"
#include "cpu_simd.h"

// SIMD paths use `#pragma GCC target` regions (GCC); other compilers get the scalar path. cpu_simd.h
// includes the intrinsics.
#if MOLE_X86 && !defined(__clang__)
#define MOLE_X86_SIMD 1
#else
#define MOLE_X86_SIMD 0
#endif

namespace mole {
namespace {

// Prefetches `bytes` from `p` into L2 (the next item's row, while this one is summed).
inline void prefetch_l2(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, 2);
}

}  // namespace
}  // namespace mole

#if MOLE_X86_SIMD
// ---- AVX2 + FMA + F16C (every x86-64 CPU since 2013) --------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace mole::avx2 {
using Vec = __m256;
constexpr int64_t kW = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
template <typename T>
inline Vec vload(const T* p) { return mole::load8(p); }
template <typename T>
inline void vstore(T* p, Vec v) { mole::store8(p, v); }
using mole::fused_span_scalar;
using mole::prefetch_l2;
#include "lut_gather_cpu_simd.inc"
}  // namespace mole::avx2
#pragma GCC pop_options

// ---- AVX-512: half the instructions per element of AVX2 (the kernel is instruction-bound
// once rows are in cache) ------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace mole::avx512 {
using Vec = __m512;
constexpr int64_t kW = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
template <typename T>
inline Vec vload(const T* p) { return mole::load16(p); }
template <typename T>
inline void vstore(T* p, Vec v) { mole::store16(p, v); }
using mole::fused_span_scalar;
using mole::prefetch_l2;
#include "lut_gather_cpu_simd.inc"

}  // namespace mole::avx512
#pragma GCC pop_options
#endif

namespace mole {
namespace {

CpuIsa cpu_isa() {
#if MOLE_X86_SIMD
  return cpu_vector_isa();
#else
  return CpuIsa::kScalar;  // the vector code here needs GCC's pragma regions
#endif
}

// out[t, c0:c0+n] = add0 + add1 + sum_e w[t, e] * row_e[c0:c0+n], with the best instruction set available.
template <typename lut_t, typename out_t>
void fused_span(const lut_t* base, const lut_t* next, int64_t D, int64_t E, const float* w, out_t* dst, int64_t n,
                const out_t* add0, const out_t* add1) {
  switch (cpu_isa()) {
#if MOLE_X86_SIMD
    case CpuIsa::kAvx512:
      return avx512::fused_span(base, next, D, E, w, dst, n, add0, add1);
    case CpuIsa::kAvx2:
      return avx2::fused_span(base, next, D, E, w, dst, n, add0, add1);
#endif
    default:
      return fused_span_scalar(base, D, E, w, dst, n, add0, add1);
  }
}

// How many work items ahead rows are prefetched.
constexpr int64_t kPrefetchItems = 2;

// Columns per work item when a batch is too small to keep every thread busy with whole tokens.
constexpr int64_t kSplitColumns = 256;

template <typename lut_t, typename out_t, typename id_t>
void fused_kernel(const GatherPlan& p, const lut_t* lut, const id_t* ids, const float* w, out_t* out,
                  const out_t* add0, const out_t* add1) {
  // Whole tokens per item for large batches; column tiles for decode-sized ones.
  const int64_t span = p.T >= 4 * at::get_num_threads() ? p.D : std::min(p.D, kSplitColumns);
  const int64_t spans = (p.D + span - 1) / span;
  const int64_t item_bytes = p.E * span * static_cast<int64_t>(sizeof(lut_t));
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, item_bytes));
  at::parallel_for(0, p.T * spans, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / spans;
      const int64_t c0 = (item % spans) * span;
      const int64_t n = std::min(span, p.D - c0);
      const int64_t at = t * p.D + c0;
      const out_t* a0 = add0 ? add0 + at : nullptr;
      const out_t* a1 = add1 ? add1 + at : nullptr;
      const int64_t id = static_cast<int64_t>(ids[t]);
      if (id < 0 || id >= p.V) {  // an id outside the table adds nothing (counted in faults)
        fused_span(lut, static_cast<const lut_t*>(nullptr), p.D, int64_t(0), w, out + at, n, a0, a1);
        continue;
      }
      const lut_t* next = nullptr;  // the next item's rows, prefetched while this one is summed
      if (item + kPrefetchItems < end) {
        const int64_t ahead = item + kPrefetchItems;
        const int64_t next_id = static_cast<int64_t>(ids[ahead / spans]);
        if (next_id >= 0 && next_id < p.V) next = lut + next_id * p.row_elems + p.seg_offset + (ahead % spans) * span;
      }
      fused_span(lut + id * p.row_elems + p.seg_offset + c0, next, p.D, p.E, w + t * p.E, out + at, n, a0, a1);
    }
  });
}

// Each token's segment copied to out + t * out_stride (bytes); an id outside the table gives zeros.
template <typename id_t>
void rows_kernel(const GatherPlan& p, const char* lut, size_t elem, const id_t* ids, char* out, int64_t out_stride) {
  const int64_t seg_bytes = p.seg_elems * static_cast<int64_t>(elem);
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, seg_bytes));
  at::parallel_for(0, p.T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t id = static_cast<int64_t>(ids[t]);
      char* dst = out + t * out_stride;
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
  const at::Tensor flat = ids.contiguous();  // no copy (nor dispatch) when already contiguous: the usual case
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

void fused_gather_cpu(const GatherPlan& p, const at::Tensor& lut, const at::Tensor& ids, const float* w,
                      const at::Tensor& out, const at::Tensor& add0, const at::Tensor& add1) {
  if (p.T == 0 || p.D == 0) return;  // nothing to write (and no columns to split into spans)
  const at::Tensor ids_c = ids.contiguous();  // ids are small; the table is never copied
  MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_cpu", [&] {
    using id_t = scalar_t;
    MOLE_DISPATCH_FLOATING_TYPES(lut.scalar_type(), "lut_gather_cpu", [&] {
      using lut_t = scalar_t;
      MOLE_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lut_gather_cpu", [&] {
        auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
        fused_kernel<lut_t, scalar_t, id_t>(p, lut.const_data_ptr<lut_t>(), ids_c.const_data_ptr<id_t>(), w,
                                            out.data_ptr<scalar_t>(), ptr(add0), ptr(add1));
      });
    });
  });
}

void lut_gather_into_cpu(const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                         const std::optional<at::Tensor>& weights, std::optional<int64_t> layer,
                         bool accumulate, const std::optional<at::Tensor>& faults,
                         std::optional<int64_t> layer_end) {
  const GatherPlan p = plan_lut_gather(lut, ids, weights, {layer, layer_end});
  const int64_t out_stride = check_gather_outputs(p, lut, ids, weights, out, faults);
  MOLE_CHECK_ARG(lut.device().is_cpu(), "lut_gather: a CUDA table needs ids on its device");
  if (p.T == 0) return;
  check_ids_cpu(ids, p.V, faults);
  if (nothing_to_read(p, out, accumulate)) return;
  if (!p.fused) {
    MOLE_CHECK_ARG(!accumulate, "lut_gather: accumulate=True needs weights (the fused form)");
    const at::Tensor ids_c = ids.contiguous();
    MOLE_DISPATCH_ID_TYPES(ids_c.scalar_type(), "lut_gather_rows_cpu", [&] {
      rows_kernel(p, static_cast<const char*>(lut.const_data_ptr()), lut.element_size(),
                  ids_c.const_data_ptr<scalar_t>(), static_cast<char*>(out.data_ptr()),
                  out_stride * static_cast<int64_t>(lut.element_size()));
    });
    return;
  }
  const at::Tensor w = kernel_weights(weights);
  fused_gather_cpu(p, lut, ids, w.const_data_ptr<float>(), out, accumulate ? out : at::Tensor(), at::Tensor());
}

at::Tensor lut_gather_cpu(const at::Tensor& lut, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                          std::optional<int64_t> layer, std::optional<int64_t> layer_end) {
  return lut_gather_functional<lut_gather_into_cpu>(lut, ids, weights, layer, layer_end);
}

}  // namespace mole

// Which instruction set the CPU kernels run (after the MOLE_KERNELS_CPU_ISA cap), so that tests and
// `mole-kernels info` can see the switch: "avx512", "avx2" or "scalar". The float gather's vector code
// needs GCC (pragma regions); the quantized kernels' does not (target attributes), so they may differ.
TORCH_LIBRARY_FRAGMENT(mole_kernels, m) {
  m.def("cpu_isa(str kernel) -> str", [](c10::string_view kernel) -> std::string {
    if (kernel == "lut_gather_quant") return mole::quant_cpu_isa();
    MOLE_CHECK_ARG(kernel == "lut_gather", "cpu_isa: kernel must be 'lut_gather' or 'lut_gather_quant', got '",
                   std::string(kernel), "'");
    return mole::isa_name(mole::cpu_isa());
  });
}

TORCH_LIBRARY_IMPL(mole_kernels, CPU, m) {
  m.impl("lut_gather", &mole::lut_gather_cpu);
  m.impl("lut_gather_out", &mole::lut_gather_into_cpu);
}
