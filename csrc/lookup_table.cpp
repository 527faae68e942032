// The C++ side of a LookupTable: `torch.classes.mole_kernels.TableStore`.
//
// A store owns one block of host bytes and moves table rows out of it:
// - kind "host": anonymous, page-aligned memory of exactly the bytes asked (rounded to a page),
//   registered with cudaHostRegister(Mapped|Portable) when `pin` is set. torch's pinned allocator
//   rounds up to a power of two (a 9.9 GB table would pin 16 GB); this does not.
// - kind "file": a read-only shared mapping of a file (the disk tier). Nothing is read up front;
//   rows are faulted in when copied, so a file larger than RAM works.
// The bytes are exposed as a uint8 tensor whose deleter releases them, so release is
// deterministic (when the store and every view are gone) and never leaves a dangling view.
//
// Row movers (all take int64 row ids on the CPU, validated, and a byte segment of each row):
// - copy_rows: host threads (at::parallel_for) copy rows into a CPU buffer (pinned staging).
// - dma_rows (CUDA builds): async copies from pinned memory to a device buffer on the current
//   stream, one cudaMemcpy2DAsync per run of consecutive ids.
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "common.h"

#ifdef MOLE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace mole {
namespace {

// Live exact-size host allocations (count, bytes): lets tests prove that close()/GC releases them.
std::atomic<int64_t> g_live_blocks{0};
std::atomic<int64_t> g_live_bytes{0};

int64_t page_size() {
  static const int64_t p = sysconf(_SC_PAGESIZE);
  return p;
}

int64_t round_to_page(int64_t n) { return (n + page_size() - 1) / page_size() * page_size(); }

std::string gib(int64_t bytes) {
  std::ostringstream os;
  os.precision(3);
  os << static_cast<double>(bytes) / (1 << 30) << " GiB";
  return os.str();
}

struct Block {
  void* map = nullptr;   // what mmap returned
  int64_t map_bytes = 0;  // what was mapped
  bool registered = false;
  bool counted = false;
};

void release(Block* b) {
#ifdef MOLE_WITH_CUDA
  // Errors are ignored: at interpreter exit the CUDA runtime may already be unloading.
  if (b->registered) (void)cudaHostUnregister(b->map), (void)cudaGetLastError();
#endif
  munmap(b->map, b->map_bytes);
  if (b->counted) {
    g_live_blocks.fetch_sub(1);
    g_live_bytes.fetch_sub(b->map_bytes);
  }
  delete b;
}

at::Tensor wrap(Block* b, int64_t offset, int64_t nbytes) {
  return at::from_blob(
      static_cast<char*>(b->map) + offset, {nbytes}, [b](void*) { release(b); },
      at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

at::Tensor alloc_host(int64_t nbytes, bool pin) {
  MOLE_CHECK_ARG(nbytes >= 0, "TableStore: nbytes must be >= 0, got ", nbytes);
  const int64_t bytes = round_to_page(std::max<int64_t>(nbytes, 1));
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "LookupTable: could not allocate ", nbytes, " bytes (", gib(nbytes),
              ") of host memory: ", std::strerror(errno), ". Use placement='disk' to keep the table in its file.");
  auto* b = new Block{p, bytes, false, true};
  g_live_blocks.fetch_add(1);
  g_live_bytes.fetch_add(bytes);
  if (pin) {
#ifdef MOLE_WITH_CUDA
    const cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      release(b);
      TORCH_CHECK(false, "LookupTable: could not pin ", nbytes, " bytes (", gib(nbytes),
                  ") of host memory (cudaHostRegister: ", cudaGetErrorString(err),
                  "; check `ulimit -l` and free memory). Use placement='disk' to keep the table in its file "
                  "and stream rows through a small pinned staging buffer.");
    }
    b->registered = true;
#else
    release(b);
    TORCH_CHECK(false, "LookupTable: pinning needs a CUDA build of mole_kernels");
#endif
  }
  return wrap(b, 0, nbytes);
}

at::Tensor map_file(const std::string& path, int64_t offset, int64_t nbytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MOLE_CHECK_ARG(fd >= 0, "LookupTable: cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  const int rc = fstat(fd, &st);
  const int saved = errno;
  if (rc != 0) ::close(fd);
  MOLE_CHECK_ARG(rc == 0, "LookupTable: cannot stat ", path, ": ", std::strerror(saved));
  if (offset < 0 || nbytes < 0 || offset + nbytes > static_cast<int64_t>(st.st_size)) {
    ::close(fd);
    MOLE_CHECK_ARG(false, "LookupTable: ", path, " has ", st.st_size, " bytes but the table needs bytes [", offset,
                   ", ", offset + nbytes, "): the file is truncated");
  }
  const int64_t bytes = std::max<int64_t>(offset + nbytes, 1);
  void* p = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
  const int merr = errno;
  ::close(fd);  // the mapping keeps the file alive
  TORCH_CHECK(p != MAP_FAILED, "LookupTable: cannot memory-map ", path, ": ", std::strerror(merr));
  // Rows are read at random: no speculative read-around beyond what copy_rows asks for.
  (void)madvise(p, bytes, MADV_RANDOM);
  return wrap(new Block{p, bytes, false, false}, offset, nbytes);
}

// Validated view of the ids to copy: int64, contiguous, every id in [0, rows).
at::Tensor checked_ids(const at::Tensor& ids, int64_t rows, const char* what) {
  MOLE_CHECK_ARG(ids.device().is_cpu(), what, ": ids must be on the CPU, got ", ids.device());
  MOLE_CHECK_ARG(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, what,
                 ": ids must be int32 or int64, got ", ids.scalar_type());
  at::Tensor flat = ids.to(at::kLong).contiguous().view(-1);
  const int64_t* p = flat.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    MOLE_CHECK_ARG(p[i] >= 0 && p[i] < rows, what, ": ids contains ", p[i], " (at flat position ", i,
                   "), outside the table's vocabulary [0, ", rows, ")");
  }
  return flat;
}

}  // namespace

