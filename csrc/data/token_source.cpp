#include "data/token_source.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>

#include "common/errors.h"

namespace ichiban::data {

namespace {

// ---- SIGBUS guard -----------------------------------------------------------
thread_local sigjmp_buf* tl_guard = nullptr;
struct sigaction g_previous;
std::once_flag g_install_once;

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  if (tl_guard != nullptr) siglongjmp(*tl_guard, 1);
  // Not ours: hand the signal to whoever had it before (or the default action).
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction != nullptr) return g_previous.sa_sigaction(sig, info, ctx);
  } else if (g_previous.sa_handler != SIG_IGN && g_previous.sa_handler != SIG_DFL &&
             g_previous.sa_handler != nullptr) {
    return g_previous.sa_handler(sig);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

void install_guard() {
  std::call_once(g_install_once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_previous);
  });
}

int elem_size(int type) {
  switch (static_cast<TokenType>(type)) {
    case TokenType::kU8: return 1;
    case TokenType::kU16: return 2;
    case TokenType::kI32:
    case TokenType::kU32: return 4;
    case TokenType::kI64: return 8;
  }
  return 0;
}

template <typename T>
int64_t convert(const uint8_t* src, int64_t n, int64_t* dst, int64_t vocab) {
  // Returns the index of the first id outside [0, vocab), or -1.
  const T* p = reinterpret_cast<const T*>(src);
  int64_t bad = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(p[i]);
    dst[i] = v;
    if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(vocab) && bad < 0) bad = i;
  }
  return bad;
}

// Copies under the SIGBUS guard; no object with a destructor lives in this
// frame between sigsetjmp and the copy, so a longjmp out of it skips nothing.
bool guarded_convert(int type, const uint8_t* src, int64_t n, int64_t* dst, int64_t vocab,
                     int64_t* bad) {
  sigjmp_buf env;
  if (sigsetjmp(env, 0) != 0) {
    tl_guard = nullptr;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    return false;
  }
  tl_guard = &env;
  switch (static_cast<TokenType>(type)) {
    case TokenType::kU8: *bad = convert<uint8_t>(src, n, dst, vocab); break;
    case TokenType::kU16: *bad = convert<uint16_t>(src, n, dst, vocab); break;
    case TokenType::kI32: *bad = convert<int32_t>(src, n, dst, vocab); break;
    case TokenType::kU32: *bad = convert<uint32_t>(src, n, dst, vocab); break;
    case TokenType::kI64: *bad = convert<int64_t>(src, n, dst, vocab); break;
  }
  tl_guard = nullptr;
  return true;
}

}  // namespace

TokenSource::TokenSource(const std::vector<ShardSpec>& shards, int64_t vocab_size)
    : vocab_(vocab_size) {
  ICHIBAN_CHECK_ARG(!shards.empty(), "TokenSource: no shards given");
  ICHIBAN_CHECK_ARG(vocab_size > 0, "TokenSource: vocab_size must be > 0, got ", vocab_size);
  install_guard();
  for (const ShardSpec& spec : shards) {
    Shard s;
    s.spec = spec;
    s.elem = elem_size(spec.type);
    ICHIBAN_CHECK_ARG(s.elem > 0, spec.path, ": unknown token type code ", spec.type);
    ICHIBAN_CHECK_ARG(spec.offset >= 0 && spec.n_tokens >= 0, spec.path, ": bad offset/length");
    s.fd = ::open(spec.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (s.fd < 0) {
      const int err = errno;
      for (auto& o : shards_) {
        if (o.map) munmap(const_cast<uint8_t*>(o.map), o.map_bytes);
        ::close(o.fd);
      }
      ICHIBAN_CHECK(false, sys_error("cannot open token file " + spec.path, err));
    }
    struct stat st {};
    fstat(s.fd, &st);
    const int64_t need = spec.offset + spec.n_tokens * s.elem;
    if (st.st_size < need) {
      ::close(s.fd);
      for (auto& o : shards_) {
        if (o.map) munmap(const_cast<uint8_t*>(o.map), o.map_bytes);
        ::close(o.fd);
      }
      ICHIBAN_CHECK(false, spec.path, ": truncated token file: ", st.st_size, " bytes, the index needs ",
                    need, " (", spec.n_tokens, " tokens of ", s.elem, " bytes after ", spec.offset, ")");
    }
    s.map_bytes = static_cast<size_t>(need);
    if (need > 0) {
      void* p = mmap(nullptr, s.map_bytes, PROT_READ, MAP_SHARED, s.fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(s.fd);
        ICHIBAN_CHECK(false, sys_error("cannot mmap " + spec.path, err));
      }
      madvise(p, s.map_bytes, MADV_RANDOM);  // samples are read in shuffled order
      s.map = static_cast<const uint8_t*>(p);
    }
    s.first = total_;
    total_ += spec.n_tokens;
    shards_.push_back(std::move(s));
  }
}

TokenSource::~TokenSource() {
  for (auto& s : shards_) {
    if (s.map) munmap(const_cast<uint8_t*>(s.map), s.map_bytes);
    if (s.fd >= 0) ::close(s.fd);
  }
}

void TokenSource::read_shard(const Shard& s, int64_t local, int64_t n, int64_t* dst,
                             bool check_size) const {
  struct stat st {};
  if (check_size && (fstat(s.fd, &st) != 0 || st.st_size < static_cast<off_t>(s.map_bytes))) {
    ICHIBAN_CHECK(false, s.spec.path, ": token file truncated while open: now ", st.st_size,
                  " bytes, ", s.map_bytes, " when it was opened");
  }
  int64_t bad = -1;
  const uint8_t* src = s.map + s.spec.offset + local * s.elem;
  if (!guarded_convert(s.spec.type, src, n, dst, vocab_, &bad)) {
    ICHIBAN_CHECK(false, s.spec.path, ": token file truncated while open (bus error reading tokens ",
                  local, "..", local + n, ")");
  }
  if (bad >= 0) {
    ICHIBAN_CHECK(false, s.spec.path, ": token id ", dst[bad], " at token ", local + bad,
                  " is outside the vocabulary [0, ", vocab_, ")");
  }
}

void TokenSource::read(int64_t start, int64_t n, int64_t* dst, bool check_size) const {
  ICHIBAN_CHECK_ARG(start >= 0 && n >= 0 && start + n <= total_, "read of tokens [", start, ", ",
                    start + n, ") outside the stream of ", total_);
  // The shard holding `start`: the last one whose first token is <= start.
  auto it = std::upper_bound(shards_.begin(), shards_.end(), start,
                             [](int64_t v, const Shard& s) { return v < s.first; });
  size_t i = static_cast<size_t>(it - shards_.begin()) - 1;
  while (n > 0) {
    const Shard& s = shards_[i];
    const int64_t local = start - s.first;
    const int64_t take = std::min(n, s.spec.n_tokens - local);
    if (take > 0) {
      read_shard(s, local, take, dst, check_size);
      dst += take;
      start += take;
      n -= take;
    }
    ++i;
  }
}

}  // namespace ichiban::data
