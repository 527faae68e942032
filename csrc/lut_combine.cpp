// lut_combine: one MoLE layer's lookup branch in one call, reading rows straight from the table.
//
//   out[t] = residual[t] + shared[t] + sum_e softmax(logits[t])_e * lut[ids[t], layer, e, :]
//
// It replaces softmax -> gather -> weighted sum -> two adds (five ops, three of them over [T, D])
// with one pass that reads each table byte once. The softmax is float32 and max-subtracted; a
// token whose logits are all -inf (or hold +inf/NaN) gets NaN weights, so its output row is NaN,
// as mole_combine and torch.softmax give. This file holds the schemas, the checks and the CPU
// implementation (the fused gathers of lut_gather_cpu.cpp / lut_gather_quant_cpu.cpp with the
// residual and shared terms as addends). On CUDA the ops are implemented in Python
// (mole_kernels/combine.py: a Triton kernel for float tables).
#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "direct_calls.h"
#include "lut_gather.h"
#include "lut_gather_quant.h"

namespace mole {
namespace {

// softmax over one token's E logits, float32, max-subtracted (`w` may be `x` itself).
inline void softmax_row(const float* x, float* w, int64_t E) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) m = std::max(m, x[e]);
  // All -inf: exp(-inf - -inf) = NaN; +inf: exp(inf - inf) = NaN; a NaN logit: a NaN sum.
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += (w[e] = std::exp(x[e] - m));
  const float inv = 1.f / sum;
  for (int64_t e = 0; e < E; ++e) w[e] *= inv;
}

}  // namespace

std::vector<float> softmax_weights(const at::Tensor& logits, int64_t T, int64_t E) {
  const at::Tensor x = as_contiguous(logits, at::kFloat);  // [*, E] row-major: T rows of E
  const float* src = x.const_data_ptr<float>();
  std::vector<float> w(static_cast<size_t>(T * E));
  for (int64_t t = 0; t < T; ++t) softmax_row(src + t * E, w.data() + t * E, E);
  return w;
}

namespace {

// Four float32 lanes (GCC/Clang vector extensions: SSE on the baseline x86-64 build, NEON on arm64).
typedef float F32x4 __attribute__((vector_size(16)));

template <typename scalar_t>
inline F32x4 load_f32x4(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    F32x4 v;
    std::memcpy(&v, p, sizeof v);  // an unaligned load
    return v;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // the upper half of a float32: a shift
    typedef uint16_t U16x4 __attribute__((vector_size(8)));
    typedef uint32_t U32x4 __attribute__((vector_size(16)));
    U16x4 b;
    std::memcpy(&b, p, sizeof b);
    const U32x4 u = __builtin_convertvector(b, U32x4) << 16;
    F32x4 v;
    std::memcpy(&v, &u, sizeof v);
    return v;
  } else {
    return F32x4{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
                 static_cast<float>(p[3])};
  }
}

template <typename out_t>
inline void store_f32x4(out_t* p, const F32x4& v) {
  if constexpr (std::is_same_v<out_t, float>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    for (int j = 0; j < 4; ++j) p[j] = static_cast<out_t>(v[j]);  // round to nearest even
  }
}

// The lean path's row sum, dst[j] = add0[j] + add1[j] + sum_e w[e] * base[e * D + j] for j < D, columns held
// in registers over the E rows: AVX-512 or AVX2 multiply-adds where the CPU has them (32 columns a step; the
// CPU's choice of cpu_simd.h), else four-lane vectors (GCC/Clang vector extensions: SSE on baseline x86-64, NEON
// on arm64) in fused_span_scalar's order. Columns short of a whole vector take fused_span_scalar.
// Why vectors at all: the scalar span's float32 tile on the stack cost a load and a store per expert and
// column, and a copy out; why the wide ones: at the demo's B = 32 the four-lane sum and router were ~3 of a
// hot layer call's 4.5 us.
template <typename lut_t, typename out_t>
inline void step_row_sum_f32x4(const lut_t* base, int64_t D, int64_t E, const float* w, out_t* dst,
                               const out_t* add0, const out_t* add1) {
  int64_t j = 0;
  constexpr bool kInRegisters = std::is_same_v<out_t, float> && !std::is_same_v<lut_t, c10::Half>;
  for (; kInRegisters && j + 16 <= D; j += 16) {
    F32x4 acc[4];
    for (int k = 0; k < 4; ++k) acc[k] = load_f32x4(add0 + j + 4 * k) + load_f32x4(add1 + j + 4 * k);
    for (int64_t e = 0; e < E; ++e) {
      const lut_t* row = base + e * D + j;
      for (int k = 0; k < 4; ++k) acc[k] += w[e] * load_f32x4(row + 4 * k);
    }
    for (int k = 0; k < 4; ++k) store_f32x4(dst + j + 4 * k, acc[k]);
  }
  if (j < D) fused_span_scalar(base + j, D, E, w, dst + j, D - j, add0 + j, add1 + j);
}

