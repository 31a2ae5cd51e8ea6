#include "data/loader.h"

#include <algorithm>
#include <chrono>
#include <exception>

#include "common/errors.h"
#include "data/feistel.h"

namespace ichiban::data {

BatchLoader::BatchLoader(std::shared_ptr<TokenSource> source, LoaderOptions opt, at::Tensor doc_starts)
    : src_(std::move(source)), opt_(opt), doc_starts_(std::move(doc_starts)) {
  ICHIBAN_CHECK_ARG(opt_.seq_len >= 1, "seq_len must be >= 1, got ", opt_.seq_len);
  ICHIBAN_CHECK_ARG(opt_.batch_size >= 1, "batch_size must be >= 1, got ", opt_.batch_size);
  ICHIBAN_CHECK_ARG(opt_.world_size >= 1 && opt_.rank >= 0 && opt_.rank < opt_.world_size,
                    "rank must be in [0, world_size), got rank ", opt_.rank, " of ", opt_.world_size);
  ICHIBAN_CHECK_ARG(opt_.num_samples >= 1, "num_samples must be >= 1");
  ICHIBAN_CHECK_ARG(opt_.first_sample >= 0 &&
                        (opt_.first_sample + opt_.num_samples) * opt_.seq_len + 1 <= src_->num_tokens(),
                    "sample range past the end of the token stream");
  ICHIBAN_CHECK_ARG(opt_.prefetch >= 1, "prefetch must be >= 1, got ", opt_.prefetch);
  ICHIBAN_CHECK_ARG(opt_.threads >= 0, "threads must be >= 0, got ", opt_.threads);  // 0: next() packs
  ICHIBAN_CHECK_ARG(opt_.start_position >= 0, "start position must be >= 0");
  if (opt_.documents) {
    ICHIBAN_CHECK_ARG(doc_starts_.defined() && doc_starts_.dim() == 1 &&
                          doc_starts_.scalar_type() == at::kLong && doc_starts_.is_contiguous() &&
                          doc_starts_.numel() >= 1,
                      "documents=true needs doc_starts, a contiguous 1-D int64 tensor");
  }
  // Two slots more than prefetch: one for the batch the caller is using, one for
  // the batch it still holds while next() hands it the following one. Workers
  // then refill only slots the caller has let go in the usual loop, and reuse them.
  slots_.resize(static_cast<size_t>(opt_.prefetch + 2));
  for (int64_t i = 0; i < opt_.threads; ++i) threads_.emplace_back([this] { worker(); });
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_free_.notify_all();
  cv_ready_.notify_all();
  for (auto& t : threads_) t.join();
}

at::Tensor BatchLoader::alloc(at::IntArrayRef shape, at::ScalarType dtype) const {
  return at::empty(shape, at::TensorOptions().dtype(dtype).pinned_memory(opt_.pin_memory));
}

int64_t BatchLoader::sample_at(int64_t position) const {
  const uint64_t n = static_cast<uint64_t>(opt_.num_samples);
  const uint64_t epoch = static_cast<uint64_t>(position) / n;
  const uint64_t i = static_cast<uint64_t>(position) % n;
  const uint64_t j = opt_.shuffle ? Feistel(n, opt_.seed, epoch)(i) : i;
  return opt_.first_sample + static_cast<int64_t>(j);
}

namespace {
bool exclusive(const at::Tensor& t) { return t.defined() && t.storage().use_count() == 1; }

// A new tensor over t's storage (contiguous, `sizes`), built without a trip
// through the dispatcher: next() is on the training thread's critical path.
at::Tensor share(const at::Tensor& t, at::IntArrayRef sizes) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(t.storage()), t.key_set(), t.dtype());
  impl->set_sizes_contiguous(sizes);
  return at::Tensor(std::move(impl));
}
}  // namespace

void BatchLoader::fill(Slot& slot, int64_t k, std::vector<int64_t>& row) {
  const int64_t B = opt_.batch_size, T = opt_.seq_len;
  // Reuse the slot's buffers only when nobody else holds them (see loader.h).
  bool fresh = false;
  if (!exclusive(slot.x)) slot.x = alloc({B, T}, at::kLong), fresh = true;
  if (!exclusive(slot.y)) slot.y = alloc({B, T}, at::kLong), fresh = true;
  if (opt_.documents) {
    if (!exclusive(slot.pos)) slot.pos = alloc({B, T}, at::kLong), fresh = true;
    if (!exclusive(slot.cu)) slot.cu = alloc({B * T + 1}, at::kInt), fresh = true;
  }
  if (fresh && k >= static_cast<int64_t>(slots_.size())) {
    std::lock_guard<std::mutex> lock(mu_);
    ++fresh_;
  }
  int64_t* x = slot.x.data_ptr<int64_t>();
  int64_t* y = slot.y.data_ptr<int64_t>();
  int64_t* pos = opt_.documents ? slot.pos.data_ptr<int64_t>() : nullptr;
  int32_t* cu = opt_.documents ? slot.cu.data_ptr<int32_t>() : nullptr;
  int64_t cu_len = 0;
  if (cu) cu[cu_len++] = 0;
  const int64_t base = opt_.start_position + k * B * opt_.world_size + opt_.rank * B;
  const int64_t* starts = opt_.documents ? doc_starts_.data_ptr<int64_t>() : nullptr;
  const int64_t n_docs = opt_.documents ? doc_starts_.numel() : 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t s = sample_at(base + i);
    const int64_t a = s * T;
    src_->read(a, T + 1, row.data());
    std::copy(row.begin(), row.begin() + T, x + i * T);
    std::copy(row.begin() + 1, row.begin() + T + 1, y + i * T);
    if (pos) {
      // d: the document holding token a (the last start <= a).
      int64_t d = std::upper_bound(starts, starts + n_docs, a) - starts - 1;
      int64_t p = d >= 0 ? a - starts[d] : a;
      for (int64_t j = 0; j < T; ++j) {
        if (d + 1 < n_docs && a + j == starts[d + 1]) {
          ++d;
          p = 0;
          if (j > 0) cu[cu_len++] = static_cast<int32_t>(i * T + j);
        }
        pos[i * T + j] = p++;
      }
      cu[cu_len++] = static_cast<int32_t>((i + 1) * T);
    }
  }
  slot.cu_len = cu_len;
}

