// The Work handed back for every op: completed by the backend's progress
// thread (or inline by a synchronous caller), with a Future (a list of the
// op's output tensors) that DDP's reducer and comm hooks chain on. The Future
// is made on the first getFuture(): most synchronous ops never ask for one,
// and skipping it saves an allocation and a list of outputs per op.
#pragma once

#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <exception>
#include <mutex>
#include <vector>

namespace ichiban {

class IchibanWork : public c10d::Work {
 public:
  // wait_yields: sched_yield rounds in wait() before sleeping (the group's wait policy).
  IchibanWork(int rank, c10d::OpType type, uint64_t seq, std::vector<at::Tensor> outputs, int wait_yields = 0);

  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  std::vector<at::Tensor> result() override { return outputs_; }
  uint64_t getSequencenumber() const override { return seq_; }

  // Called once, when the op finished (or failed).
  void complete(std::exception_ptr error);

  // A Work that already finished (ops with nothing to do, or delegated ones).
  // Nanoseconds the calling thread has spent blocked in this backend: waiting
  // on a Work and running an op inline. Per thread, so a training loop reads
  // its own waits, not those of checkpoint or replication threads.
  static int64_t thread_blocked_ns();
  static void add_thread_blocked_ns(int64_t ns);
  static c10::intrusive_ptr<c10d::Work> completed(int rank, c10d::OpType type, std::vector<at::Tensor> outputs);

 private:
  // Marks a Future with this work's outcome (runs its callbacks).
  void settle(c10::ivalue::Future& f) const;

  std::vector<at::Tensor> outputs_;
  uint64_t seq_;
  int wait_yields_;
  std::mutex future_mu_;  // guards future_, done_, error_
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  bool done_ = false;
  std::exception_ptr error_;
};

}  // namespace ichiban
