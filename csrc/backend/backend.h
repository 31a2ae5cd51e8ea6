// The c10d::Backend registered as "ichiban" (CPU tensors).
//
// Every collective is validated on the caller's thread, then queued to one
// progress thread per group: ops run in issue order, several may be in
// flight, Work/Future complete from that thread. Inside a host the ranks talk
// through a shared segment (shm/comm.h, collectives/algorithms.h); a group
// that spans hosts runs all-reduce hierarchically (intra-host reduce-scatter,
// inter-host all-reduce of each shard through `inter`, a Gloo group of the
// ranks with the same local index, intra-host all-gather) and every other op
// through `fallback`, a Gloo group over the whole group. send/recv always go
// to `fallback` directly (they must not queue behind collectives).
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "collectives/algorithms.h"
#include "shm/comm.h"

namespace ichiban {

// The settings of one group: IchibanOptions in Python is this struct, bound.
// The defaults below are the only ones; fill_from_env() overrides them from
// ICHIBAN_* variables (a settings object made in Python starts from that),
// and what the caller sets on the object wins over both. The first block is
// filled per group by the creator (ichiban_comm/distributed/backend.py).
struct BackendConfig {
  std::string group_name;        // in every error message
  std::string shm_name;          // unique per job and group; "_h<host>" is appended
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
  std::vector<int> host_of;      // group rank -> host index (hosts numbered from 0)
  std::vector<int> labels;       // group rank -> rank shown in errors

  // 256 KiB per rank and buffer: a unit of work (the caller's chunk plus n
  // slots, two buffers alternating) stays inside one core's L2, so the
  // reduction reads back from cache what the copy-in just wrote, while each
  // barrier is still amortised over a slot's worth of copying. Larger slots
  // pay off only where L2 is larger (benchmarks/results/collectives_*.md).
  int64_t slot_bytes = 256 << 10;         // ICHIBAN_SHM_SLOT_BYTES
  int64_t oneshot_max_bytes = -1;         // ICHIBAN_ONESHOT_MAX_BYTES; -1: the cost model (cost.py) decides
  std::string algo = "auto";              // ICHIBAN_ALGO: auto, oneshot, twoshot, ring, hier, flat
  bool debug = false;                     // ICHIBAN_DEBUG: one line per op (algo, bytes, microseconds)
  // Busy polls and sched_yield rounds before a waiter sleeps on the futex
  // (shm/wait.h). A short spin: a long one holds the core a peer needs. -1:
  // 200 polls, or 20 when the host's ranks outnumber its cores (a yield hands
  // the core straight to a runnable peer, a sleep leaves it idle until a
  // wake-up).
  int spin_iters = -1;                    // ICHIBAN_SPIN="polls[,yields]"
  int yield_iters = 50;
  bool direct = true;                     // ICHIBAN_CMA: single-copy reads between ranks if every member can
  // Below this per-peer block size the system call per block costs more than
  // the second copy saves.
  int64_t direct_min_bytes = 256 << 10;   // ICHIBAN_CMA_MIN_BYTES
  bool shared = false;                    // read peers' host-shared tensors in place (shm/arena.h); on
                                          // when the shared-tensor allocator is installed
  bool nccl = true;                       // ICHIBAN_NO_NCCL=1 turns off: CUDA tensors are refused, no CUDA call
  std::string liveness = "auto";          // ICHIBAN_LIVENESS: auto, pid, heartbeat (shm/comm.h)
  int64_t heartbeat_ms = 5000;            // ICHIBAN_HEARTBEAT_MS: a peer silent this long is gone

  void fill_from_env();
  int spin_for(int local_size) const;     // spin_iters, with -1 resolved for this host
};

class IchibanBackend : public c10d::Backend {
 public:
  using WorkPtr = c10::intrusive_ptr<c10d::Work>;

  using Factory = std::function<c10::intrusive_ptr<c10d::Backend>()>;
  // make_cuda: builds a NCCL backend over the same ranks (may be empty); it
  // is called when the first CUDA tensor arrives, and ops on CUDA tensors go
  // straight to what it built. A group that never sees one never creates it.
  IchibanBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, BackendConfig cfg,
                 c10::intrusive_ptr<c10d::Backend> fallback, c10::intrusive_ptr<c10d::Backend> inter,
                 Factory make_cuda);
  ~IchibanBackend() override;

  const std::string getBackendName() const override { return "ichiban"; }
  c10::intrusive_ptr<Options> getBackendOptions() override;
  void setTimeout(std::chrono::milliseconds timeout) override { cfg_.timeout = timeout; }
  uint64_t getSequenceNumberForGroup() override { return seq_; }
  void shutdown() override;
  void abort() override;

