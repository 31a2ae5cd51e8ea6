// Cross-process flags: a 32-bit counter per rank in shared memory, waited on
// with a short spin, then sched_yield, then a futex sleep in slices.
//
// More ranks than cores must still progress (a 2-core box runs 4 ranks): a
// waiter that spins holds the core its peer needs, so the spin budget shrinks
// when ranks outnumber cores and waiters yield or sleep early. Writers call
// FUTEX_WAKE only when someone sleeps (the shared `sleepers` count), so the
// uncontended path costs no system call.
#pragma once

#include <sched.h>

#include <atomic>
#include <cstdint>
#include <functional>

namespace ichiban {

struct WaitPolicy {
  int spin_iters = 2000;  // busy polls before yielding
  int yield_iters = 50;   // sched_yield polls before sleeping
  int sleep_ms = 20;      // futex slice: how often a sleeper checks deadlines and peers
};

// Up to `rounds` sched_yield calls until done() holds; returns done(). With
// nothing else runnable on the core a yield returns at once, otherwise it
// hands the core over: the cheap wait before any sleep (flags, the progress
// thread's queue, Work::wait).
template <typename Done>
bool yield_until(int rounds, Done done) {
  for (int i = 0; i < rounds; ++i) {
    if (done()) return true;
    sched_yield();
  }
  return done();
}

// (int32)(v - target) >= 0: counters wrap.
inline bool reached(uint32_t v, uint32_t target) { return static_cast<int32_t>(v - target) >= 0; }

// Store `value` and wake sleepers on `word`.
void flag_publish(std::atomic<uint32_t>* word, uint32_t value, std::atomic<uint32_t>* sleepers);

// Wait until reached(*word, target). `on_slice` runs after each futex slice
// and throws to abandon the wait (deadline passed, peer dead).
void flag_wait(std::atomic<uint32_t>* word, uint32_t target, std::atomic<uint32_t>* sleepers,
               const WaitPolicy& policy, const std::function<void()>& on_slice);

}  // namespace ichiban
