// The C++ side of a LookupTable: `torch.classes.mole_kernels.TableStore`, and `dedupe_ids`.
//
// A store owns where a table's bytes live and copies row segments out of them:
// - kind "host": anonymous, page-aligned memory of exactly the bytes asked (rounded to a page),
//   registered with cudaHostRegister(Mapped|Portable) when `pin` is set. torch's pinned allocator
//   rounds up to a power of two (a 9.9 GB table would pin 16 GB); this does not. The bytes are a
//   uint8 tensor whose deleter releases them, so release is deterministic (when the store and
//   every view are gone) and never leaves a dangling view.
// - kind "file": an open file descriptor of a regular file (the disk tier). Rows are read with
//   pread, never through a memory mapping: a file truncated or rewritten by another process then
//   shows up as a short read or a changed size/mtime (a clear error), where a mapping would kill
//   the process with SIGBUS. Nothing is read up front, so a file larger than RAM works.
//
// copy_rows moves row segments (ids validated, int64 on the CPU) into a CPU buffer: memcpy with host
// threads (at::parallel_for) for "host"; for "file", pread, the rows that wait for storage read
// concurrently (read_rows). stage_rows (CUDA builds) moves
// them to a device buffer through a pinned staging store in a few large async copies, pipelined:
// host threads fill one half of the staging while the other half's copy runs. dedupe_ids turns a
// batch's ids into its sorted unique ids and each id's position among them, so a row is read once.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <exception>
#include <system_error>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "direct_calls.h"

#ifdef MOLE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
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

std::string gib(int64_t bytes) {
  std::ostringstream os;
  os.precision(3);
  os << static_cast<double>(bytes) / (1 << 30) << " GiB";
  return os.str();
}

// a + b and a * b for sizes that come from users and files: an overflow is an error, never a wrap.
int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r;
  MOLE_CHECK_ARG(!__builtin_add_overflow(a, b, &r), what, ": ", a, " + ", b, " overflows int64");
  return r;
}
int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  MOLE_CHECK_ARG(!__builtin_mul_overflow(a, b, &r), what, ": ", a, " * ", b, " overflows int64");
  return r;
}

struct Block {
  void* map = nullptr;    // what mmap returned
  int64_t map_bytes = 0;  // what was mapped
  bool registered = false;
};

void release(Block* b) {
#ifdef MOLE_WITH_CUDA
  if (b->registered) {
    // A kernel or copy may still read this memory (an eager launch, or a CUDA graph replay, which no
    // event recorded at capture time would cover): wait until every device that could be reading it
    // is idle, then unregister. Only devices with a primary context can have work queued; touching
    // any other would create a context there (~0.5 GB of device memory) for nothing, so they are
    // skipped, and the current device is restored without creating one (MaybeSetDevice).
    // Errors are ignored: at interpreter exit the CUDA runtime may already be unloading.
    int count = 0, current = 0;
    if (cudaGetDeviceCount(&count) == cudaSuccess && cudaGetDevice(&current) == cudaSuccess) {
      for (int d = 0; d < count; ++d) {
        if (!c10::cuda::hasPrimaryContext(static_cast<c10::DeviceIndex>(d))) continue;
        if (cudaSetDevice(d) == cudaSuccess) (void)cudaDeviceSynchronize();
      }
      (void)c10::cuda::MaybeSetDevice(static_cast<c10::DeviceIndex>(current));
    }
    (void)cudaHostUnregister(b->map);
    (void)cudaGetLastError();
  }
#endif
  munmap(b->map, b->map_bytes);
  g_live_blocks.fetch_sub(1);
  g_live_bytes.fetch_sub(b->map_bytes);
  delete b;
}