struct TableStore : torch::CustomClassHolder {
  std::string kind_;
  at::Tensor bytes_;  // uint8 [nbytes]; undefined once closed
  bool pinned_ = false;

  // kind "host": allocate nbytes (pinned if `pin`); kind "file": map bytes [offset, offset+nbytes) of path.
  TableStore(std::string kind, std::string path, int64_t offset, int64_t nbytes, bool pin) : kind_(std::move(kind)) {
    if (kind_ == "host") {
      bytes_ = alloc_host(nbytes, pin);
      pinned_ = pin;
    } else if (kind_ == "file") {
      MOLE_CHECK_ARG(!pin, "TableStore: a file mapping is never pinned (that would force it resident)");
      bytes_ = map_file(path, offset, nbytes);
    } else {
      MOLE_CHECK_ARG(false, "TableStore: kind must be 'host' or 'file', got '", kind_, "'");
    }
  }

  const at::Tensor& live() const {
    TORCH_CHECK(bytes_.defined(), "TableStore: the table was closed");
    return bytes_;
  }

  at::Tensor tensor() const { return live(); }
  int64_t nbytes() const { return live().numel(); }
  bool pinned() const { return pinned_; }
  bool closed() const { return !bytes_.defined(); }
  std::string kind() const { return kind_; }
  // Drops the store's reference; the bytes are released when no view of them is left.
  void close() { bytes_ = at::Tensor(); }

  void check_segment(int64_t row_bytes, int64_t seg_offset, int64_t seg_bytes, const char* what) const {
    MOLE_CHECK_ARG(row_bytes > 0 && nbytes() % row_bytes == 0, what, ": row_bytes (", row_bytes,
                   ") must divide the table's ", nbytes(), " bytes");
    MOLE_CHECK_ARG(seg_offset >= 0 && seg_bytes > 0 && seg_offset + seg_bytes <= row_bytes, what,
                   ": segment [", seg_offset, ", ", seg_offset + seg_bytes, ") is not inside a row of ", row_bytes,
                   " bytes");
  }

