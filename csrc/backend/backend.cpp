#include "backend/backend.h"

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdio>

#include "backend/tensor_utils.h"
#include "backend/work.h"
#include "common/errors.h"
#include "shm/wait.h"

namespace ichiban {

namespace {
std::atomic<int64_t> g_inter_bytes{0};

// A lone rank on its host never waits for anyone: a page is enough.
constexpr int64_t kLoneSlotBytes = 4096;
}  // namespace

int64_t global_inter_host_bytes() { return g_inter_bytes.load(); }

IchibanBackend::IchibanBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                               BackendConfig cfg, c10::intrusive_ptr<c10d::Backend> fallback,
                               c10::intrusive_ptr<c10d::Backend> inter, c10::intrusive_ptr<c10d::Backend> cuda)
    : c10d::Backend(rank, size), cfg_(std::move(cfg)), fallback_(std::move(fallback)), inter_(std::move(inter)),
      cuda_(std::move(cuda)) {
  ICHIBAN_CHECK_ARG(static_cast<int>(cfg_.host_of.size()) == size, "ichiban: host_of has ",
                    cfg_.host_of.size(), " entries, expected the group size ", size);
  if (cfg_.labels.empty())
    for (int p = 0; p < size; ++p) cfg_.labels.push_back(p);
  ICHIBAN_CHECK_ARG(static_cast<int>(cfg_.labels.size()) == size, "ichiban: labels must have ", size, " entries");
  ICHIBAN_CHECK_ARG(cfg_.slot_bytes >= 4096, "ichiban: slot_bytes must be >= 4096, got ", cfg_.slot_bytes);
  forced_ = parse_algo(cfg_.algo);

  const int host = cfg_.host_of[rank];
  nhosts_ = *std::max_element(cfg_.host_of.begin(), cfg_.host_of.end()) + 1;
  std::vector<int> members, labels;
  std::vector<int> per_host(nhosts_, 0);
  for (int p = 0; p < size; ++p) {
    ICHIBAN_CHECK_ARG(cfg_.host_of[p] >= 0, "ichiban: host_of[", p, "] is negative");
    per_host[cfg_.host_of[p]]++;
    if (cfg_.host_of[p] == host) {
      members.push_back(p);
      labels.push_back(cfg_.labels[p]);
    }
  }
  for (int c : per_host) uniform_hosts_ = uniform_hosts_ && c == per_host[0];
  const int nloc = static_cast<int>(members.size());
  const int li = static_cast<int>(std::find(members.begin(), members.end(), rank) - members.begin());
  const int64_t slot = nloc == 1 ? kLoneSlotBytes : (cfg_.slot_bytes + 4095) / 4096 * 4096;
  const size_t bytes = ShmComm::segment_bytes(nloc, static_cast<size_t>(slot));
  const std::string name = cfg_.shm_name + "_h" + std::to_string(host);
  const std::string key = "ichiban_shm_ready_h" + std::to_string(host);
  WaitPolicy policy;
  policy.spin_iters = cfg_.spin_iters;
  policy.yield_iters = cfg_.yield_iters;

  const bool creator = li == 0;
  std::unique_ptr<ShmSegment> seg;
  if (creator) {
    seg = std::make_unique<ShmSegment>(name, bytes, true);
  } else {
    try {
      store->wait({key}, cfg_.timeout);
    } catch (const std::exception& e) {
      ICHIBAN_CHECK(false, "ichiban: creating group '", cfg_.group_name, "': rank ", cfg_.labels[members[0]],
                    " never created the shared segment within the timeout (", e.what(), ")");
    }
    seg = std::make_unique<ShmSegment>(name, bytes, false);
  }
  comm_ = std::make_unique<ShmComm>(std::move(seg), creator, li, nloc, static_cast<size_t>(slot), policy,
                                    cfg_.group_name, labels);
  if (nloc > 1) {
    if (creator) store->set(key, std::vector<uint8_t>{1});
    shm_barrier(*comm_, deadline());  // everyone has mapped it
    comm_->setup_direct(cfg_.direct, cfg_.direct_min_bytes, deadline());
    comm_->setup_shared(cfg_.shared, deadline());
    if (cfg_.debug && cfg_.shared && !comm_->shared())
      std::fprintf(stderr, "[ichiban] group=%s rank=%d shared tensors not used: %s\n", cfg_.group_name.c_str(), rank_,
                   comm_->shared_declined().empty() ? "a peer declined" : comm_->shared_declined().c_str());
  }
  if (creator) comm_->segment().unlink_name();
  worker_ = std::thread([this] { loop(); });
}