at::Tensor alloc_host(int64_t nbytes, bool pin) {
  MOLE_CHECK_ARG(nbytes >= 0, "TableStore: nbytes must be >= 0, got ", nbytes);
  const int64_t bytes = checked_add(std::max<int64_t>(nbytes, 1), page_size() - 1, "TableStore: nbytes") /
                        page_size() * page_size();
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "LookupTable: could not allocate ", nbytes, " bytes (", gib(nbytes),
              ") of host memory: ", std::strerror(errno), ". Use placement='disk' to keep the table in its file.");
  auto* b = new Block{p, bytes, false};
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
  return at::from_blob(
      p, {nbytes}, [b](void*) { release(b); }, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

// An open table file: the descriptor and what fstat said at open, to notice a file changed under us.
struct File {
  std::string path;
  int fd = -1;
  struct stat at_open {};
  int64_t offset = 0;  // first byte of the table in the file
  int64_t nbytes = 0;

  ~File() {
    if (fd >= 0) ::close(fd);
  }

  // A clear error when the file is not the one opened any more (truncated, extended, rewritten).
  void check_unchanged() const {
    struct stat now {};
    MOLE_CHECK_ARG(fstat(fd, &now) == 0, "LookupTable: cannot stat ", path, ": ", std::strerror(errno));
    // Size and mtime: a write changes them; an unlink or rename of the open file (which keeps serving
    // the bytes opened) changes only ctime, so ctime is not compared.
    const bool same = now.st_size == at_open.st_size && now.st_mtim.tv_sec == at_open.st_mtim.tv_sec &&
                      now.st_mtim.tv_nsec == at_open.st_mtim.tv_nsec;
    TORCH_CHECK(same, "LookupTable: ", path, " changed after it was opened (size ", at_open.st_size, " -> ",
                now.st_size, " bytes, or modified in place): its rows can no longer be trusted; open it again");
  }

  // Reads exactly n bytes at table offset `at` into dst (loops over partial reads and EINTR).
  void read_exact(char* dst, int64_t at, int64_t n) const {
    int64_t done = 0;
    while (done < n) {
      const ssize_t got = ::pread(fd, dst + done, static_cast<size_t>(n - done), offset + at + done);
      if (got < 0 && errno == EINTR) continue;
      TORCH_CHECK(got >= 0, "LookupTable: reading ", path, " failed: ", std::strerror(errno));
      if (got == 0) check_unchanged();  // cut short: say that the file changed, with its sizes
      TORCH_CHECK(got > 0, "LookupTable: ", path, " ended at byte ", offset + at + done, " but the table needs ",
                  offset + nbytes, " bytes: the file was truncated after it was opened; open it again");
      done += got;
    }
  }
};

// Reads the file's rows out[i] <- table bytes [at[i], +n) for i < count, storage reads in flight together.
// Why: a cold row (not in the page cache) waits ~0.1-1 ms for the device, and one thread would wait for
// each in turn, while a disk or network volume serves many requests at once. So each row is first
// read without blocking (RWF_NOWAIT: the page cache's bytes or nothing, so a warm step costs what it
// did); the rows that must wait for storage are then read by up to kColdReaders threads at once,
// started for that step only (a thread costs ~20 us, far below one cold read; warm steps start none).
constexpr int64_t kColdReaders = 8;

// A step's rows that must wait for storage: read by ColdReads::run on up to kColdReaders threads.
// Everything the threads touch is held here (the file and the destination tensor), so a background
// read (read_through_cache's `background`) that nobody waits for cannot write to freed memory.
struct ColdReads {
  struct Row {
    int64_t at;    // the row's first byte in the table
    char* dst;     // where it goes (inside `dst`)
    int64_t done;  // bytes already read
  };
  std::shared_ptr<File> file;
  at::Tensor dst;  // held only: the rows' destinations point into it
  int64_t n = 0;   // bytes per row
  std::vector<Row> rows;
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::condition_variable done_cv;
  int64_t running = 0;  // reader threads not finished (under mu)
  std::exception_ptr error;  // the first failure (under mu)

  // One reader thread's loop: takes rows until none are left.
  void run() {
    try {
      for (size_t c = next++; c < rows.size(); c = next++) {
        const Row& r = rows[c];
        file->read_exact(r.dst + r.done, r.at + r.done, n - r.done);
      }
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  }

  // Reads table bytes [at, +n) to dst now if the page cache holds them (without blocking), else leaves
  // the row (or what a partial read left of it) here for the storage reads.
  void read_if_cached(int64_t at, char* out) {
    struct iovec v {out, static_cast<size_t>(n)};
    const ssize_t got = ::preadv2(file->fd, &v, 1, file->offset + at, RWF_NOWAIT);
    if (got == n) return;
    rows.push_back({at, out, got > 0 ? got : 0});  // EAGAIN (not cached), a partial read, or no RWF_NOWAIT here
  }

  int64_t threads() const { return std::min<int64_t>(static_cast<int64_t>(rows.size()), kColdReaders); }

  // Reads every row here and returns (this thread reads too).
  void read_now() {
    std::vector<std::thread> helpers;
    for (int64_t k = 1; k < threads(); ++k) helpers.emplace_back([this] { run(); });
    run();
    for (auto& t : helpers) t.join();
    if (error) std::rethrow_exception(error);
  }

  // Starts detached reader threads, each holding `self`; wait() blocks until they are done.
  static void start(const std::shared_ptr<ColdReads>& self) {
    const int64_t count = self->threads();  // not `running`: the first threads may finish while others start
    self->running = count;
    for (int64_t k = 0; k < count; ++k) {
      try {
        std::thread([self] {
          self->run();
          self->finished(1);
        }).detach();
      } catch (const std::system_error&) {  // no thread to be had: the ones started (or wait()) read the rest
        self->finished(count - k);
        return;
      }
    }
  }

  void finished(int64_t threads) {
    const std::lock_guard<std::mutex> lock(mu);
    running -= threads;
    if (running == 0) done_cv.notify_all();
  }

  void wait() {
    run();  // rows no thread has taken yet (none, unless threads could not be started)
    std::unique_lock<std::mutex> lock(mu);
    done_cv.wait(lock, [this] { return running == 0; });
    if (error) std::rethrow_exception(error);
  }
};

// Row i is table bytes [id[i] * row_bytes + seg_offset, +n), read to out + i * n; the rows not in
// the page cache are left in the result (nothing to read when it holds none).
std::shared_ptr<ColdReads> read_cached_rows(const std::shared_ptr<File>& file, const int64_t* id, int64_t count,
                                            int64_t row_bytes, int64_t seg_offset, int64_t n, char* out) {
  auto cold = std::make_shared<ColdReads>();
  cold->file = file;
  cold->n = n;
  for (int64_t i = 0; i < count; ++i) cold->read_if_cached(id[i] * row_bytes + seg_offset, out + i * n);
  return cold;
}

std::shared_ptr<File> open_file(const std::string& path, int64_t offset, int64_t nbytes) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  MOLE_CHECK_ARG(fd >= 0, "LookupTable: cannot open ", path, ": ", std::strerror(errno));
  auto f = std::make_shared<File>();
  f->path = path;
  f->fd = fd;
  MOLE_CHECK_ARG(fstat(fd, &f->at_open) == 0, "LookupTable: cannot stat ", path, ": ", std::strerror(errno));
  MOLE_CHECK_ARG(S_ISREG(f->at_open.st_mode), "LookupTable: ", path,
                 " is not a regular file (a directory, FIFO, socket or device cannot hold a table)");
  MOLE_CHECK_ARG(offset >= 0 && nbytes >= 0, "LookupTable: table bytes [", offset, ", +", nbytes, ") of ", path,
                 " must not be negative");
  const int64_t end = checked_add(offset, nbytes, "LookupTable: table end");
  MOLE_CHECK_ARG(end <= static_cast<int64_t>(f->at_open.st_size), "LookupTable: ", path, " has ",
                 f->at_open.st_size, " bytes but the table needs bytes [", offset, ", ", end,
                 "): the file is truncated");
  f->offset = offset;
  f->nbytes = nbytes;
  // Rows are read at random: no speculative read-ahead beyond what is asked.
  (void)posix_fadvise(fd, offset, nbytes, POSIX_FADV_RANDOM);
  return f;
}

// Validated view of the ids to copy: int64, contiguous, every id in [0, rows).
at::Tensor checked_ids(const at::Tensor& ids, int64_t rows, const char* what) {
  MOLE_CHECK_ARG(ids.device().is_cpu(), what, ": ids must be on the CPU, got ", ids.device());
  MOLE_CHECK_ARG(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, what,
                 ": ids must be int32 or int64, got ", ids.scalar_type());
  at::Tensor flat = as_contiguous(ids, at::kLong);  // read by numel and pointer: no dispatched view
  const int64_t* p = flat.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    MOLE_CHECK_ARG(p[i] >= 0 && p[i] < rows, what, ": ids contains ", p[i], " (at flat position ", i,
                   "), outside the table's vocabulary [0, ", rows, ")");
  }
  return flat;
}

}  // namespace

