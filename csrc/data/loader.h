// The batch loader: worker threads pack samples of a TokenSource into batch
// buffers, `prefetch` batches ahead of the consumer, without the GIL.
//
// Sample s is tokens [s*T, s*T + T + 1) of the stream (inputs the first T,
// targets the last T). Global position p (samples consumed since the start of
// epoch 0, over all ranks) maps to sample first + perm_{seed, p / n}(p % n):
// the order depends on (seed, epoch) only, never on the number of ranks. Batch
// k of rank r of w holds positions start + k*B*w + r*B + [0, B).
//
// Buffers: batch k fills ring slot k % (prefetch + 2). A slot's tensors are handed
// out as aliases; a worker refills a slot in place only when its storage has no
// other owner (the consumer dropped every view), otherwise it allocates fresh
// buffers, so a batch the caller still holds is never overwritten.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/token_source.h"

namespace ichiban::data {

struct LoaderOptions {
  int64_t seq_len = 0;
  int64_t batch_size = 0;
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t first_sample = 0;  // the sample range [first, first + num_samples)
  int64_t num_samples = 0;
  uint64_t seed = 0;
  bool shuffle = true;
  int64_t start_position = 0;  // global samples consumed before batch 0
  int64_t prefetch = 2;
  int64_t threads = 1;
  bool pin_memory = false;
  bool documents = false;  // also fill position_ids and cu_seqlens
};

class BatchLoader {
 public:
  // doc_starts: sorted int64 global token offsets of document starts (needed
  // only with documents=true).
  BatchLoader(std::shared_ptr<TokenSource> source, LoaderOptions opt, at::Tensor doc_starts);
  ~BatchLoader();

  // The next batch: inputs, targets (B, T) int64, then with documents
  // position_ids (B, T) int64 and cu_seqlens (n,) int32. Call without the GIL,
  // from one thread. Takes a batch a worker has filled, waits for one being
  // filled, or fills an unclaimed one itself; rethrows a fill's error.
  std::vector<at::Tensor> next();
  int64_t batches_taken() const;
  // Buffers allocated because the consumer still held the previous ones.
  int64_t fresh_allocations() const;

  // Global position of row i of rank r's batch k, and the sample it maps to.
  int64_t sample_at(int64_t position) const;

 private:
  struct Slot {
    at::Tensor x, y, pos, cu;
    int64_t cu_len = 0;
    int64_t batch = -1;
    bool ready = false;
    std::string error;
  };
  void worker();
  void fill(Slot& slot, int64_t k, std::vector<int64_t>& row);
  at::Tensor alloc(at::IntArrayRef shape, at::ScalarType dtype) const;

  std::shared_ptr<TokenSource> src_;
  LoaderOptions opt_;
  at::Tensor doc_starts_;
  std::vector<Slot> slots_;
  mutable std::mutex mu_;
  std::condition_variable cv_ready_, cv_free_;
  int64_t next_fill_ = 0, next_take_ = 0;
  int64_t fresh_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// perm(i) for i in [0, n): the order of one epoch (for tests and tools).
at::Tensor sample_order(int64_t n, uint64_t seed, uint64_t epoch, bool shuffle);

}  // namespace ichiban::data
