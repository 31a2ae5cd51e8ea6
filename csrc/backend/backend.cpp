#include "backend/backend.h"

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <sched.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>

#include "backend/tensor_utils.h"
#include "backend/work.h"
#include "common/env.h"
#include "common/errors.h"
#include "shm/arena.h"
#include "shm/wait.h"

namespace ichiban {

namespace {
std::atomic<int64_t> g_inter_bytes{0};

// A lone rank on its host never waits for anyone: a page is enough.
constexpr int64_t kLoneSlotBytes = 4096;
}  // namespace

int64_t global_inter_host_bytes() { return g_inter_bytes.load(); }

void BackendConfig::fill_from_env() {
  slot_bytes = env_int("ICHIBAN_SHM_SLOT_BYTES", slot_bytes);
  oneshot_max_bytes = env_int("ICHIBAN_ONESHOT_MAX_BYTES", oneshot_max_bytes);
  algo = env_str("ICHIBAN_ALGO", algo);
  for (auto& ch : algo) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  debug = env_flag("ICHIBAN_DEBUG", debug);
  const std::string spin = env_str("ICHIBAN_SPIN");
  if (!spin.empty()) {
    char* end = nullptr;
    const long polls = std::strtol(spin.c_str(), &end, 10);
    long yields = yield_iters;
    bool ok = end != spin.c_str() && polls >= 0;
    if (ok && *end == ',') {
      const char* y = end + 1;
      yields = std::strtol(y, &end, 10);
      ok = end != y && yields >= 0;
    }
    ICHIBAN_CHECK_ARG(ok && *end == '\0', "environment variable ICHIBAN_SPIN='", spin,
                      "': expected 'polls' or 'polls,yields' (non-negative integers)");
    spin_iters = static_cast<int>(polls);
    yield_iters = static_cast<int>(yields);
  }
  direct = env_flag("ICHIBAN_CMA", direct);
  direct_min_bytes = env_int("ICHIBAN_CMA_MIN_BYTES", direct_min_bytes);
  nccl = !env_flag("ICHIBAN_NO_NCCL", !nccl);
  liveness = env_str("ICHIBAN_LIVENESS", liveness);
  heartbeat_ms = env_int("ICHIBAN_HEARTBEAT_MS", heartbeat_ms);
  shared = shared || arena_enabled();
}

int BackendConfig::spin_for(int local_size) const {
  if (spin_iters >= 0) return spin_iters;
  cpu_set_t set;
  int cores = static_cast<int>(std::thread::hardware_concurrency());
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cores = CPU_COUNT(&set);
  return local_size > std::max(1, cores) ? 20 : 200;
}

IchibanBackend::IchibanBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                               BackendConfig cfg, c10::intrusive_ptr<c10d::Backend> fallback,
                               c10::intrusive_ptr<c10d::Backend> inter, Factory make_cuda)
    : c10d::Backend(rank, size), cfg_(std::move(cfg)), fallback_(std::move(fallback)), inter_(std::move(inter)),
      make_cuda_(std::move(make_cuda)), store_(store) {
  ICHIBAN_CHECK_ARG(static_cast<int>(cfg_.host_of.size()) == size, "ichiban: host_of has ",
                    cfg_.host_of.size(), " entries, expected the group size ", size);
  if (cfg_.labels.empty())
    for (int p = 0; p < size; ++p) cfg_.labels.push_back(p);
  ICHIBAN_CHECK_ARG(static_cast<int>(cfg_.labels.size()) == size, "ichiban: labels must have ", size, " entries");
  ICHIBAN_CHECK_ARG(cfg_.slot_bytes >= 4096, "ichiban: slot_bytes must be >= 4096, got ", cfg_.slot_bytes);
  ICHIBAN_CHECK_ARG(cfg_.liveness == "auto" || cfg_.liveness == "pid" || cfg_.liveness == "heartbeat",
                    "ichiban: liveness must be 'auto', 'pid' or 'heartbeat', got '", cfg_.liveness, "'");
  forced_ = parse_algo(cfg_.algo);
  const int host = cfg_.host_of[rank];
  nhosts_ = *std::max_element(cfg_.host_of.begin(), cfg_.host_of.end()) + 1;
  std::vector<int> per_host(nhosts_, 0);
  for (int p = 0; p < size; ++p) {
    ICHIBAN_CHECK_ARG(cfg_.host_of[p] >= 0, "ichiban: host_of[", p, "] is negative");
    per_host[cfg_.host_of[p]]++;
  }
  for (int c : per_host) uniform_hosts_ = uniform_hosts_ && c == per_host[0];
  local_size_ = per_host[host];
  worker_ = std::thread([this] { loop(); });
}