// The row copy behind TableStore.copy_rows: from host bytes (memcpy) or a file (pread), `total`
// bytes of table, into a CPU buffer.
void copy_segments(const at::Tensor& host, const std::shared_ptr<File>& file, int64_t total, const at::Tensor& ids,
                   int64_t row_bytes, int64_t seg_offset, int64_t seg_bytes, const at::Tensor& dst) {
    MOLE_CHECK_ARG(row_bytes > 0 && total % row_bytes == 0, "TableStore.copy_rows: row_bytes (", row_bytes,
                   ") must divide the table's ", total, " bytes");
    MOLE_CHECK_ARG(seg_offset >= 0 && seg_bytes > 0 &&
                       checked_add(seg_offset, seg_bytes, "TableStore.copy_rows: segment end") <= row_bytes,
                   "TableStore.copy_rows: segment [", seg_offset, ", +", seg_bytes, ") is not inside a row of ",
                   row_bytes, " bytes");
    const at::Tensor flat = checked_ids(ids, total / row_bytes, "TableStore.copy_rows");
    const int64_t n = flat.numel();
    const int64_t need = checked_mul(n, seg_bytes, "TableStore.copy_rows: bytes to copy");
    MOLE_CHECK_ARG(dst.device().is_cpu() && dst.is_contiguous() && static_cast<int64_t>(dst.nbytes()) >= need,
                   "TableStore.copy_rows: dst must be a contiguous CPU tensor of at least ", need, " bytes, got ",
                   dst.nbytes(), " bytes on ", dst.device());
    if (n == 0) return;
    char* out = static_cast<char*>(dst.data_ptr());
    const int64_t* id = flat.const_data_ptr<int64_t>();
    // ~256 KB per task: enough to amortise scheduling, small enough to spread a decode batch.
    const int64_t grain = std::max<int64_t>(1, (256 << 10) / seg_bytes);
    if (file) {
      read_cached_rows(file, id, n, row_bytes, seg_offset, seg_bytes, out)->read_now();
      // After the reads, against the file as opened: a change before or during them shows (a rewrite
      // while we read would have mixed old and new rows).
      file->check_unchanged();
      return;
    }
    const char* src = static_cast<const char*>(host.const_data_ptr());
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) std::memcpy(out + i * seg_bytes, src + id[i] * row_bytes + seg_offset, seg_bytes);
    });
}