// One router logit without wide vectors (router_rows below): x . w over D in float32, rounded to the inputs'
// dtype. Sixteen independent partial sums, held as four vectors: written as a scalar array of lanes, the
// compiler kept the lanes in memory and ran one multiply-add per nanosecond (a store-to-load chain),
// ~0.4 us per token of a decode step's layer call at the demo shape (E = 4, D = 128): 3 us per layer
// at B = 8, 13 us at B = 32, more than the row sum itself.
template <typename scalar_t>
inline scalar_t router_dot_f32x4(const scalar_t* x, const scalar_t* w, int64_t D) {
  F32x4 l0 = {}, l1 = {}, l2 = {}, l3 = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    l0 += load_f32x4(x + d) * load_f32x4(w + d);
    l1 += load_f32x4(x + d + 4) * load_f32x4(w + d + 4);
    l2 += load_f32x4(x + d + 8) * load_f32x4(w + d + 8);
    l3 += load_f32x4(x + d + 12) * load_f32x4(w + d + 12);
  }
  float acc = 0.f;
  for (; d < D; ++d) acc += static_cast<float>(x[d]) * static_cast<float>(w[d]);
  const F32x4 l = (l0 + l1) + (l2 + l3);  // a tree: a chain of 16 dependent adds cost as much as the products
  return static_cast<scalar_t>(acc + ((l[0] + l[1]) + (l[2] + l[3])));
}

#if MOLE_X86
template <typename lut_t, typename out_t>
MOLE_AVX512 void step_row_sum_avx512(const lut_t* base, int64_t D, int64_t E, const float* w, out_t* dst,
                                     const out_t* add0, const out_t* add1) {
  int64_t j = 0;
  for (; j + 32 <= D; j += 32) {
    __m512 a0 = _mm512_add_ps(load16(add0 + j), load16(add1 + j));
    __m512 a1 = _mm512_add_ps(load16(add0 + j + 16), load16(add1 + j + 16));
    for (int64_t e = 0; e < E; ++e) {
      const __m512 we = _mm512_set1_ps(w[e]);
      a0 = _mm512_fmadd_ps(we, load16(base + e * D + j), a0);
      a1 = _mm512_fmadd_ps(we, load16(base + e * D + j + 16), a1);
    }
    store16(dst + j, a0);
    store16(dst + j + 16, a1);
  }
  for (; j + 16 <= D; j += 16) {
    __m512 a = _mm512_add_ps(load16(add0 + j), load16(add1 + j));
    for (int64_t e = 0; e < E; ++e) a = _mm512_fmadd_ps(_mm512_set1_ps(w[e]), load16(base + e * D + j), a);
    store16(dst + j, a);
  }
  if (j < D) fused_span_scalar(base + j, D, E, w, dst + j, D - j, add0 + j, add1 + j);
}

