// Shared checks and dtype dispatch for every mole_kernels source file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

// User errors name the argument; they surface in Python as ValueError.
#define MOLE_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

// The three table/activation dtypes every kernel accepts.
#define MOLE_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                         \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

#define MOLE_DISPATCH_ID_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::ScalarType::Int, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Long, __VA_ARGS__))

namespace mole {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// `t` as a contiguous tensor of `dtype`: itself (no copy, no dispatch) in the usual case. A decode
// step calls the ops once per layer on tiny tensors, where every avoided dispatch shows.
inline at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

}  // namespace mole