// Handles that name an open table file for direct calls from the Python module (csrc/module.cpp): a
// decode step then reads its rows without a TorchScript method call, which costs ~30 us inside a
// decode loop (its code is cold by then) against a few us for the read itself. A handle never
// names another file: numbers are not reused, and a closed file's handle finds nothing.
std::mutex g_handles_mu;
std::unordered_map<int64_t, std::weak_ptr<File>> g_handles;
int64_t g_next_handle = 0;

// (sorted unique ids in [0, V), inverse) for CPU ids of any shape: ids[i] == uniq[inverse[i]].
// An id outside [0, V) raises naming the first one (strict), or gets inverse -1 (a gather in
// counted-faults mode then reads zeros for it and counts it).
std::tuple<at::Tensor, at::Tensor> dedupe_ids(const at::Tensor& ids, int64_t V, bool strict) {
  MOLE_CHECK_ARG(ids.device().is_cpu(), "dedupe_ids: ids must be on the CPU, got ", ids.device());
  MOLE_CHECK_ARG(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                 "dedupe_ids: ids must be int32 or int64, got ", ids.scalar_type());
  const at::Tensor flat = as_contiguous(ids, at::kLong);  // read by numel and pointer: no dispatched view
  const int64_t n = flat.numel();
  const int64_t* p = flat.const_data_ptr<int64_t>();
  // Allocated undispatched: a decode step on a disk table calls this once per step, with its code cold.
  at::Tensor inverse = at::detail::empty_cpu(ids.sizes(), at::kLong);
  int64_t* inv = inverse.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> order;  // (id, position) of the valid ids
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] >= 0 && p[i] < V) {
      order.emplace_back(p[i], i);
    } else {
      MOLE_CHECK_ARG(!strict, "LookupTable: ids contains ", p[i], " (at flat position ", i,
                     "), outside the table's vocabulary [0, ", V, ")");
      inv[i] = -1;
    }
  }
  std::sort(order.begin(), order.end());
  std::vector<int64_t> uniq;
  for (const auto& [id, pos] : order) {
    if (uniq.empty() || uniq.back() != id) uniq.push_back(id);
    inv[pos] = static_cast<int64_t>(uniq.size()) - 1;
  }
  at::Tensor u = at::detail::empty_cpu({static_cast<int64_t>(uniq.size())}, at::kLong);
  std::copy(uniq.begin(), uniq.end(), u.data_ptr<int64_t>());
  return {u, inverse};
}

// dedupe_ids, then copy_segments of the unique rows: (inverse, number of unique rows).
std::tuple<at::Tensor, int64_t> read_unique_rows(const at::Tensor& host, const std::shared_ptr<File>& file,
                                                 int64_t total, const at::Tensor& ids, int64_t row_bytes,
                                                 int64_t seg_offset, int64_t seg_bytes, bool strict,
                                                 const at::Tensor& dst) {
  MOLE_CHECK_ARG(row_bytes > 0, "TableStore.read_unique: row_bytes must be > 0, got ", row_bytes);
  auto [uniq, inverse] = dedupe_ids(ids, total / row_bytes, strict);
  copy_segments(host, file, total, uniq, row_bytes, seg_offset, seg_bytes, dst);
  return {inverse, uniq.numel()};
}

