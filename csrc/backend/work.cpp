#include "backend/work.h"

namespace ichiban {

IchibanWork::IchibanWork(int rank, c10d::OpType type, uint64_t seq, std::vector<at::Tensor> outputs)
    : c10d::Work(rank, type), outputs_(std::move(outputs)), seq_(seq),
      future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::ofTensors())) {}

void IchibanWork::complete(std::exception_ptr error) {
  // Work::wait() wakes first; then the future runs its callbacks (DDP hooks)
  // on this thread, as with Gloo.
  if (error) {
    finish(error);
    future_->setError(error);
  } else {
    finish();
    future_->markCompleted(c10::IValue(outputs_));
  }
}

c10::intrusive_ptr<c10d::Work> IchibanWork::completed(int rank, c10d::OpType type,
                                                      std::vector<at::Tensor> outputs) {
  auto w = c10::make_intrusive<IchibanWork>(rank, type, 0, std::move(outputs));
  w->complete(nullptr);
  return w;
}

}  // namespace ichiban