void BatchLoader::worker() {
  std::vector<int64_t> row(static_cast<size_t>(opt_.seq_len + 1));
  for (;;) {
    int64_t k;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // An idle worker checks for a free slot every millisecond instead of being
      // woken by next(): a wake-up there costs the training thread a syscall and
      // often its core; a millisecond of refill latency costs nothing while
      // `prefetch` batches are ready. When next() finds its batch unclaimed (the
      // consumer has caught up) it fills that batch itself and wakes the workers.
      while (!stop_ && next_fill_ >= next_take_ + opt_.prefetch) {
        cv_free_.wait_for(lock, std::chrono::milliseconds(1));
      }
      if (stop_) return;
      k = next_fill_++;
    }
    Slot& slot = slots_[static_cast<size_t>(k) % slots_.size()];
    std::string error;
    try {
      fill(slot, k, row);
    } catch (const std::exception& e) {
      error = e.what();
      const auto nl = error.find("\nException raised from");  // drop c10's C++ backtrace
      if (nl != std::string::npos) error.resize(nl);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      slot.batch = k;
      slot.error = std::move(error);
      slot.ready = true;
    }
    cv_ready_.notify_all();
  }
}

std::vector<at::Tensor> BatchLoader::next() {
  std::unique_lock<std::mutex> lock(mu_);
  const int64_t k = next_take_;
  Slot& slot = slots_[static_cast<size_t>(k) % slots_.size()];
  if (!(slot.ready && slot.batch == k) && next_fill_ <= k) {
    // Caught up, and no worker has claimed batch k (on a busy host they may not
    // have been scheduled): fill it here rather than wait for one to run, so the
    // worst case is packing one batch inline. Workers go on with the next ones.
    next_fill_ = k + 1;
    lock.unlock();
    cv_free_.notify_all();
    std::vector<int64_t> row(static_cast<size_t>(opt_.seq_len + 1));
    std::string error;
    try {
      fill(slot, k, row);
    } catch (const std::exception& e) {
      error = e.what();
      const auto nl = error.find("\nException raised from");
      if (nl != std::string::npos) error.resize(nl);
    }
    lock.lock();
    slot.batch = k;
    slot.error = std::move(error);
    slot.ready = true;
  }
  cv_ready_.wait(lock, [&] { return stop_ || (slot.ready && slot.batch == k); });
  ICHIBAN_CHECK(!stop_, "loader stopped");
  // An error stays: the loader is done after it (every later call repeats it).
  ICHIBAN_CHECK(slot.error.empty(), slot.error);
  // Aliases: new TensorImpls over the slot's storages, so the slot can tell
  // (storage use count) when the caller has dropped every view.
  std::vector<at::Tensor> out{share(slot.x, slot.x.sizes()), share(slot.y, slot.y.sizes())};
  if (opt_.documents) {
    out.push_back(share(slot.pos, slot.pos.sizes()));
    out.push_back(share(slot.cu, {slot.cu_len}));
  }
  slot.ready = false;
  ++next_take_;
  return out;  // no wake-up here: idle workers poll (see worker())
}

int64_t BatchLoader::batches_taken() const {
  std::lock_guard<std::mutex> lock(mu_);
  return next_take_;
}

int64_t BatchLoader::fresh_allocations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return fresh_;
}

at::Tensor sample_order(int64_t n, uint64_t seed, uint64_t epoch, bool shuffle) {
  ICHIBAN_CHECK_ARG(n >= 1, "n must be >= 1, got ", n);
  at::Tensor out = at::empty({n}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  const Feistel f(static_cast<uint64_t>(n), seed, epoch);
  for (int64_t i = 0; i < n; ++i) p[i] = shuffle ? static_cast<int64_t>(f(static_cast<uint64_t>(i))) : i;
  return out;
}

}  // namespace ichiban::data