// Background reads of read_through_cache, by ticket (0: none), until wait_reads takes them.
std::mutex g_pending_mu;
std::unordered_map<int64_t, std::shared_ptr<ColdReads>> g_pending;
int64_t g_next_ticket = 0;

namespace {

// Files the background reads of a step under a new ticket, for wait_reads.
int64_t pending_ticket(std::shared_ptr<ColdReads> cold) {
  const std::lock_guard<std::mutex> lock(g_pending_mu);
  g_pending.emplace(++g_next_ticket, std::move(cold));
  return g_next_ticket;
}

std::shared_ptr<File> open_handle(int64_t handle) {
  std::shared_ptr<File> file;
  {
    const std::lock_guard<std::mutex> lock(g_handles_mu);
    const auto it = g_handles.find(handle);
    if (it != g_handles.end()) file = it->second.lock();
  }
  TORCH_CHECK(file != nullptr, "TableStore: the table was closed");
  return file;
}

}  // namespace

void wait_reads(int64_t ticket) {
  std::shared_ptr<ColdReads> cold;
  {
    const std::lock_guard<std::mutex> lock(g_pending_mu);
    const auto it = g_pending.find(ticket);
    MOLE_CHECK_ARG(it != g_pending.end(), "wait_reads: no reads are pending under ticket ", ticket,
                   " (each ticket is waited for once)");
    cold = std::move(it->second);
    g_pending.erase(it);
  }
  cold->wait();
  cold->file->check_unchanged();  // as copy_segments does after reading in the foreground
}

// ------------------------------------------------------------------ the disk tier's row cache --------
//
// Why: a warm row costs a pread (~0.6 us of system call and page-cache lookup, then the copy) every step
// it is used, ~30 us per step at B = 32 with 8 KB rows, and the step's copies evict the model's weights
// from the core's cache. Token frequencies are steep (Zipf): the rows of recent steps are mostly the
// rows of the next. So a reader keeps them in its staging, one slot per row, and a step reads from the
// file only the rows no slot holds; a layer then reads each token's row at its slot.
//
// Slots are replaced by CLOCK (a slot used since the hand last passed gets another round), never a slot
// of the current step. A failed or abandoned read forgets every row (they are read again); rows read
// from the file are checked against it as opened, as every read is (File::check_unchanged).
struct RowCache {
  std::weak_ptr<File> file;  // the table's (closing the table closes it: a later step raises)
  at::Tensor slots;          // uint8 [capacity * row_bytes]: the reader's staging
  int64_t row_bytes = 0, capacity = 0;
  std::vector<int32_t> slot_of;    // per table row: its slot, or -1
  std::vector<int64_t> id_of;      // per slot: its table row, or -1
  std::vector<uint64_t> used_in;   // per slot: the last step that used it
  std::vector<uint8_t> recent;     // per slot: used since the hand last passed
  int64_t hand = 0;
  uint64_t step = 0;
  std::shared_ptr<ColdReads> pending;  // the last step's reads left running
  std::atomic<bool> drop{false};       // drop_cached_rows asked: forget every row at the next step
  std::mutex mu;                       // one step at a time

  void forget_all() {
    for (int64_t s = 0; s < capacity; ++s) {
      if (id_of[s] >= 0) slot_of[id_of[s]] = -1;
      id_of[s] = -1;
      recent[s] = 0;
    }
  }

  // A slot for a row this step has not placed yet (a step of at most `capacity` ids always finds one).
  int64_t free_slot() {
    for (;;) {
      const int64_t s = hand;
      hand = hand + 1 == capacity ? 0 : hand + 1;
      if (used_in[s] == step) continue;
      if (recent[s]) {
        recent[s] = 0;
        continue;
      }
      if (id_of[s] >= 0) slot_of[id_of[s]] = -1;
      return s;
    }
  }
};

