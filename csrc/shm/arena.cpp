#include "shm/arena.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <unordered_map>
#include <utility>

#include <c10/core/CPUAllocator.h>

#include "common/errors.h"

namespace ichiban {

namespace {

constexpr char kArenaName[] = "ichiban-tensors";  // the memfd's name; /proc/<pid>/fd shows "/memfd:<name>"

constexpr uint64_t kPage = 4096;
constexpr uint64_t kHeaderBytes = kPage;  // page 0 holds the id; blocks start after it

uint64_t round_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

// Blocks are whole pages, best fit, coalesced on free. A free block that
// reaches the top lowers the top instead of joining the free list.
class Arena {
 public:
  Arena(uint64_t reserve, uint64_t min_bytes) : reserve_(round_up(reserve, kPage)), min_bytes_(min_bytes) {
    fd_ = static_cast<int>(syscall(SYS_memfd_create, kArenaName, 1u /* MFD_CLOEXEC */));
    ICHIBAN_CHECK(fd_ >= 0, "ichiban: shared tensors: memfd_create failed: ", std::strerror(errno));
    if (ftruncate(fd_, static_cast<off_t>(reserve_)) != 0) {
      const int e = errno;
      close(fd_);
      ICHIBAN_CHECK(false, "ichiban: shared tensors: sizing the arena to ", reserve_, " bytes failed: ", std::strerror(e));
    }
    void* p = mmap(nullptr, reserve_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd_, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      close(fd_);
      ICHIBAN_CHECK(false, "ichiban: shared tensors: mapping a ", reserve_, "-byte arena failed: ", std::strerror(e));
    }
    base_ = static_cast<char*>(p);
    madvise(base_, reserve_, MADV_HUGEPAGE);  // honoured only where shmem huge pages are allowed
    std::random_device rd;
    id_ = (static_cast<uint64_t>(rd()) << 32 | rd()) | 1;  // never 0
    std::memcpy(base_, &id_, sizeof(id_));
  }

  char* base() const { return base_; }
  uint64_t reserve() const { return reserve_; }
  uint64_t min_bytes() const { return min_bytes_; }
  ArenaInfo info() const { return ArenaInfo{static_cast<int32_t>(getpid()), fd_, id_, reserve_}; }

  // nullptr when it does not fit.
  char* alloc(uint64_t n) {
    const uint64_t len = round_up(n, kPage);
    std::lock_guard<std::mutex> g(mu_);
    uint64_t off;
    auto it = by_len_.lower_bound({len, 0});
    if (it != by_len_.end()) {
      off = it->second;
      const uint64_t have = it->first;
      by_len_.erase(it);
      by_off_.erase(off);
      if (have > len) insert_free(off + len, have - len);
    } else if (top_ + len <= reserve_) {
      off = top_;
      top_ += len;
      peak_ = std::max(peak_, top_);
    } else {
      ++fallbacks_;
      return nullptr;
    }
    live_[off] = len;
    in_use_ += len;
    ++allocations_;
    return base_ + off;
  }

  void free(char* p) {
    std::lock_guard<std::mutex> g(mu_);
    uint64_t off = static_cast<uint64_t>(p - base_);
    auto it = live_.find(off);
    if (it == live_.end()) return;  // not ours to free (cannot happen through the deleter)
    uint64_t len = it->second;
    live_.erase(it);
    in_use_ -= len;
    // Coalesce with the free neighbours.
    auto next = by_off_.find(off + len);
    if (next != by_off_.end()) {
      len += next->second;
      by_len_.erase({next->second, next->first});
      by_off_.erase(next);
    }
    auto prev = by_off_.lower_bound(off);
    if (prev != by_off_.begin()) {
      --prev;
      if (prev->first + prev->second == off) {
        off = prev->first;
        len += prev->second;
        by_len_.erase({prev->second, prev->first});
        by_off_.erase(prev);
      }
    }
    if (off + len == top_) top_ = off;
    else insert_free(off, len);
  }

  int64_t offset_of(const void* p, int64_t bytes) {
    const char* c = static_cast<const char*>(p);
    if (c < base_ + kHeaderBytes || bytes < 0) return -1;
    std::lock_guard<std::mutex> g(mu_);
    const uint64_t off = static_cast<uint64_t>(c - base_);
    return off + static_cast<uint64_t>(bytes) <= top_ ? static_cast<int64_t>(off) : -1;
  }

  ArenaStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    ArenaStats s;
    s.reserve = reserve_;
    s.top = top_;
    s.in_use = in_use_;
    s.free_bytes = top_ - kHeaderBytes - in_use_;
    s.allocations = allocations_;
    s.fallbacks = fallbacks_;
    return s;
  }

  uint64_t trim() {
    std::lock_guard<std::mutex> g(mu_);
    uint64_t released = 0;
    auto punch = [&](uint64_t off, uint64_t len) {
      if (len && fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                           static_cast<off_t>(len)) == 0)
        released += len;
    };
    for (const auto& [off, len] : by_off_) punch(off, len);
    if (peak_ > top_) punch(top_, peak_ - top_);
    peak_ = top_;
    return released;
  }

 private:
  void insert_free(uint64_t off, uint64_t len) {
    by_off_[off] = len;
    by_len_.insert({len, off});
  }

  const uint64_t reserve_, min_bytes_;
  int fd_ = -1;
  char* base_ = nullptr;
  uint64_t id_ = 0;
  std::mutex mu_;
  uint64_t top_ = kHeaderBytes, peak_ = kHeaderBytes, in_use_ = 0, allocations_ = 0, fallbacks_ = 0;
  std::map<uint64_t, uint64_t> by_off_;              // free: offset -> length
  std::set<std::pair<uint64_t, uint64_t>> by_len_;   // free: (length, offset)
  std::unordered_map<uint64_t, uint64_t> live_;      // offset -> length
};