  WorkPtr broadcast(std::vector<at::Tensor>& tensors, const c10d::BroadcastOptions& opts) override;
  WorkPtr allreduce(std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& opts) override;
  WorkPtr allreduce_coalesced(std::vector<at::Tensor>& tensors,
                              const c10d::AllreduceCoalescedOptions& opts) override;
  WorkPtr reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) override;
  WorkPtr allgather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                    const c10d::AllgatherOptions& opts) override;
  WorkPtr _allgather_base(at::Tensor& output, at::Tensor& input, const c10d::AllgatherOptions& opts) override;
  WorkPtr allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                              const c10d::AllgatherOptions& opts) override;
  WorkPtr allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::AllgatherOptions& opts) override;
  WorkPtr gather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                 const c10d::GatherOptions& opts) override;
  WorkPtr scatter(std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
                  const c10d::ScatterOptions& opts) override;
  WorkPtr reduce_scatter(std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
                         const c10d::ReduceScatterOptions& opts) override;
  WorkPtr _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                               const c10d::ReduceScatterOptions& opts) override;
  WorkPtr reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::ReduceScatterOptions& opts) override;
  WorkPtr alltoall_base(at::Tensor& output, at::Tensor& input, std::vector<int64_t>& output_splits,
                        std::vector<int64_t>& input_splits, const c10d::AllToAllOptions& opts) override;
  WorkPtr alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                   const c10d::AllToAllOptions& opts) override;
  WorkPtr barrier(const c10d::BarrierOptions& opts) override;
  WorkPtr send(std::vector<at::Tensor>& tensors, int dst, int tag) override;
  WorkPtr recv(std::vector<at::Tensor>& tensors, int src, int tag) override;
  WorkPtr recvAnysource(std::vector<at::Tensor>& tensors, int tag) override;

  // Bytes this group sent through the inter-host engine (hierarchical path).
  int64_t inter_host_bytes() const { return inter_bytes_.load(); }
  int num_hosts() const { return nhosts_; }
  // Whether this host's members agreed on single-copy reads, and the bytes
  // this rank has read that way.
  bool direct() const { return comm_ && comm_->direct(); }
  int64_t direct_bytes() const { return comm_ ? comm_->direct_bytes() : 0; }
  // Payload bytes of the ops this rank ran through the host's shared memory.
  int64_t intra_host_bytes() const { return comm_ ? comm_->local_bytes() : 0; }
  int local_size() const { return local_size_; }
  // Whether the host's shared segment exists yet (made by the first CPU op)
  // and whether the NCCL group does (made by the first CUDA op).
  bool has_segment() const { return comm_ != nullptr; }
  bool has_cuda_group() const { return cuda_made_.load(); }
  bool heartbeat() const { return comm_ && comm_->heartbeat(); }
  const BackendConfig& config() const { return cfg_; }
  // Whether this host's members read each other's host-shared tensors, why
  // not (on this rank), and the bytes all-reduced that way.
  bool shared() const { return comm_ && comm_->shared(); }
  std::string shared_declined() const { return comm_ ? comm_->shared_declined() : ""; }
  int64_t shared_bytes() const { return comm_ ? comm_->shared_bytes() : 0; }
  // The algorithm all-reduce would use for `bytes` (what ICHIBAN_DEBUG logs).
  Algo choose_allreduce(int64_t bytes) const;
  // How often the progress thread woke up (each wake-up looks at the queue).
  // Synchronous ops that run inline must not wake it: that costs a system
  // call and a context switch per op.
  int64_t worker_wakeups() const { return wakeups_.load(std::memory_order_relaxed); }

 private:
  WorkPtr enqueue(c10d::OpType type, const char* name, std::vector<at::Tensor> outputs,
                  std::function<void()> body) {
    return submit(false, type, name, std::move(outputs), std::move(body));
  }
  // may_inline: a synchronous call (asyncOp false) finds nothing queued or
  // running, so it runs on the caller's thread (which waits anyway), saving
  // two thread hand-offs per op; ordering is unchanged.
  WorkPtr submit(bool may_inline, c10d::OpType type, const char* name, std::vector<at::Tensor> outputs,
                 std::function<void()> body);
  void loop();
  void stop(bool abort);  // shutdown() and abort(): drain the worker, close the NCCL group
  // The host's segment, created by the first CPU op that needs it
  // (collective among the host's members, on the thread running ops).
  void ensure_comm();
  // The NCCL backend, built on the first CUDA tensor.
  c10d::Backend* cuda();
  // Runs queued jobs, then `job`, on this thread: an op issued from a Future
  // callback (which runs on the thread that completed an op) cannot wait for
  // that thread to come back.
  void run_nested(std::function<void()> job);
  Deadline deadline() const { return std::chrono::steady_clock::now() + cfg_.timeout; }
  bool multi_host() const { return nhosts_ > 1; }
  // True when t is a CUDA tensor and a NCCL backend is there to take it.
  bool to_cuda(const at::Tensor& t) const { return make_cuda_ && t.defined() && t.is_cuda(); }
  void require_fallback(const char* op) const;
  void allreduce_now(at::Tensor& t, RedOp op, const char* name);
  void log(const char* op, const char* algo, int64_t bytes, std::chrono::steady_clock::time_point t0) const;

  BackendConfig cfg_;
  c10::intrusive_ptr<c10d::Backend> fallback_;
  c10::intrusive_ptr<c10d::Backend> inter_;
  Factory make_cuda_;
  std::mutex cuda_mu_;
  std::atomic<bool> cuda_made_{false};
  c10::intrusive_ptr<c10d::Backend> cuda_;
  std::once_flag cuda_closed_;  // the wrapped NCCL group is shut down (or aborted) once
  c10::intrusive_ptr<c10d::Store> store_;
  int local_size_ = 1;
  std::unique_ptr<ShmComm> comm_;
  std::atomic<bool> aborted_{false};
  int nhosts_ = 1;
  bool uniform_hosts_ = true;
  Algo forced_ = Algo::kAuto;
  std::atomic<int64_t> inter_bytes_{0};
  uint64_t seq_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  bool busy_ = false;  // a job is running (on the worker or inline)
  std::thread::id runner_;  // the thread running it
  std::atomic<int> queued_{0};  // queue_.size(), read without the lock by the idle worker
  std::atomic<int64_t> wakeups_{0};
  std::thread worker_;
};

// Bytes sent through the inter-host engine by every group of this process.
int64_t global_inter_host_bytes();

}  // namespace ichiban