std::shared_ptr<RowCache> make_row_cache(int64_t handle, const at::Tensor& slots, int64_t row_bytes) {
  const std::shared_ptr<File> file = open_handle(handle);
  MOLE_CHECK_ARG(row_bytes > 0 && file->nbytes % row_bytes == 0, "row cache: row_bytes (", row_bytes,
                 ") must divide the table's ", file->nbytes, " bytes");
  MOLE_CHECK_ARG(slots.device().is_cpu() && slots.scalar_type() == at::kByte && slots.is_contiguous() &&
                     slots.numel() >= row_bytes && slots.numel() % row_bytes == 0,
                 "row cache: slots must be a contiguous uint8 CPU tensor of whole rows of ", row_bytes, " bytes");
  auto c = std::make_shared<RowCache>();
  c->file = file;
  c->slots = slots;
  c->row_bytes = row_bytes;
  c->capacity = slots.numel() / row_bytes;
  c->slot_of.assign(static_cast<size_t>(file->nbytes / row_bytes), -1);
  c->id_of.assign(c->capacity, -1);
  c->used_in.assign(c->capacity, 0);
  c->recent.assign(c->capacity, 0);
  return c;
}

std::tuple<at::Tensor, int64_t, int64_t> read_through_cache(RowCache& c, const at::Tensor& ids, bool background) {
  const std::lock_guard<std::mutex> lock(c.mu);
  if (c.pending) {  // the last step's reads end first; a failure (seen or not) forgets the rows, read again below
    const auto pending = std::move(c.pending);
    try {
      pending->wait();
    } catch (...) {
      c.forget_all();
    }
  }
  if (c.drop.exchange(false)) c.forget_all();
  std::shared_ptr<File> file = c.file.lock();
  TORCH_CHECK(file != nullptr, "TableStore: the table was closed");
  const int64_t V = static_cast<int64_t>(c.slot_of.size());
  const at::Tensor flat = checked_ids(ids, V, "LookupTable");  // every id checked before any slot changes
  const int64_t n = flat.numel();
  MOLE_CHECK_ARG(std::min(n, V) <= c.capacity, "row cache: a step of ", n, " ids needs ", std::min(n, V),
                 " slots, the cache has ", c.capacity);
  const int64_t* id = flat.const_data_ptr<int64_t>();
  at::Tensor inverse = at::detail::empty_cpu(ids.sizes(), at::kLong);
  int64_t* slot = inverse.data_ptr<int64_t>();
  ++c.step;
  std::shared_ptr<ColdReads> cold;
  int64_t read = 0;
  char* base = static_cast<char*>(c.slots.data_ptr());
  try {
    for (int64_t i = 0; i < n; ++i) {
      int64_t s = c.slot_of[id[i]];
      if (s < 0) {
        s = c.free_slot();
        c.slot_of[id[i]] = static_cast<int32_t>(s);
        c.id_of[s] = id[i];
        if (cold == nullptr) {
          cold = std::make_shared<ColdReads>();
          cold->file = file;
          cold->dst = c.slots;
          cold->n = c.row_bytes;
        }
        cold->read_if_cached(id[i] * c.row_bytes, base + s * c.row_bytes);
        ++read;
      }
      c.used_in[s] = c.step;
      c.recent[s] = 1;
      slot[i] = s;
    }
    if (cold == nullptr) return {inverse, 0, 0};  // every row in a slot: no read, nothing to check
    if (background && !cold->rows.empty()) {
      ColdReads::start(cold);
      c.pending = cold;
      return {inverse, read, pending_ticket(std::move(cold))};  // its wait() checks the file, after the reads
    }
    cold->read_now();
    file->check_unchanged();
  } catch (...) {
    c.forget_all();
    throw;
  }
  return {inverse, read, 0};
}

void drop_cached_rows(RowCache& c) { c.drop = true; }

int64_t row_cache_slots(const RowCache& c) { return c.capacity; }

struct TableStore : torch::CustomClassHolder {
  std::string kind_;
  at::Tensor bytes_;             // "host": uint8 [nbytes]; undefined once closed
  std::shared_ptr<File> file_;   // "file": the open file; null once closed
  bool pinned_ = false;
  int64_t handle_ = -1;          // "file": its handle for direct calls, once asked for
#ifdef MOLE_WITH_CUDA
  struct HalfEvents {            // as a staging store: the last copy out of each half
    cudaEvent_t e[2] = {nullptr, nullptr};
    ~HalfEvents() {
      for (cudaEvent_t x : e) {
        if (x != nullptr) (void)cudaEventDestroy(x), (void)cudaGetLastError();
      }
    }
  } half_done_;
#endif