IchibanBackend::~IchibanBackend() {
  try {
    shutdown();
  } catch (const std::exception& e) {  // a destructor must not throw (NCCL's shutdown can)
    std::fprintf(stderr, "[ichiban] group %s: shutting down: %s\n", cfg_.group_name.c_str(), e.what());
  }
  // Gloo's destructor joins threads that may need the GIL to drop tensors
  // that have Python objects: release it while our engines go away.
  auto drop = [this] {
    fallback_.reset();
    inter_.reset();
    cuda_.reset();
  };
  if (Py_IsInitialized() && PyGILState_Check()) {
    pybind11::gil_scoped_release no_gil;
    drop();
  } else {
    drop();
  }
}

c10::intrusive_ptr<c10d::Backend::Options> IchibanBackend::getBackendOptions() {
  auto o = c10::make_intrusive<Options>("ichiban", cfg_.timeout);
  o->group_name = cfg_.group_name;
  return o;
}

void IchibanBackend::shutdown() { stop(false); }

void IchibanBackend::abort() { stop(true); }

void IchibanBackend::stop(bool abort) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  // The worker may need the GIL to finish (dropping a tensor that has a Python object
  // does), and NCCL's shutdown waits for its kernels: never hold the GIL meanwhile.
  auto finish = [&] {
    if (worker_.joinable()) {
      if (worker_.get_id() == std::this_thread::get_id()) {
        worker_.detach();  // the last reference was dropped by our own job
      } else {
        worker_.join();
      }
    }
    // The NCCL group's own shutdown, as destroy_process_group() gives a plain NCCL group;
    // without it NCCL warns at exit that the group was never destroyed.
    if (cuda_) std::call_once(cuda_closed_, [&] { abort ? cuda_->abort() : cuda_->shutdown(); });
  };
  if (Py_IsInitialized() && PyGILState_Check()) {
    pybind11::gil_scoped_release no_gil;
    finish();
  } else {
    finish();
  }
}

void IchibanBackend::loop() {
  while (true) {
    std::function<void()> job;
    // Idle: the wait policy's yields before sleeping on cv_, as the
    // shared-memory waits do (shm/wait.h), so an op queued meanwhile is taken
    // without a wake-up. With Work::wait's yields, 8 B async_op=True + wait(),
    // groups of both policies interleaved in one run: 2 ranks 10.2 against
    // 11.9 us (2 yields), 4 ranks 54 against 76 us.
    yield_until(cfg_.yield_iters, [&] { return queued_.load(std::memory_order_acquire) > 0; });
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] {
        wakeups_.fetch_add(1, std::memory_order_relaxed);
        return (stop_ && !busy_) || (!queue_.empty() && !busy_);
      });
      if (queue_.empty()) return;  // stop_ and drained
      job = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1, std::memory_order_relaxed);
      busy_ = true;
    }
    job();
    {
      std::lock_guard<std::mutex> lk(mu_);
      busy_ = false;
    }
  }
}

IchibanBackend::WorkPtr IchibanBackend::submit(bool may_inline, c10d::OpType type, const char* name,
                                               std::vector<at::Tensor> outputs, std::function<void()> body) {
  auto work = c10::make_intrusive<IchibanWork>(rank_, type, ++seq_, std::move(outputs), cfg_.yield_iters);
  auto job = [work, body = std::move(body)]() {
    std::exception_ptr err;
    try {
      at::NoGradGuard no_grad;  // outputs may be leaves that require grad
      body();
    } catch (...) {
      err = std::current_exception();
    }
    work->complete(err);
  };
  {
    std::unique_lock<std::mutex> lk(mu_);
    ICHIBAN_CHECK(!stop_, "ichiban: ", name, " on group '", cfg_.group_name, "' after the group was shut down");
    if (!(may_inline && queue_.empty() && !busy_)) {
      queue_.push_back(std::move(job));
      queued_.fetch_add(1, std::memory_order_release);
      lk.unlock();
      cv_.notify_one();
      return work;
    }
    busy_ = true;
  }
  job();
  bool queued;
  {
    std::lock_guard<std::mutex> lk(mu_);
    busy_ = false;
    queued = !queue_.empty() || stop_;
  }
  // Ops queued meanwhile by other threads (or a shutdown) wait for the worker.
  // Waking it for nothing costs a system call and, with ranks on every core,
  // a context switch on a core a peer needs.
  if (queued) cv_.notify_all();
  return work;
}