template <typename lut_t, typename out_t>
MOLE_AVX2 void step_row_sum_avx2(const lut_t* base, int64_t D, int64_t E, const float* w, out_t* dst,
                                 const out_t* add0, const out_t* add1) {
  int64_t j = 0;
  for (; j + 32 <= D; j += 32) {
    __m256 a[4];
    for (int k = 0; k < 4; ++k) a[k] = _mm256_add_ps(load8(add0 + j + 8 * k), load8(add1 + j + 8 * k));
    for (int64_t e = 0; e < E; ++e) {
      const __m256 we = _mm256_set1_ps(w[e]);
      for (int k = 0; k < 4; ++k) a[k] = _mm256_fmadd_ps(we, load8(base + e * D + j + 8 * k), a[k]);
    }
    for (int k = 0; k < 4; ++k) store8(dst + j + 8 * k, a[k]);
  }
  for (; j + 8 <= D; j += 8) {
    __m256 a = _mm256_add_ps(load8(add0 + j), load8(add1 + j));
    for (int64_t e = 0; e < E; ++e) a = _mm256_fmadd_ps(_mm256_set1_ps(w[e]), load8(base + e * D + j), a);
    store8(dst + j, a);
  }
  if (j < D) fused_span_scalar(base + j, D, E, w, dst + j, D - j, add0 + j, add1 + j);
}

// router_rows (below) for four experts of one token at a time: x's vector loaded once for the four.
// Experts past E repeat the last one's row (their sums are dropped).
template <typename scalar_t>
MOLE_AVX512 void router_rows_avx512(const scalar_t* x, const scalar_t* w, int64_t T, int64_t E, int64_t K,
                                    float* out) {
  for (int64_t t = 0; t < T; ++t, x += K) {
    for (int64_t e0 = 0; e0 < E; e0 += 4) {
      const scalar_t* r[4];
      for (int i = 0; i < 4; ++i) r[i] = w + std::min(e0 + i, E - 1) * K;
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t d = 0;
      for (; d + 16 <= K; d += 16) {
        const __m512 xv = load16(x + d);
        for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(xv, load16(r[i] + d), a[i]);
      }
      for (int i = 0; i < 4 && e0 + i < E; ++i) {
        float tail = 0.f;
        for (int64_t j = d; j < K; ++j) tail += static_cast<float>(x[j]) * static_cast<float>(r[i][j]);
        out[t * E + e0 + i] = static_cast<float>(static_cast<scalar_t>(tail + _mm512_reduce_add_ps(a[i])));
      }
    }
  }
}

template <typename scalar_t>
MOLE_AVX2 void router_rows_avx2(const scalar_t* x, const scalar_t* w, int64_t T, int64_t E, int64_t K, float* out) {
  for (int64_t t = 0; t < T; ++t, x += K) {
    for (int64_t e0 = 0; e0 < E; e0 += 4) {
      const scalar_t* r[4];
      for (int i = 0; i < 4; ++i) r[i] = w + std::min(e0 + i, E - 1) * K;
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t d = 0;
      for (; d + 8 <= K; d += 8) {
        const __m256 xv = load8(x + d);
        for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(xv, load8(r[i] + d), a[i]);
      }
      for (int i = 0; i < 4 && e0 + i < E; ++i) {
        float tail = 0.f;
        for (int64_t j = d; j < K; ++j) tail += static_cast<float>(x[j]) * static_cast<float>(r[i][j]);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a[i]), _mm256_extractf128_ps(a[i], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[t * E + e0 + i] = static_cast<float>(static_cast<scalar_t>(tail + _mm_cvtss_f32(h)));
      }
    }
  }
}
#endif

template <typename lut_t, typename out_t>
inline void step_row_sum(const lut_t* base, int64_t D, int64_t E, const float* w, out_t* dst, const out_t* add0,
                         const out_t* add1) {
#if MOLE_X86
  const CpuIsa isa = cpu_vector_isa();
  if (isa == CpuIsa::kAvx512) return step_row_sum_avx512(base, D, E, w, dst, add0, add1);
  if (isa == CpuIsa::kAvx2) return step_row_sum_avx2(base, D, E, w, dst, add0, add1);
#endif
  step_row_sum_f32x4(base, D, E, w, dst, add0, add1);
}