  // kind "host": allocate nbytes (pinned if `pin`); kind "file": bytes [offset, offset+nbytes) of path.
  TableStore(std::string kind, std::string path, int64_t offset, int64_t nbytes, bool pin) : kind_(std::move(kind)) {
    if (kind_ == "host") {
      bytes_ = alloc_host(nbytes, pin);
      pinned_ = pin;
    } else if (kind_ == "file") {
      MOLE_CHECK_ARG(!pin, "TableStore: a file is never pinned (its rows pass through pinned staging)");
      file_ = open_file(path, offset, nbytes);
    } else {
      MOLE_CHECK_ARG(false, "TableStore: kind must be 'host' or 'file', got '", kind_, "'");
    }
  }

  bool closed() const { return !bytes_.defined() && file_ == nullptr; }
  void check_open() const { TORCH_CHECK(!closed(), "TableStore: the table was closed"); }

  // The host bytes as a tensor (a file has none: its rows are read on demand).
  at::Tensor tensor() const {
    check_open();
    TORCH_CHECK(kind_ == "host", "TableStore: a file store has no tensor in memory; read rows with copy_rows");
    return bytes_;
  }
  int64_t nbytes() const {
    check_open();
    return kind_ == "host" ? bytes_.numel() : file_->nbytes;
  }
  bool pinned() const { return pinned_; }
  std::string kind() const { return kind_; }
  // (st_dev, st_ino) of the file opened, so a caller can tell it is the file it validated.
  std::vector<int64_t> identity() const {
    check_open();
    TORCH_CHECK(kind_ == "file", "TableStore: identity() is for file stores");
    return {static_cast<int64_t>(file_->at_open.st_dev), static_cast<int64_t>(file_->at_open.st_ino)};
  }
  // Drops the store's reference; host bytes are released when no view of them is left, the file
  // when no copy in progress uses it.
  void close() {
    bytes_ = at::Tensor();
    file_.reset();
    if (handle_ >= 0) {
      const std::lock_guard<std::mutex> lock(g_handles_mu);
      g_handles.erase(handle_);
    }
  }
  ~TableStore() override { close(); }

  // dst[i*seg_bytes : (i+1)*seg_bytes] = row ids[i], bytes [seg_offset, seg_offset+seg_bytes).
  void copy_rows(const at::Tensor& ids, int64_t row_bytes, int64_t seg_offset, int64_t seg_bytes,
                 const at::Tensor& dst) const {
    check_open();
    // bytes_ and file_ are copied: close() from another thread cannot pull them from under the copy
    copy_segments(bytes_, file_, nbytes(), ids, row_bytes, seg_offset, seg_bytes, dst);
  }

