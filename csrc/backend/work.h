// The Work handed back for every op: completed by the backend's progress
// thread, with a Future (a list of the op's output tensors) that DDP's
// reducer and comm hooks chain on.
#pragma once

#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <exception>
#include <vector>

namespace ichiban {

class IchibanWork : public c10d::Work {
 public:
  IchibanWork(int rank, c10d::OpType type, uint64_t seq, std::vector<at::Tensor> outputs);

  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }
  std::vector<at::Tensor> result() override { return outputs_; }
  uint64_t getSequencenumber() const override { return seq_; }

  // Called once, from the progress thread.
  void complete(std::exception_ptr error);

  // A Work that already finished (ops with nothing to do, or delegated ones).
  static c10::intrusive_ptr<c10d::Work> completed(int rank, c10d::OpType type, std::vector<at::Tensor> outputs);

 private:
  std::vector<at::Tensor> outputs_;
  uint64_t seq_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

}  // namespace ichiban
