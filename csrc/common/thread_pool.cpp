#include "common/thread_pool.h"

#include <algorithm>

#include "common/env.h"

namespace ichiban {

ThreadPool::ThreadPool(size_t num_threads) {
  num_threads = std::max<size_t>(1, num_threads);
  workers_.reserve(num_threads);
  for (size_t i = 0; i < num_threads; ++i) workers_.emplace_back([this] { loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

std::future<void> ThreadPool::submit(std::function<void()> fn) {
  std::packaged_task<void()> task(std::move(fn));
  auto fut = task.get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push(std::move(task));
  }
  cv_.notify_one();
  return fut;
}

void ThreadPool::parallel_for(size_t n, size_t min_grain,
                              const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  size_t parts = std::min(size(), std::max<size_t>(1, n / std::max<size_t>(1, min_grain)));
  if (parts <= 1) {
    fn(0, n);
    return;
  }
  size_t step = (n + parts - 1) / parts;
  std::vector<std::future<void>> futs;
  for (size_t b = step; b < n; b += step) {
    size_t e = std::min(n, b + step);
    futs.push_back(submit([&fn, b, e] { fn(b, e); }));
  }
  std::exception_ptr first;
  try {
    fn(0, std::min(n, step));
  } catch (...) {
    first = std::current_exception();
  }
  for (auto& f : futs) {
    try {
      f.get();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

void ThreadPool::loop() {
  for (;;) {
    std::packaged_task<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
      if (stop_ && tasks_.empty()) return;
      task = std::move(tasks_.front());
      tasks_.pop();
    }
    task();
  }
}

ThreadPool& default_pool() {
  static ThreadPool pool([] {
    int64_t n = env_int("ICHIBAN_NUM_THREADS", 0);
    if (n <= 0) n = std::min<int64_t>(8, std::max(1u, std::thread::hardware_concurrency()));
    return static_cast<size_t>(n);
  }());
  return pool;
}

}  // namespace ichiban
