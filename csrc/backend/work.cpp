#include "backend/work.h"

#include "shm/wait.h"

namespace ichiban {

IchibanWork::IchibanWork(int rank, c10d::OpType type, uint64_t seq, std::vector<at::Tensor> outputs,
                         int wait_yields)
    : c10d::Work(rank, type), outputs_(std::move(outputs)), seq_(seq), wait_yields_(wait_yields) {}

void IchibanWork::settle(c10::ivalue::Future& f) const {
  if (error_) {
    f.setError(error_);
  } else {
    f.markCompleted(c10::IValue(outputs_));
  }
}

namespace {
thread_local int64_t t_blocked_ns = 0;
}  // namespace

int64_t IchibanWork::thread_blocked_ns() { return t_blocked_ns; }
void IchibanWork::add_thread_blocked_ns(int64_t ns) { t_blocked_ns += ns; }

bool IchibanWork::wait(std::chrono::milliseconds timeout) {
  const auto t0 = std::chrono::steady_clock::now();
  struct Count {
    std::chrono::steady_clock::time_point t0;
    ~Count() {
      t_blocked_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    }
  } count{t0};
  // A few yields before c10d's condition-variable sleep: an op that
  // finishes meanwhile costs the progress thread no futex wake-up of us.
  yield_until(wait_yields_, [this] { return isCompleted(); });
  return c10d::Work::wait(timeout);
}

c10::intrusive_ptr<c10::ivalue::Future> IchibanWork::getFuture() {
  std::lock_guard<std::mutex> lk(future_mu_);
  if (!future_) {
    future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::ofTensors());
    // A fresh Future has no callbacks yet, so settling it under the lock runs nothing.
    if (done_) settle(*future_);
  }
  return future_;
}

void IchibanWork::complete(std::exception_ptr error) {
  // Work::wait() wakes first; then the future, if anyone asked for it, runs
  // its callbacks (DDP hooks) on this thread, as with Gloo.
  if (error) {
    finish(error);
  } else {
    finish();
  }
  c10::intrusive_ptr<c10::ivalue::Future> f;
  {
    std::lock_guard<std::mutex> lk(future_mu_);
    done_ = true;
    error_ = error;
    f = future_;
  }
  if (f) settle(*f);
}

c10::intrusive_ptr<c10d::Work> IchibanWork::completed(int rank, c10d::OpType type,
                                                      std::vector<at::Tensor> outputs) {
  auto w = c10::make_intrusive<IchibanWork>(rank, type, 0, std::move(outputs));
  w->complete(nullptr);
  return w;
}

}  // namespace ichiban
