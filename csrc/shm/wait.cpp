#include "shm/wait.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <climits>

namespace ichiban {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Shared (not FUTEX_PRIVATE): the word lives in memory mapped by several processes.
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, int ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = static_cast<long>(ms % 1000) * 1000000L;
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

}  // namespace

void flag_publish(std::atomic<uint32_t>* word, uint32_t value, std::atomic<uint32_t>* sleepers) {
  word->store(value, std::memory_order_seq_cst);
  // seq_cst pairs with the sleeper's increment-then-recheck: either it sees
  // the new value or we see it counted.
  if (sleepers->load(std::memory_order_seq_cst) > 0) futex_wake_all(word);
}

void flag_wait(std::atomic<uint32_t>* word, uint32_t target, std::atomic<uint32_t>* sleepers,
               const WaitPolicy& policy, const std::function<void()>& on_slice) {
  for (int i = 0; i < policy.spin_iters; ++i) {
    if (reached(word->load(std::memory_order_acquire), target)) return;
    cpu_relax();
  }
  if (yield_until(policy.yield_iters, [&] { return reached(word->load(std::memory_order_acquire), target); })) return;
  while (true) {
    sleepers->fetch_add(1, std::memory_order_seq_cst);
    uint32_t v = word->load(std::memory_order_seq_cst);
    if (!reached(v, target)) futex_wait(word, v, policy.sleep_ms);
    sleepers->fetch_sub(1, std::memory_order_seq_cst);
    if (reached(word->load(std::memory_order_acquire), target)) return;
    on_slice();
  }
}

}  // namespace ichiban