// The router logits of T tokens, out[t * E + e] = x[t] . w[e] over K, each accumulated in float32 and rounded to
// the inputs' dtype (as linear's result is), stored as float32. router_logits and the decode step share it, so
// their logits are equal.
template <typename scalar_t>
void router_rows(const scalar_t* x, const scalar_t* w, int64_t T, int64_t E, int64_t K, float* out) {
#if MOLE_X86
  const CpuIsa isa = cpu_vector_isa();
  if (isa == CpuIsa::kAvx512) return router_rows_avx512(x, w, T, E, K, out);
  if (isa == CpuIsa::kAvx2) return router_rows_avx2(x, w, T, E, K, out);
#endif
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) out[t * E + e] = static_cast<float>(router_dot_f32x4(x + t * K, w + e * K, K));
  }
}

// The result dtype when no `out` is given: residual's, else shared's, else `fallback`.
at::ScalarType result_dtype(const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared,
                            at::ScalarType fallback) {
  // A non-float addend is refused by the checks, naming it: do not let it pick the result dtype.
  for (const auto* t : {&residual, &shared}) {
    if (t->has_value() && is_float_dtype((*t)->scalar_type())) return (*t)->scalar_type();
  }
  return fallback;
}

// Checks out/residual/shared against the plan ([*, D], float, on ids' device) and returns the
// addends the kernels read: out's dtype, contiguous (a no-op in the usual case).
std::pair<at::Tensor, at::Tensor> addends(const GatherPlan& p, const at::Tensor& lut, const at::Tensor& ids,
                                          const at::Tensor& logits, const at::Tensor& out,
                                          const std::optional<at::Tensor>& residual,
                                          const std::optional<at::Tensor>& shared, const char* op) {
  const at::IntArrayRef want(p.out_shape);
  auto check = [&](const at::Tensor& t, const char* name) {
    MOLE_CHECK_ARG(t.sizes() == want, op, ": ", name, " must have shape ids.shape + [D] = ", want, ", got ",
                   t.sizes());
    MOLE_CHECK_ARG(t.device() == ids.device(), op, ": ", name, " must be on ids' device (", ids.device(), "), got ",
                   t.device());
    MOLE_CHECK_ARG(is_float_dtype(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                   t.scalar_type());
  };
  if (residual.has_value()) check(*residual, "residual");
  if (shared.has_value()) check(*shared, "shared");
  check(out, "out");
  MOLE_CHECK_ARG(out.is_contiguous(), op, ": out must be contiguous");
  at::assert_no_internal_overlap(out);
  for (const at::Tensor* in : {&lut, &ids, &logits}) at::assert_no_overlap(out, *in);
  // `out` may be the residual itself (an in-place update of the residual stream), never a part of it.
  if (residual.has_value()) at::assert_no_partial_overlap(out, *residual);
  if (shared.has_value()) at::assert_no_overlap(out, *shared);
  auto term = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? as_contiguous(*t, out.scalar_type()) : at::Tensor();
  };
  return {term(residual), term(shared)};
}

// What both table formats share around their fused CPU gather `fused(w, residual, shared)`: checks,
// the id check (or fault count), the float32 softmax weights. `shape` carries the result shape.
template <typename Fused>
void combine_cpu(const GatherPlan& shape, int64_t V, int64_t E, const at::Tensor& out, const at::Tensor& table,
                 const at::Tensor& ids, const at::Tensor& logits, const std::optional<at::Tensor>& residual,
                 const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& faults, const char* op,
                 Fused fused) {
  const auto [res, sh] = addends(shape, table, ids, logits, out, residual, shared, op);
  check_faults(faults, ids, op);
  MOLE_CHECK_ARG(table.device().is_cpu(), op, ": a CUDA table needs ids on its device");
  const int64_t T = ids.numel();
  if (T == 0) return;
  check_ids_cpu(ids, V, faults);
  const std::vector<float> w = softmax_weights(logits, T, E);
  fused(w.data(), res, sh);
}

void combine_cpu(const GatherPlan& p, const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                 const at::Tensor& logits, const std::optional<at::Tensor>& residual,
                 const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& faults) {
  combine_cpu(p, p.V, p.E, out, lut, ids, logits, residual, shared, faults, "lut_combine",
              [&](const float* w, const at::Tensor& res, const at::Tensor& sh) {
                fused_gather_cpu(p, lut, ids, w, out, res, sh);
              });
}

