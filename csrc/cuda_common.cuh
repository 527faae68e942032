// What every CUDA gather shares: id checks, alignment, and where a table is read from.
// Only c10/cuda headers are included: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS
// headers that a minimal CUDA toolkit does not ship.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "common.h"

namespace mole::cuda {

// N values of T moved as one aligned vector (16 bytes when sizeof(T) * N == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename id_t>
__device__ __forceinline__ bool valid_id(id_t id, int64_t V) {
  return static_cast<int64_t>(id) >= 0 && static_cast<int64_t>(id) < V;
}

// Records the smallest position of an id outside [0, V) (pos starts at T).
template <typename id_t>
__global__ void first_bad_id_kernel(const id_t* __restrict__ ids, int64_t T, int64_t V,
                                    unsigned long long* __restrict__ pos) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < T; i += int64_t(gridDim.x) * blockDim.x) {
    if (!valid_id(ids[i], V)) atomicMin(pos, static_cast<unsigned long long>(i));
  }
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The address a kernel reads `table` at: VRAM, or the device alias of pinned host memory
// (zero-copy through unified addressing). `op`/`arg` name the call and argument in errors.
inline const void* table_device_pointer(const at::Tensor& table, const at::Tensor& ids, const char* op,
                                        const char* arg, const char* how_to_pin) {
  if (table.is_cuda()) {
    MOLE_CHECK_ARG(table.device() == ids.device(), op, ": ", arg, " is on ", table.device(), " but ids are on ",
                   ids.device());
    return table.const_data_ptr();
  }
  MOLE_CHECK_ARG(table.is_pinned(), op, ": ids are on ", ids.device(), " but ", arg,
                 " is an ordinary (pageable) CPU tensor; the CUDA kernel reads a CPU table in place only when it is "
                 "pinned: use ", how_to_pin);
  cudaPointerAttributes attr;
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, table.const_data_ptr()));
  TORCH_CHECK(attr.devicePointer != nullptr, op, ": the pinned table has no device mapping on ", ids.device(),
              " (was it registered without cudaHostRegisterMapped?)");
  return attr.devicePointer;
}

// Raises naming the first id outside [0, V). Synchronises: used only when the caller asked
// for an error rather than a fault counter.
inline void raise_on_bad_id(const at::Tensor& ids, int64_t V, cudaStream_t stream, const char* op) {
  const int64_t T = ids.numel();
  at::Tensor pos = at::full({1}, T, ids.options().dtype(at::kLong));
  MOLE_DISPATCH_ID_TYPES(ids.scalar_type(), "check_ids", [&] {
    const int blocks = static_cast<int>(std::min<int64_t>((T + 255) / 256, 1024));
    first_bad_id_kernel<<<blocks, 256, 0, stream>>>(ids.const_data_ptr<scalar_t>(), T, V,
                                                    reinterpret_cast<unsigned long long*>(pos.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t first = pos.item<int64_t>();
  if (first < T) {
    const int64_t id = ids.view(-1)[first].item<int64_t>();
    MOLE_CHECK_ARG(false, op, ": ids contains ", id, " (at flat position ", first,
                   "), outside the table's vocabulary [0, ", V, ")");
  }
}

}  // namespace mole::cuda
