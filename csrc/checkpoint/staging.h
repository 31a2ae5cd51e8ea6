// The snapshot: host memory for the staging pool and the C++ copy into it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ichiban {

// nbytes of page-aligned host memory as a 1-D uint8 tensor that owns it.
// Pages are touched by the thread pool up front (the first snapshot must not
// pay page faults) and marked MADV_DONTFORK (a forked child never shares or
// copies them; once pinned by the CUDA driver they must stay in one process).
at::Tensor alloc_staging(int64_t nbytes);

// Staging memory that grows in place: a range of virtual addresses is reserved
// up front (PROT_NONE, no commit charge) and made read-write from its start as
// the pool grows, so a state that grows by 10 % maps, faults and pins 10 % more
// while every byte already staged keeps its address (and its pinning). Pages
// are MADV_DONTFORK (a forked child never shares them; once pinned by the CUDA
// driver they must stay in one process); huge pages are the caller's choice
// (see grow() in staging.cpp). grow() does not touch the new
// pages: the first copy into them faults them in on the copier threads, which
// is the cheapest way to fill fresh memory; prefault() touches them ahead of time.
class StagingArena {
 public:
  explicit StagingArena(int64_t reserve_bytes);
  ~StagingArena();
  StagingArena(const StagingArena&) = delete;
  StagingArena& operator=(const StagingArena&) = delete;

  int64_t reserved() const { return reserved_; }
  int64_t size() const { return size_; }
  char* base() const { return base_; }
  // Makes [0, nbytes) read-write (rounded up to whole huge pages); never shrinks.
  void grow(int64_t nbytes);
  // Touches every page of [offset, offset + len) on the thread pool.
  void prefault(int64_t offset, int64_t len);
  // mlock of [offset, offset + len): 0 or the errno.
  int lock(int64_t offset, int64_t len);

 private:
  char* base_ = nullptr;
  int64_t reserved_ = 0;
  int64_t size_ = 0;
};

// Copies each CPU tensor srcs[i] (any strides, any dtype) into
// pool[offsets[i] : offsets[i] + nbytes(srcs[i])) in row-major order. Contiguous
// tensors are cut into pieces spread over the thread pool; strided ones go
// through strided_gather. Call without the GIL.
void stage_copy(const std::vector<at::Tensor>& srcs, at::Tensor pool,
                const std::vector<int64_t>& offsets);

// Parallel memcpy of a contiguous CPU tensor's bytes into another of the same size.
void copy_bytes(at::Tensor dst, const at::Tensor& src);

}  // namespace ichiban
