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

struct BackendConfig {
  std::string group_name;        // in every error message
  std::string shm_name;          // unique per job and group; "_h<host>" is appended
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
  std::vector<int> host_of;      // group rank -> host index (hosts numbered from 0)
  std::vector<int> labels;       // group rank -> rank shown in errors
  int64_t slot_bytes = 1 << 20;
  int64_t oneshot_max_bytes = 64 << 10;  // auto: one-shot at or below, two-shot above
  std::string algo;              // ICHIBAN_ALGO ("" = cost model)
  bool debug = false;            // ICHIBAN_DEBUG: one line per op (algo, bytes, microseconds)
  int spin_iters = 2000;
  int yield_iters = 50;
  bool direct = true;                   // single-copy reads between ranks if every member can (ICHIBAN_CMA)
  int64_t direct_min_bytes = 256 << 10;  // ... for per-peer blocks of at least this size
  bool shared = false;                  // read peers' host-shared tensors in place (shm/arena.h)
};

class IchibanBackend : public c10d::Backend {
 public:
  using WorkPtr = c10::intrusive_ptr<c10d::Work>;

  // cuda: a NCCL backend over the same ranks (may be null); ops on CUDA
  // tensors go straight to it.
  IchibanBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, BackendConfig cfg,
                 c10::intrusive_ptr<c10d::Backend> fallback, c10::intrusive_ptr<c10d::Backend> inter,
                 c10::intrusive_ptr<c10d::Backend> cuda);
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
  int local_size() const { return comm_ ? comm_->size() : 1; }
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
  Deadline deadline() const { return std::chrono::steady_clock::now() + cfg_.timeout; }
  bool multi_host() const { return nhosts_ > 1; }
  // True when t is a CUDA tensor and a NCCL backend is there to take it.
  bool to_cuda(const at::Tensor& t) const { return cuda_ && t.defined() && t.is_cuda(); }
  void require_fallback(const char* op) const;
  void allreduce_now(at::Tensor& t, RedOp op, const char* name);
  void log(const char* op, const char* algo, int64_t bytes, std::chrono::steady_clock::time_point t0) const;

  BackendConfig cfg_;
  c10::intrusive_ptr<c10d::Backend> fallback_;
  c10::intrusive_ptr<c10d::Backend> inter_;
  c10::intrusive_ptr<c10d::Backend> cuda_;
  std::once_flag cuda_closed_;  // the wrapped NCCL group is shut down (or aborted) once
  std::unique_ptr<ShmComm> comm_;
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
  std::atomic<int> queued_{0};  // queue_.size(), read without the lock by the idle worker
  std::atomic<int64_t> wakeups_{0};
  std::thread worker_;
};

// Bytes sent through the inter-host engine by every group of this process.
int64_t global_inter_host_bytes();

}  // namespace ichiban