  // dst[i*seg_bytes : (i+1)*seg_bytes] = row ids[i], bytes [seg_offset, seg_offset+seg_bytes).
  void copy_rows(const at::Tensor& ids, int64_t row_bytes, int64_t seg_offset, int64_t seg_bytes,
                 const at::Tensor& dst) const {
    check_segment(row_bytes, seg_offset, seg_bytes, "TableStore.copy_rows");
    const at::Tensor flat = checked_ids(ids, nbytes() / row_bytes, "TableStore.copy_rows");
    const int64_t n = flat.numel();
    MOLE_CHECK_ARG(dst.device().is_cpu() && dst.is_contiguous() && dst.nbytes() >= static_cast<size_t>(n * seg_bytes),
                   "TableStore.copy_rows: dst must be a contiguous CPU tensor of at least ", n * seg_bytes,
                   " bytes, got ", dst.nbytes(), " bytes on ", dst.device());
    if (n == 0) return;
    const char* src = static_cast<const char*>(live().const_data_ptr());
    char* out = static_cast<char*>(dst.data_ptr());
    const int64_t* id = flat.const_data_ptr<int64_t>();
    if (kind_ == "file") {
      // Ask the kernel to start reading every row now, so the copies below overlap the I/O.
      const int64_t pg = page_size();
      const uintptr_t base = reinterpret_cast<uintptr_t>(src);
      for (int64_t i = 0; i < n; ++i) {
        const uintptr_t a = base + id[i] * row_bytes + seg_offset;
        const uintptr_t a0 = a / pg * pg;
        (void)madvise(reinterpret_cast<void*>(a0), a + seg_bytes - a0, MADV_WILLNEED);
      }
    }
    // ~256 KB per task: enough to amortise scheduling, small enough to spread a decode batch.
    const int64_t grain = std::max<int64_t>(1, (256 << 10) / seg_bytes);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        std::memcpy(out + i * seg_bytes, src + id[i] * row_bytes + seg_offset, seg_bytes);
      }
    });
  }

  // Async copies of the rows into dst (a CUDA tensor) on the current stream; returns the number of
  // copies submitted (runs of consecutive ids become one 2-D copy). The store must be pinned.
  int64_t dma_rows(const at::Tensor& ids, int64_t row_bytes, int64_t seg_offset, int64_t seg_bytes,
                   const at::Tensor& dst) const {
#ifdef MOLE_WITH_CUDA
    check_segment(row_bytes, seg_offset, seg_bytes, "TableStore.dma_rows");
    MOLE_CHECK_ARG(pinned_, "TableStore.dma_rows: the store is not pinned, so a copy from it cannot be async");
    const at::Tensor flat = checked_ids(ids, nbytes() / row_bytes, "TableStore.dma_rows");
    const int64_t n = flat.numel();
    MOLE_CHECK_ARG(dst.is_cuda() && dst.is_contiguous() && dst.nbytes() >= static_cast<size_t>(n * seg_bytes),
                   "TableStore.dma_rows: dst must be a contiguous CUDA tensor of at least ", n * seg_bytes,
                   " bytes, got ", dst.nbytes(), " bytes on ", dst.device());
    if (n == 0) return 0;
    const c10::cuda::CUDAGuard guard(dst.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const char* src = static_cast<const char*>(live().const_data_ptr());
    char* out = static_cast<char*>(dst.data_ptr());
    const int64_t* id = flat.const_data_ptr<int64_t>();
    int64_t copies = 0;
    for (int64_t i = 0; i < n;) {
      int64_t j = i + 1;
      while (j < n && id[j] == id[j - 1] + 1) ++j;  // a run of consecutive rows: one copy
      C10_CUDA_CHECK(cudaMemcpy2DAsync(out + i * seg_bytes, seg_bytes, src + id[i] * row_bytes + seg_offset,
                                       row_bytes, seg_bytes, j - i, cudaMemcpyHostToDevice, stream));
      ++copies;
      i = j;
    }
    return copies;
#else
    (void)ids, (void)row_bytes, (void)seg_offset, (void)seg_bytes, (void)dst;
    TORCH_CHECK(false, "TableStore.dma_rows: mole_kernels was built without CUDA");
#endif
  }
};

// [live blocks, live bytes] of exact-size host allocations (pinned or not).
std::vector<int64_t> host_allocations() { return {g_live_blocks.load(), g_live_bytes.load()}; }

}  // namespace mole

TORCH_LIBRARY_FRAGMENT(mole_kernels, m) {
  m.class_<mole::TableStore>("TableStore")
      .def(torch::init<std::string, std::string, int64_t, int64_t, bool>())
      .def("tensor", &mole::TableStore::tensor)
      .def("nbytes", &mole::TableStore::nbytes)
      .def("pinned", &mole::TableStore::pinned)
      .def("closed", &mole::TableStore::closed)
      .def("kind", &mole::TableStore::kind)
      .def("close", &mole::TableStore::close)
      .def("copy_rows", &mole::TableStore::copy_rows)
      .def("dma_rows", &mole::TableStore::dma_rows);
  m.def("host_allocations() -> int[]", &mole::host_allocations);
}
