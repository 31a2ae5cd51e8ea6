// A fixed-size pool of worker threads. Work submitted from Python-facing code
// runs here without the GIL; exceptions travel back through the futures.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <future>
#include <mutex>
#include <queue>
#include <thread>
#include <vector>

namespace ichiban {

class ThreadPool {
 public:
  explicit ThreadPool(size_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t size() const { return workers_.size(); }

  // Runs fn on a worker; the future rethrows what fn threw.
  std::future<void> submit(std::function<void()> fn);

  // Splits [0, n) into at most size() contiguous ranges, runs fn(begin, end) on
  // each (the calling thread takes one), waits, rethrows the first error.
  void parallel_for(size_t n, size_t min_grain, const std::function<void(size_t, size_t)>& fn);

 private:
  void loop();
  std::vector<std::thread> workers_;
  std::queue<std::packaged_task<void()>> tasks_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

// A process-wide pool sized by ICHIBAN_NUM_THREADS (default: hardware threads,
// at most 8), created on first use.
ThreadPool& default_pool();

}  // namespace ichiban