GatherPlan combine_plan(const at::Tensor& lut, const at::Tensor& ids, const at::Tensor& logits,
                        std::optional<int64_t> layer) {
  return plan_lut_gather(lut, ids, logits, {layer, std::nullopt}, "lut_combine", "logits");
}

// Below this many multiply-adds a GEMM library's fixed cost (~15 us inside a decode loop, where its
// code is cold) dwarfs the router matmul itself: E x D per token, 512 at the demo's shape.
constexpr int64_t kHandLoop = 1 << 16;

// A decode step's T x E softmax weights (and its T ids) live on the stack up to this many.
constexpr int64_t kStepWeights = 256;

// Tokens whose rows are prefetched ahead of the one being summed (and before the router, for the first).
constexpr int64_t kPrefetchTokens = 4;

// What a decode step's lean path knows before its sum: each token's id (int64) and its softmax weights.
struct StepWeights {
  int64_t T = 0;
  int64_t row[kStepWeights];
  float w[kStepWeights];
};

// A decode step's layer, the usual case only: a contiguous [V, L, E, x] CPU table (x: D floats, or a
// quantized row's bytes) and a layer, at most a few contiguous ids all in [0, V), contiguous residual /
// shared of ids.shape + [D], a router weight [E, K] and its input x of ids.shape + [K]. Fills `s` with
// what router_logits + the ops' softmax compute (the same logits and weights) and returns true, with a
// few comparisons for checks and no allocation; false for any other call, which the general path then
// runs or refuses, naming what is wrong. Why a lean path at all: between two layers a decode step
// streams megabytes of weights through the caches, so every call finds its code and data evicted and
// pays for each cache line it touches; the general path's checks, dispatched allocations and
// temporaries, and the general fused kernels' dispatch layers, thread-pool entry and SIMD variants,
// cost more that way than the layer's whole lookup.
bool step_weights(const at::Tensor& table, int64_t D, const at::Tensor& ids, std::optional<int64_t> layer,
                  const at::Tensor& x, const at::Tensor& router_weight, const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& shared, StepWeights& s, int64_t seg_bytes) {
  if (table.layout() != at::kStrided || !table.device().is_cpu() || table.dim() != 4 || !table.is_contiguous() ||
      !layer.has_value() || *layer < 0 || *layer >= table.size(1) || ids.layout() != at::kStrided ||
      !ids.device().is_cpu() || !ids.is_contiguous() || (ids.scalar_type() != at::kLong && ids.scalar_type() != at::kInt) ||
      !residual.has_value() || !shared.has_value()) {
    return false;
  }
  const int64_t V = table.size(0), E = table.size(2), T = ids.numel();
  const at::ScalarType dtype = residual->scalar_type();
  const int64_t K = router_weight.dim() == 2 ? router_weight.size(1) : -1;  // the router's input size
  if (T == 0 || E == 0 || D == 0 || T * E > kStepWeights || T * E * K > kHandLoop || !is_float_dtype(dtype) ||
      router_weight.layout() != at::kStrided || !router_weight.device().is_cpu() || K < 1 ||
      router_weight.size(0) != E || !router_weight.is_contiguous() ||
      !is_step_operand(x, ids, K, router_weight.scalar_type()) || !is_float_dtype(x.scalar_type()) ||
      !is_step_operand(*residual, ids, D, dtype) || !is_step_operand(*shared, ids, D, dtype)) {
    return false;
  }
  bool in_range = true;
  MOLE_DISPATCH_ID_TYPES(ids.scalar_type(), "lut_combine", [&] {
    const scalar_t* id = ids.const_data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      s.row[t] = static_cast<int64_t>(id[t]);
      in_range &= s.row[t] >= 0 && s.row[t] < V;
    }
  });
  if (!in_range) return false;  // the general path raises, naming the id
  {
    // Why: between two layers a step streams megabytes of weights, so every row is a cache miss; the
    // first tokens' rows load while the router runs, later ones while earlier tokens are summed.
    const char* base = static_cast<const char*>(table.const_data_ptr()) +
                       *layer * (table.nbytes() / (V * table.size(1)));
    const int64_t token_bytes = table.nbytes() / V;
    for (int64_t t = 0; t < std::min(T, kPrefetchTokens); ++t) prefetch_span(base + s.row[t] * token_bytes, seg_bytes);
  }
  if (!router_softmax_into(x, router_weight, T, s.w)) return false;  // its checks are those above: it runs
  s.T = T;
  return true;
}

