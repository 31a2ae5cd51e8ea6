#include "checkpoint/staging.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/errors.h"
#include "common/strided_copy.h"
#include "common/thread_pool.h"

namespace ichiban {

namespace {

// Copy work is cut into pieces of this size: large enough that per-task
// overhead is negligible, small enough to balance a few threads.
constexpr int64_t kPieceBytes = 4 << 20;

struct Piece {
  const char* src;
  char* dst;
  int64_t n;
};

void add_pieces(std::vector<Piece>& out, const char* src, char* dst, int64_t n) {
  for (int64_t off = 0; off < n; off += kPieceBytes)
    out.push_back({src + off, dst + off, std::min(kPieceBytes, n - off)});
}

void run_pieces(const std::vector<Piece>& pieces) {
  default_pool().parallel_for(pieces.size(), 1, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) std::memcpy(pieces[i].dst, pieces[i].src, pieces[i].n);
  });
}

}  // namespace

// Growth granularity: one transparent huge page, so every grown range can be
// backed by huge pages and the mapped size stays a multiple of the base page.
constexpr int64_t kGrowAlign = 2 << 20;

StagingArena::StagingArena(int64_t reserve_bytes) {
  ICHIBAN_CHECK_ARG(reserve_bytes > 0, "StagingArena: reserve_bytes must be > 0, got ", reserve_bytes);
  reserved_ = (reserve_bytes + kGrowAlign - 1) / kGrowAlign * kGrowAlign;
  void* p = ::mmap(nullptr, static_cast<size_t>(reserved_), PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ICHIBAN_CHECK(p != MAP_FAILED,
                sys_error("reserving " + std::to_string(reserved_) + " bytes of address space"));
  base_ = static_cast<char*>(p);
}

StagingArena::~StagingArena() {
  if (base_ != nullptr) ::munmap(base_, static_cast<size_t>(reserved_));
}

void StagingArena::grow(int64_t nbytes) {
  ICHIBAN_CHECK_ARG(nbytes >= 0 && nbytes <= reserved_, "StagingArena.grow: ", nbytes,
                    " bytes requested, ", reserved_, " reserved");
  const int64_t want = (nbytes + kGrowAlign - 1) / kGrowAlign * kGrowAlign;
  const int64_t end = std::min(want, reserved_);
  if (end <= size_) return;
  char* p = base_ + size_;
  const size_t len = static_cast<size_t>(end - size_);
  ICHIBAN_CHECK(::mprotect(p, len, PROT_READ | PROT_WRITE) == 0,
                sys_error("mapping " + std::to_string(len) + " staging bytes"));
  ::madvise(p, len, MADV_DONTFORK);
  // Huge pages are the caller's choice (ichiban_comm/checkpoint/_stager.py advises them): they
  // fill several times faster than base pages where the host has free huge pages and several
  // times slower where each needs a direct compaction (benchmarks/results/checkpoint_cpu2.md).
  size_ = end;
}

void StagingArena::prefault(int64_t offset, int64_t len) {
  ICHIBAN_CHECK_ARG(offset >= 0 && len >= 0 && offset + len <= size_, "StagingArena.prefault: [",
                    offset, ", +", len, ") outside the ", size_, " mapped bytes");
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  char* c = base_ + offset;
  const size_t pages = (static_cast<size_t>(len) + page - 1) / page;
  default_pool().parallel_for(pages, 256, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) c[i * page] = 0;
  });
}

int StagingArena::lock(int64_t offset, int64_t len) {
  ICHIBAN_CHECK_ARG(offset >= 0 && len >= 0 && offset + len <= size_, "StagingArena.lock: [",
                    offset, ", +", len, ") outside the ", size_, " mapped bytes");
  if (len == 0) return 0;
  return ::mlock(base_ + offset, static_cast<size_t>(len)) == 0 ? 0 : errno;
}

at::Tensor alloc_staging(int64_t nbytes) {
  ICHIBAN_CHECK_ARG(nbytes > 0, "alloc_staging: nbytes must be > 0, got ", nbytes);
  const size_t len = static_cast<size_t>(nbytes);
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ICHIBAN_CHECK(p != MAP_FAILED, sys_error("mmap of " + std::to_string(nbytes) + " staging bytes"));
  ::madvise(p, len, MADV_DONTFORK);
#ifdef MADV_HUGEPAGE
  ::madvise(p, len, MADV_HUGEPAGE);  // advisory: fewer faults and TLB misses when available
#endif
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  char* c = static_cast<char*>(p);
  const size_t pages = (len + page - 1) / page;
  default_pool().parallel_for(pages, 256, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) c[i * page] = 0;
  });
  return at::from_blob(
      p, {nbytes}, [len](void* q) { ::munmap(q, len); },
      at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

void stage_copy(const std::vector<at::Tensor>& srcs, at::Tensor pool,
                const std::vector<int64_t>& offsets) {
  ICHIBAN_CHECK_ARG(srcs.size() == offsets.size(), "stage_copy: ", srcs.size(), " tensors but ",
                    offsets.size(), " offsets");
  ICHIBAN_CHECK_ARG(pool.device().is_cpu() && pool.scalar_type() == at::kByte && pool.dim() == 1 &&
                        pool.is_contiguous(),
                    "stage_copy: pool must be a contiguous 1-D uint8 CPU tensor");
  char* base = static_cast<char*>(pool.data_ptr());
  const int64_t size = pool.numel();
  std::vector<Piece> pieces;
  std::vector<size_t> strided;
  for (size_t i = 0; i < srcs.size(); ++i) {
    const at::Tensor& t = srcs[i];
    ICHIBAN_CHECK_ARG(t.device().is_cpu(), "stage_copy: tensor ", i, " is on ", t.device(),
                      "; only CPU tensors are copied here");
    ICHIBAN_CHECK_ARG(t.layout() == at::kStrided, "stage_copy: tensor ", i,
                      " is not a dense (strided) tensor");
    const int64_t n = t.numel() * static_cast<int64_t>(t.element_size());
    ICHIBAN_CHECK_ARG(offsets[i] >= 0 && offsets[i] + n <= size, "stage_copy: tensor ", i,
                      " needs bytes [", offsets[i], ", +", n, ") of a pool of ", size);
    if (n == 0) continue;
    if (t.is_contiguous())
      add_pieces(pieces, static_cast<const char*>(t.data_ptr()), base + offsets[i], n);
    else
      strided.push_back(i);
  }
  run_pieces(pieces);
  for (size_t i : strided) {
    const at::Tensor& t = srcs[i];
    at::Tensor out = at::from_blob(base + offsets[i], {t.numel()},
                                   at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU));
    strided_gather(t, out);
  }
}

void copy_bytes(at::Tensor dst, const at::Tensor& src) {
  ICHIBAN_CHECK_ARG(dst.device().is_cpu() && src.device().is_cpu() && dst.is_contiguous() &&
                        src.is_contiguous(),
                    "copy_bytes: both tensors must be contiguous CPU tensors");
  const int64_t n = dst.numel() * static_cast<int64_t>(dst.element_size());
  ICHIBAN_CHECK_ARG(n == src.numel() * static_cast<int64_t>(src.element_size()),
                    "copy_bytes: dst has ", n, " bytes, src has ",
                    src.numel() * static_cast<int64_t>(src.element_size()));
  std::vector<Piece> pieces;
  add_pieces(pieces, static_cast<const char*>(src.data_ptr()), static_cast<char*>(dst.data_ptr()), n);
  run_pieces(pieces);
}

}  // namespace ichiban