  // dst (a CUDA buffer) = the rows' segments, as copy_rows lays them out, through `staging` (a pinned
  // host store): chunks fill alternate halves of it with host threads while the previous chunk's
  // async copy runs on the current stream. A batch is cut into at least four chunks when it has
  // rows enough, so that reading overlaps copying; otherwise a chunk is a whole half. Returns the
  // number of copies (O(bytes / half), never one per row: small copies run far below PCIe speed).
  int64_t stage_rows(const at::Tensor& ids, int64_t row_bytes, int64_t seg_offset, int64_t seg_bytes,
                     const c10::intrusive_ptr<TableStore>& staging, const at::Tensor& dst) const {
#ifdef MOLE_WITH_CUDA
    MOLE_CHECK_ARG(staging && staging->kind_ == "host" && staging->pinned_ && !staging->closed(),
                   "TableStore.stage_rows: staging must be an open, pinned host store");
    MOLE_CHECK_ARG(dst.is_cuda() && dst.is_contiguous(), "TableStore.stage_rows: dst must be a contiguous CUDA tensor");
    MOLE_CHECK_ARG(seg_bytes > 0, "TableStore.stage_rows: seg_bytes must be > 0, got ", seg_bytes);
    const at::Tensor flat = checked_ids(ids, nbytes() / std::max<int64_t>(row_bytes, 1), "TableStore.stage_rows");
    const int64_t n = flat.numel();
    MOLE_CHECK_ARG(static_cast<int64_t>(dst.nbytes()) >= checked_mul(n, seg_bytes, "TableStore.stage_rows: bytes"),
                   "TableStore.stage_rows: dst holds ", dst.nbytes(), " bytes, needs ", n * seg_bytes);
    const int64_t half = staging->nbytes() / 2;
    MOLE_CHECK_ARG(half >= seg_bytes, "TableStore.stage_rows: each staging half (", half,
                   " bytes) must hold one row segment of ", seg_bytes, " bytes");
    if (n == 0) return 0;
    const c10::cuda::CUDAGuard guard(dst.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // Under CUDA-graph capture the copies below would be captured but the host threads' gather into
    // the staging would not: every replay would copy whatever the staging held last. Refused.
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
    TORCH_CHECK(capturing == cudaStreamCaptureStatusNone,
                "TableStore.stage_rows: cannot run while the stream is being captured into a CUDA graph (rows are "
                "gathered by host threads, which a replay would not repeat); capture a zero-copy or device-tier "
                "read instead (LookupTable path 'zero_copy' or a Prefetcher)");
    for (cudaEvent_t& e : staging->half_done_.e) {
      if (e == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    const int64_t rows = std::max<int64_t>(1, std::min(half / seg_bytes, (n + 3) / 4));
    char* stage = static_cast<char*>(staging->tensor().data_ptr());
    char* out = static_cast<char*>(dst.data_ptr());
    int64_t copies = 0;
    for (int64_t a = 0; a < n; a += rows, ++copies) {
      const int64_t b = std::min(n, a + rows);
      const int h = static_cast<int>(copies % 2);
      C10_CUDA_CHECK(cudaEventSynchronize(staging->half_done_.e[h]));  // its previous copy has read this half
      const at::Tensor buf = staging->tensor().narrow(0, h * half, (b - a) * seg_bytes);
      copy_rows(flat.narrow(0, a, b - a), row_bytes, seg_offset, seg_bytes, buf);
      C10_CUDA_CHECK(cudaMemcpyAsync(out + a * seg_bytes, stage + h * half, (b - a) * seg_bytes,
                                     cudaMemcpyHostToDevice, stream));
      C10_CUDA_CHECK(cudaEventRecord(staging->half_done_.e[h], stream));
    }
    return copies;
#else
    (void)ids, (void)row_bytes, (void)seg_offset, (void)seg_bytes, (void)staging, (void)dst;
    TORCH_CHECK(false, "TableStore.stage_rows: mole_kernels was built without CUDA");
#endif
  }

  // A step's rows on the CPU in one call: dedupe `ids` (as dedupe_ids), copy the unique rows'
  // segments into dst (as copy_rows); returns (inverse, number of unique rows). A decode step pays
  // one crossing into C++ for its rows, not one per stage.
  std::tuple<at::Tensor, int64_t> read_unique(const at::Tensor& ids, int64_t row_bytes, int64_t seg_offset,
                                              int64_t seg_bytes, bool strict, const at::Tensor& dst) const {
    check_open();
    return read_unique_rows(bytes_, file_, nbytes(), ids, row_bytes, seg_offset, seg_bytes, strict, dst);
  }

  // A handle for the direct calls' row caches (a file store), valid until the store is closed.
  int64_t handle() {
    check_open();
    TORCH_CHECK(kind_ == "file", "TableStore: handle() is for file stores");
    if (handle_ < 0) {
      const std::lock_guard<std::mutex> lock(g_handles_mu);
      handle_ = g_next_handle++;
      g_handles[handle_] = file_;
    }
    return handle_;
  }

  // dst[0:n] = table bytes [start, start + n): loading a file, in chunks, into another tier.
  void read(int64_t start, int64_t n, const at::Tensor& dst) const {
    check_open();
    const int64_t total = nbytes();
    MOLE_CHECK_ARG(start >= 0 && n >= 0 && checked_add(start, n, "TableStore.read: end") <= total,
                   "TableStore.read: bytes [", start, ", +", n, ") are not inside the table's ", total, " bytes");
    MOLE_CHECK_ARG(dst.device().is_cpu() && dst.is_contiguous() && static_cast<int64_t>(dst.nbytes()) >= n,
                   "TableStore.read: dst must be a contiguous CPU tensor of at least ", n, " bytes");
    char* out = static_cast<char*>(dst.data_ptr());
    if (const std::shared_ptr<File> file = file_) {
      file->check_unchanged();
      file->read_exact(out, start, n);
      file->check_unchanged();
    } else {
      std::memcpy(out, static_cast<const char*>(bytes_.const_data_ptr()) + start, n);
    }
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
      .def("identity", &mole::TableStore::identity)
      .def("close", &mole::TableStore::close)
      .def("copy_rows", &mole::TableStore::copy_rows)
      .def("read_unique", &mole::TableStore::read_unique)
      .def("handle", &mole::TableStore::handle)
      .def("stage_rows", &mole::TableStore::stage_rows)
      .def("read", &mole::TableStore::read);
  m.def("host_allocations() -> int[]", &mole::host_allocations);
  m.def("dedupe_ids(Tensor ids, int V, bool strict) -> (Tensor, Tensor)", &mole::dedupe_ids);
}