// The host's segment: created by the first CPU op rather than with the group,
// so a group that only moves CUDA tensors (or none) holds no /dev/shm pages.
// Runs on the thread that runs ops, so it is serialised like them; every
// member reaches it in its first CPU op, which is collective.
void IchibanBackend::ensure_comm() {
  if (comm_) return;
  const int host = cfg_.host_of[rank_];
  std::vector<int> members, labels;
  for (int p = 0; p < size_; ++p) {
    if (cfg_.host_of[p] == host) {
      members.push_back(p);
      labels.push_back(cfg_.labels[p]);
    }
  }
  const int nloc = static_cast<int>(members.size());
  const int li = static_cast<int>(std::find(members.begin(), members.end(), rank_) - members.begin());
  const int64_t slot = nloc == 1 ? kLoneSlotBytes : (cfg_.slot_bytes + 4095) / 4096 * 4096;
  const size_t bytes = ShmComm::segment_bytes(nloc, static_cast<size_t>(slot));
  const std::string name = cfg_.shm_name + "_h" + std::to_string(host);
  const std::string key = "ichiban_shm_ready_h" + std::to_string(host);
  WaitPolicy policy;
  policy.spin_iters = cfg_.spin_for(nloc);
  policy.yield_iters = cfg_.yield_iters;

  const bool creator = li == 0;
  std::unique_ptr<ShmSegment> seg;
  if (creator) {
    seg = std::make_unique<ShmSegment>(name, bytes, true);
  } else {
    try {
      store_->wait({key}, cfg_.timeout);
    } catch (const std::exception& e) {
      throw_dist_error(c10::str("ichiban: creating the shared segment of group '", cfg_.group_name, "': rank ",
                                cfg_.labels[members[0]], " never created the shared segment within the timeout (",
                                e.what(), ")"));
    }
    seg = std::make_unique<ShmSegment>(name, bytes, false);
  }
  auto comm = std::make_unique<ShmComm>(std::move(seg), creator, li, nloc, static_cast<size_t>(slot), policy,
                                        cfg_.group_name, labels);
  comm->set_abort_flag(&aborted_);
  if (nloc > 1) {
    if (creator) store_->set(key, std::vector<uint8_t>{1});
    shm_barrier(*comm, deadline());  // everyone has mapped it
    comm->setup_liveness(cfg_.liveness, cfg_.heartbeat_ms);
    comm->setup_direct(cfg_.direct, cfg_.direct_min_bytes, deadline());
    comm->setup_shared(cfg_.shared, deadline());
    if (cfg_.debug && cfg_.shared && !comm->shared())
      std::fprintf(stderr, "[ichiban] group=%s rank=%d shared tensors not used: %s\n", cfg_.group_name.c_str(), rank_,
                   comm->shared_declined().empty() ? "a peer declined" : comm->shared_declined().c_str());
  }
  if (creator) comm->segment().unlink_name();
  comm_ = std::move(comm);
}

c10d::Backend* IchibanBackend::cuda() {
  if (!cuda_made_.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lk(cuda_mu_);
    if (!cuda_made_.load()) {
      ICHIBAN_CHECK(!stop_, "ichiban: a CUDA op on group '", cfg_.group_name, "' after the group was shut down");
      cuda_ = make_cuda_();
      ICHIBAN_CHECK(cuda_, "ichiban: group '", cfg_.group_name, "': the NCCL group could not be created");
      cuda_made_.store(true, std::memory_order_release);
    }
  }
  return cuda_.get();
}