void IchibanBackend::require_fallback(const char* op) const {
  ICHIBAN_CHECK(fallback_, "ichiban: ", op, " on group '", cfg_.group_name,
                "' needs the Gloo fallback group, which this group was created without");
}

Algo IchibanBackend::choose_allreduce(int64_t bytes) const {
  if (multi_host()) {
    if (forced_ == Algo::kFlat) return Algo::kFlat;
    return (uniform_hosts_ && inter_) ? Algo::kHier : Algo::kFlat;
  }
  switch (forced_) {
    case Algo::kAuto: break;
    case Algo::kHier: return Algo::kTwoShot;  // one host: the intra-host part is all there is
    default: return forced_;
  }
  return bytes <= cfg_.oneshot_max_bytes ? Algo::kOneShot : Algo::kTwoShot;
}

void IchibanBackend::log(const char* op, const char* algo, int64_t bytes, std::chrono::steady_clock::time_point t0) const {
  if (!cfg_.debug) return;
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "[ichiban] group=%s rank=%d %s algo=%s bytes=%lld us=%lld\n", cfg_.group_name.c_str(),
               rank_, op, algo, static_cast<long long>(bytes), static_cast<long long>(us));
}

// Runs on the progress thread; t is contiguous.
void IchibanBackend::allreduce_now(at::Tensor& t, RedOp op, const char* name) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto dt = t.scalar_type();
  const int64_t count = t.numel();
  const int64_t es = t.element_size();
  const int avg = op == RedOp::kAvg ? size_ : 1;
  Algo algo = choose_allreduce(count * es);
  if (algo == Algo::kHier && dt == c10::kBool) algo = Algo::kFlat;  // Gloo's bool all-reduce is the reference
  if (algo == Algo::kFlat) {
    require_fallback(name);
    std::vector<at::Tensor> v{t};
    c10d::AllreduceOptions o;
    o.reduceOp = to_c10d(op);
    fallback_->allreduce(v, o)->wait();
    if (op == RedOp::kAvg) t.div_(size_);
  } else if (algo == Algo::kHier) {
    const int nl = comm_->size();
    const int64_t per = (count + nl - 1) / nl;
    // (nl, per): padded so that every local rank owns an equal shard.
    at::Tensor full = count == nl * per ? t : at::zeros({nl * per}, t.options());
    if (!full.is_same(t)) full.narrow(0, 0, count).copy_(t.view({count}));
    at::Tensor shard = at::empty({per}, t.options());
    const RedOp local = op == RedOp::kAvg ? RedOp::kSum : op;
    shm_reduce_scatter(*comm_, full.data_ptr(), shard.data_ptr(), per, dt, local, 1, deadline());
    std::vector<at::Tensor> v{shard};
    c10d::AllreduceOptions o;
    o.reduceOp = to_c10d(local);
    inter_->allreduce(v, o)->wait();
    inter_bytes_ += per * es;
    g_inter_bytes += per * es;
    if (op == RedOp::kAvg) {
      const void* src = shard.data_ptr();
      reduce_n(dt, RedOp::kAvg, shard.data_ptr(), &src, 1, per, size_);
    }
    shm_allgather(*comm_, shard.data_ptr(), full.data_ptr(), per * es, deadline());
    if (!full.is_same(t)) t.view({count}).copy_(full.narrow(0, 0, count));
  } else {
    if (shm_allreduce(*comm_, algo, t.data_ptr(), count, dt, op, avg, deadline())) {
      log(name, "inplace", count * es, t0);
      return;
    }
  }
  log(name, algo_name(algo), count * es, t0);
}

}  // namespace ichiban