// The lean path of a float table (see step_weights): the sum by step_row_sum, equal to the op's up to
// float32 rounding. An undefined tensor when the call is not the usual case.
at::Tensor combine_step_cpu(const at::Tensor& lut, const at::Tensor& ids, std::optional<int64_t> layer,
                            const at::Tensor& x, const at::Tensor& router_weight,
                            const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared) {
  StepWeights s;
  if (!is_float_dtype(lut.scalar_type()) || lut.dim() != 4 ||
      !step_weights(lut, lut.size(3), ids, layer, x, router_weight, residual, shared, s,
                    lut.size(2) * lut.size(3) * lut.element_size())) {
    return at::Tensor();
  }
  const int64_t L = lut.size(1), E = lut.size(2), D = lut.size(3);
  const at::ScalarType dtype = residual->scalar_type();
  at::Tensor out = at::detail::empty_cpu(residual->sizes(), dtype);  // the op's own allocator, undispatched
  const int64_t token = L * E * D, first = *layer * E * D;
  MOLE_DISPATCH_FLOATING_TYPES(lut.scalar_type(), "lut_combine", [&] {
    using lut_t = scalar_t;
    const lut_t* table = lut.const_data_ptr<lut_t>();
    MOLE_DISPATCH_FLOATING_TYPES(dtype, "lut_combine", [&] {
      const scalar_t* res = residual->const_data_ptr<scalar_t>();
      const scalar_t* sh = shared->const_data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      for (int64_t t = 0; t < s.T; ++t) {
        if (t + kPrefetchTokens < s.T) {
          prefetch_span(reinterpret_cast<const char*>(table + s.row[t + kPrefetchTokens] * token + first),
                        E * D * static_cast<int64_t>(sizeof(lut_t)));
        }
        step_row_sum(table + s.row[t] * token + first, D, E, s.w + t * E, o + t * D, res + t * D, sh + t * D);
      }
    });
  });
  return out;
}

// The lean path of a quantized table (uint8 [V, L, E, row_bytes]; see step_weights): the sum by the
// format's own summing routine, the one the op's fused gather runs (fused_step_quant_cpu), so the
// results equal the op's. An undefined tensor when the call is not the usual case.
at::Tensor combine_quant_step_cpu(const at::Tensor& data, const QuantLayout& q, const at::Tensor& ids,
                                  std::optional<int64_t> layer, const at::Tensor& x, const at::Tensor& router_weight,
                                  const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& shared) {
  StepWeights s;
  if (data.scalar_type() != at::kByte || data.dim() != 4 || data.size(3) != q.row_bytes ||
      !step_weights(data, q.D, ids, layer, x, router_weight, residual, shared, s, data.size(2) * q.row_bytes)) {
    return at::Tensor();
  }
  const int64_t L = data.size(1), E = data.size(2);
  const uint8_t* base = data.const_data_ptr<uint8_t>() + *layer * E * q.row_bytes;
  const uint8_t* seg[kStepWeights];
  for (int64_t t = 0; t < s.T; ++t) seg[t] = base + s.row[t] * L * E * q.row_bytes;
  at::Tensor out = at::detail::empty_cpu(residual->sizes(), residual->scalar_type());  // undispatched
  fused_step_quant_cpu(q, seg, s.T, E, s.w, out, *residual, *shared);
  return out;
}

}  // namespace