IchibanBackend::~IchibanBackend() {
  try {
    shutdown();
  } catch (const std::exception& e) {  // a destructor must not throw (NCCL's shutdown can)
    std::fprintf(stderr, "[ichiban] group %s: shutting down: %s\n", cfg_.group_name.c_str(), e.what());
  }
  // Gloo's destructor joins threads that may need the GIL to drop tensors
  // that have Python objects: release it while our engines go away (the
  // NCCL factory holds a Python callable and takes the GIL itself).
  auto drop = [this] {
    fallback_.reset();
    inter_.reset();
    cuda_.reset();
    make_cuda_ = nullptr;
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
  // Every shared-memory wait checks the flag after each sleep slice, so an op
  // stuck on a stopped or lost peer gives up at once, and queued ops fail
  // without starting.
  if (abort) aborted_.store(true, std::memory_order_release);
  cv_.notify_all();
  // The worker may need the GIL to finish (dropping a tensor that has a Python object
  // does), and NCCL's shutdown waits for its kernels: never hold the GIL meanwhile.
  auto finish = [&] {
    // The NCCL group's own shutdown, as destroy_process_group() gives a plain NCCL group
    // (without it NCCL warns at exit that the group was never destroyed). An abort goes
    // first: a progress thread blocked in a NCCL wait returns only once NCCL is aborted.
    auto close_cuda = [&] {
      if (cuda_made_.load()) std::call_once(cuda_closed_, [&] { abort ? cuda_->abort() : cuda_->shutdown(); });
    };
    if (abort) close_cuda();
    if (worker_.joinable()) {
      if (worker_.get_id() == std::this_thread::get_id()) {
        worker_.detach();  // the last reference was dropped by our own job
      } else {
        worker_.join();
      }
    }
    close_cuda();
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
    // without a wake-up.
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
      runner_ = std::this_thread::get_id();
    }
    job();
    {
      std::lock_guard<std::mutex> lk(mu_);
      busy_ = false;
      runner_ = std::thread::id();
    }
  }
}

void IchibanBackend::run_nested(std::function<void()> job) {
  // Called with busy_ set by this very thread (we are inside a job's Future
  // callback): nobody else may run ops meanwhile, and the ops queued before
  // this one must run first to keep the issue order.
  while (true) {
    std::function<void()> next;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (queue_.empty()) break;
      next = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1, std::memory_order_relaxed);
    }
    next();
  }
  job();
}

IchibanBackend::WorkPtr IchibanBackend::submit(bool may_inline, c10d::OpType type, const char* name,
                                               std::vector<at::Tensor> outputs, std::function<void()> body) {
  const uint64_t seq = ++seq_;
  auto work = c10::make_intrusive<IchibanWork>(rank_, type, seq, std::move(outputs), cfg_.yield_iters);
  auto job = [this, work, seq, name, body = std::move(body)]() {
    std::exception_ptr err;
    try {
      ICHIBAN_DIST_CHECK(!aborted_.load(std::memory_order_acquire), "ichiban: ", name, " (sequence number ", seq,
                         ") on group '", cfg_.group_name, "' was aborted before it started");
      at::NoGradGuard no_grad;  // outputs may be leaves that require grad
      ensure_comm();
      comm_->set_seq(seq);
      body();
    } catch (const c10::DistBackendError&) {
      err = std::current_exception();
    } catch (const std::exception& e) {
      // Whatever failed underneath (Gloo between hosts, a segment that could
      // not be made), the caller sees the backend error torch's own backends raise.
      const auto* ce = dynamic_cast<const c10::Error*>(&e);
      err = std::make_exception_ptr(c10::DistBackendError(
          c10::str("ichiban: ", name, " (sequence number ", seq, ") on group '", cfg_.group_name, "' failed: ",
                   ce ? ce->what_without_backtrace() : e.what()),
          nullptr));
    }
    work->complete(err);
  };
  {
    std::unique_lock<std::mutex> lk(mu_);
    ICHIBAN_DIST_CHECK(!stop_, "ichiban: ", name, " on group '", cfg_.group_name, "' after the group was ",
                       aborted_.load() ? "aborted" : "shut down");
    if (busy_ && runner_ == std::this_thread::get_id()) {
      // Issued from a Future callback on the thread running ops (DDP's
      // PowerSGD hook waits on its own all_reduce there): queued, it would
      // wait for this very thread.
      lk.unlock();
      run_nested(std::move(job));
      return work;
    }
    if (!(may_inline && queue_.empty() && !busy_)) {
      queue_.push_back(std::move(job));
      queued_.fetch_add(1, std::memory_order_release);
      lk.unlock();
      cv_.notify_one();
      return work;
    }
    busy_ = true;
    runner_ = std::this_thread::get_id();
  }
  const auto t_inline = std::chrono::steady_clock::now();
  job();
  IchibanWork::add_thread_blocked_ns(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t_inline).count());
  bool queued;
  {
    std::lock_guard<std::mutex> lk(mu_);
    busy_ = false;
    runner_ = std::thread::id();
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