// Both live for the rest of the process: tensors are freed during interpreter shutdown.
Arena* g_arena = nullptr;
c10::Allocator* g_prev = nullptr;
std::atomic<bool> g_forked{false};
std::mutex g_enable_mu;

bool in_arena(const void* p) {
  const char* c = static_cast<const char*>(p);
  return g_arena && c >= g_arena->base() && c < g_arena->base() + g_arena->reserve();
}

void delete_block(void* p) {
  if (in_arena(p)) {
    // A forked child must not hand the parent's blocks out again: its free
    // list is a private copy, the pages are not.
    if (!g_forked.load(std::memory_order_relaxed)) g_arena->free(static_cast<char*>(p));
    return;
  }
  g_prev->raw_deleter()(p);
}

class SharedCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n >= g_arena->min_bytes() && !g_forked.load(std::memory_order_relaxed)) {
      if (char* p = g_arena->alloc(n)) return {p, p, &delete_block, c10::Device(c10::DeviceType::CPU)};
    }
    c10::DataPtr d = g_prev->allocate(n);
    // Keep one raw deleter for both kinds when the previous allocator has one.
    const c10::DeleterFnPtr prev = g_prev->raw_deleter();
    if (prev && d.get() == d.get_context() && d.get_deleter() == prev) {
      void* p = d.release_context();
      return {p, p, &delete_block, d.device()};
    }
    return d;
  }
  c10::DeleterFnPtr raw_deleter() const override { return g_prev->raw_deleter() ? &delete_block : nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

void on_fork_child() { g_forked.store(true); }

}  // namespace

void arena_enable(uint64_t reserve_bytes, uint64_t min_bytes) {
  std::lock_guard<std::mutex> g(g_enable_mu);
  ICHIBAN_CHECK(!g_forked.load(), "ichiban: shared tensors cannot be enabled in a process forked after they were");
  if (g_arena) return;
  if (reserve_bytes == 0) reserve_bytes = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  ICHIBAN_CHECK_ARG(reserve_bytes >= (1u << 20), "ichiban: shared tensors: reserve_bytes=", reserve_bytes,
                    ": expected at least 1 MiB (or 0 for the machine's memory)");
  // Never destroyed: tensors are still freed (and allocated) during interpreter shutdown.
  static auto* allocator = new SharedCpuAllocator();
  c10::Allocator* prev = c10::GetCPUAllocator();
  g_arena = new Arena(reserve_bytes, std::max<uint64_t>(min_bytes, 1));
  g_prev = prev;
  c10::SetCPUAllocator(allocator, /*priority=*/UINT8_MAX);
  ICHIBAN_CHECK(c10::GetCPUAllocator() == allocator,
                "ichiban: shared tensors: another CPU allocator of higher priority is installed");
  pthread_atfork(nullptr, nullptr, &on_fork_child);
}

bool arena_enabled() { return g_arena && !g_forked.load(); }

ArenaInfo arena_info() { return arena_enabled() ? g_arena->info() : ArenaInfo{}; }

ArenaStats arena_stats() { return g_arena ? g_arena->stats() : ArenaStats{}; }

int64_t arena_offset(const void* p, int64_t bytes) {
  return arena_enabled() ? g_arena->offset_of(p, bytes) : -1;
}

uint64_t arena_trim() { return arena_enabled() ? g_arena->trim() : 0; }

char* arena_map_peer(const ArenaInfo& peer, std::string* err) {
  static auto* mu = new std::mutex();  // never destroyed, like the mappings
  static auto* cache = new std::map<std::pair<int32_t, uint64_t>, char*>();
  std::lock_guard<std::mutex> g(*mu);
  auto it = cache->find({peer.pid, peer.id});
  if (it != cache->end()) return it->second;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/fd/%d", peer.pid, peer.fd);
  // In another pid namespace the pid may name some other process: check the
  // descriptor is an arena before opening it (the id check follows).
  char target[128] = {0};
  const ssize_t tl = readlink(path, target, sizeof(target) - 1);
  if (tl >= 0 && std::string(target).rfind(std::string("/memfd:") + kArenaName, 0) != 0) {
    *err = std::string(path) + " is not an arena (" + target + ")";
    return nullptr;
  }
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) {  // /proc hidden or restricted: ask for the descriptor itself
    const int e = errno;
    const int pidfd = static_cast<int>(syscall(434 /* pidfd_open */, peer.pid, 0));
    if (pidfd >= 0) {
      fd = static_cast<int>(syscall(438 /* pidfd_getfd */, pidfd, peer.fd, 0));
      close(pidfd);
    }
    if (fd < 0) {
      *err = std::string("opening ") + path + ": " + std::strerror(e);
      return nullptr;
    }
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < peer.reserve) {
    close(fd);
    *err = std::string(path) + " is smaller than the arena it should be";
    return nullptr;
  }
  void* p = mmap(nullptr, peer.reserve, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  const int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    *err = std::string("mapping ") + path + ": " + std::strerror(e);
    return nullptr;
  }
  uint64_t id;
  std::memcpy(&id, p, sizeof(id));
  if (id != peer.id) {
    munmap(p, peer.reserve);
    *err = std::string(path) + " is not that process's arena any more";
    return nullptr;
  }
  madvise(p, peer.reserve, MADV_HUGEPAGE);
  (*cache)[{peer.pid, peer.id}] = static_cast<char*>(p);
  return static_cast<char*>(p);
}

}  // namespace ichiban