at::Tensor router_logits(const at::Tensor& x, const at::Tensor& weight) {
  MOLE_CHECK_ARG(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "router: weight must be [E, D] "
                 "with D = x's last size (", x.size(-1), "), got ", weight.sizes());
  const int64_t E = weight.size(0), D = weight.size(1), T = D ? x.numel() / D : 0;
  if (D == 0 || T * E * D > kHandLoop || !x.device().is_cpu() || x.scalar_type() != weight.scalar_type() ||
      !is_float_dtype(x.scalar_type())) {
    return at::linear(x, weight);
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = E;
  at::Tensor out = at::empty(shape, x.options());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  MOLE_DISPATCH_FLOATING_TYPES(x.scalar_type(), "router_logits", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    std::vector<float> logits(static_cast<size_t>(T * E));
    router_rows(xp, wp, T, E, D, logits.data());
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < T * E; ++i) op[i] = static_cast<scalar_t>(logits[i]);  // exact: already rounded
  });
  return out;
}

bool router_softmax_into(const at::Tensor& x, const at::Tensor& weight, int64_t T, float* w) {
  if (weight.layout() != at::kStrided || !weight.device().is_cpu() || weight.dim() != 2 || !weight.is_contiguous() ||
      x.layout() != at::kStrided || !x.device().is_cpu() || !x.is_contiguous() || x.dim() < 1 ||
      x.scalar_type() != weight.scalar_type() || !is_float_dtype(x.scalar_type())) {
    return false;
  }
  const int64_t E = weight.size(0), K = weight.size(1);
  if (K < 1 || x.size(-1) != K || x.numel() != T * K || T * E * K > kHandLoop) return false;
  MOLE_DISPATCH_FLOATING_TYPES(x.scalar_type(), "router_logits", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    router_rows(xp, wp, T, E, K, w);
  });
  for (int64_t t = 0; t < T; ++t) softmax_row(w + t * E, w + t * E, E);
  return true;
}

void lut_combine_into_cpu(const at::Tensor& out, const at::Tensor& lut, const at::Tensor& ids,
                          const at::Tensor& logits, std::optional<int64_t> layer,
                          const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared,
                          const std::optional<at::Tensor>& faults) {
  combine_cpu(combine_plan(lut, ids, logits, layer), out, lut, ids, logits, residual, shared, faults);
}

at::Tensor lut_combine_cpu(const at::Tensor& lut, const at::Tensor& ids, const at::Tensor& logits,
                           std::optional<int64_t> layer, const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& shared) {
  const GatherPlan p = combine_plan(lut, ids, logits, layer);
  at::Tensor out = at::empty(p.out_shape, ids.options().dtype(result_dtype(residual, shared, lut.scalar_type())));
  combine_cpu(p, out, lut, ids, logits, residual, shared, std::nullopt);
  return out;
}

at::Tensor lut_combine_step_cpu(const at::Tensor& lut, const at::Tensor& ids, std::optional<int64_t> layer,
                                const at::Tensor& x, const std::optional<at::Tensor>& router_weight,
                                const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared) {
  if (!router_weight.has_value()) return lut_combine_cpu(lut, ids, x, layer, residual, shared);
  at::Tensor out = combine_step_cpu(lut, ids, layer, x, *router_weight, residual, shared);
  return out.defined() ? out : lut_combine_cpu(lut, ids, router_logits(x, *router_weight), layer, residual, shared);
}

at::Tensor lut_combine_quant_step_cpu(const at::Tensor& data, c10::string_view format, int64_t dim,
                                      int64_t block_size, const at::Tensor& ids, std::optional<int64_t> layer,
                                      const at::Tensor& x, const std::optional<at::Tensor>& router_weight,
                                      const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& shared) {
  if (!router_weight.has_value()) {
    return lut_combine_quant_cpu(data, format, dim, block_size, ids, x, layer, residual, shared, std::nullopt);
  }
  at::Tensor out = combine_quant_step_cpu(data, make_quant_layout(format, dim, block_size), ids, layer, x,
                                          *router_weight, residual, shared);
  return out.defined() ? out
                       : lut_combine_quant_cpu(data, format, dim, block_size, ids, router_logits(x, *router_weight),
                                               layer, residual, shared, std::nullopt);
}

namespace {

void combine_quant_cpu(const QuantPlan& p, const at::Tensor& out, const at::Tensor& data, const at::Tensor& ids,
                       const at::Tensor& logits, const std::optional<at::Tensor>& residual,
                       const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& faults) {
  GatherPlan shape;
  shape.out_shape = p.out_shape;
  combine_cpu(shape, p.V, p.E, out, data, ids, logits, residual, shared, faults, "lut_combine_quant",
              [&](const float* w, const at::Tensor& res, const at::Tensor& sh) {
                fused_gather_quant_cpu(p, data, ids, w, out, res, sh);
              });
}

QuantPlan combine_quant_plan(const at::Tensor& data, c10::string_view format, int64_t dim, int64_t block_size,
                             const at::Tensor& ids, const at::Tensor& logits, std::optional<int64_t> layer) {
  return plan_lut_gather_quant(data, format, dim, block_size, ids, logits, {layer, std::nullopt},
                               "lut_combine_quant", "logits");
}

}  // namespace

void lut_combine_quant_into_cpu(const at::Tensor& out, const at::Tensor& data, c10::string_view format, int64_t dim,
                                int64_t block_size, const at::Tensor& ids, const at::Tensor& logits,
                                std::optional<int64_t> layer, const std::optional<at::Tensor>& residual,
                                const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& faults) {
  combine_quant_cpu(combine_quant_plan(data, format, dim, block_size, ids, logits, layer), out, data, ids, logits,
                    residual, shared, faults);
}

at::Tensor lut_combine_quant_cpu(const at::Tensor& data, c10::string_view format, int64_t dim, int64_t block_size,
                                 const at::Tensor& ids, const at::Tensor& logits, std::optional<int64_t> layer,
                                 const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared,
                                 std::optional<at::ScalarType> dtype) {
  const QuantPlan p = combine_quant_plan(data, format, dim, block_size, ids, logits, layer);
  const at::ScalarType out_dtype = result_dtype(residual, shared, dtype.value_or(at::kFloat));
  MOLE_CHECK_ARG(is_float_dtype(out_dtype), "lut_combine_quant: dtype must be float32, float16 or bfloat16, got ",
                 out_dtype);
  at::Tensor out = at::empty(p.out_shape, ids.options().dtype(out_dtype));
  combine_quant_cpu(p, out, data, ids, logits, residual, shared, std::nullopt);
  return out;
}

}  // namespace mole

TORCH_LIBRARY_FRAGMENT(mole_kernels, m) {
  // residual + shared + sum_e softmax(logits)_e * lut[ids, layer, e, :]: [*, D] for ids [*], logits
  // [*, E]. The result has residual's dtype (else shared's, else the table's); an id outside [0, V)
  // raises naming it.
  m.def(
      "lut_combine(Tensor lut, Tensor ids, Tensor logits, int? layer=None, Tensor? residual=None, "
      "Tensor? shared=None) -> Tensor");
  // The same into `out` (contiguous; it may be `residual` itself). With `faults`, ids outside [0, V)
  // add nothing and are counted into faults[0] without synchronising (CUDA-graph safe).
  m.def(
      "lut_combine_out(Tensor(a!) out, Tensor lut, Tensor ids, Tensor logits, int? layer=None, "
      "Tensor? residual=None, Tensor? shared=None, Tensor(b!)? faults=None) -> ()");
  // Quantized tables (see lut_gather_quant); `dtype` is the result dtype without residual/shared.
  m.def(
      "lut_combine_quant(Tensor data, str format, int dim, int block_size, Tensor ids, Tensor logits, "
      "int? layer=None, Tensor? residual=None, Tensor? shared=None, ScalarType? dtype=None) -> Tensor");
  m.def(
      "lut_combine_quant_out(Tensor(a!) out, Tensor data, str format, int dim, int block_size, Tensor ids, "
      "Tensor logits, int? layer=None, Tensor? residual=None, Tensor? shared=None, Tensor(b!)? faults=None) -> ()");
}

TORCH_LIBRARY_IMPL(mole_kernels, CPU, m) {
  m.impl("lut_combine", &mole::lut_combine_cpu);
  m.impl("lut_combine_out", &mole::lut_combine_into_cpu);
  m.impl("lut_combine_quant", &mole::lut_combine_quant_cpu);
  m.impl("lut_combine_quant_out", &mole::lut_combine_quant_into_cpu);
}
