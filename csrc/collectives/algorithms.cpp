#include "collectives/algorithms.h"

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>

#include "common/errors.h"
#include "shm/arena.h"

namespace ichiban {

const char* algo_name(Algo a) {
  switch (a) {
    case Algo::kAuto: return "auto";
    case Algo::kOneShot: return "oneshot";
    case Algo::kTwoShot: return "twoshot";
    case Algo::kRing: return "ring";
    case Algo::kHier: return "hier";
    case Algo::kFlat: return "flat";
  }
  return "?";
}

Algo parse_algo(const std::string& s) {
  if (s.empty() || s == "auto") return Algo::kAuto;
  if (s == "oneshot" || s == "one-shot") return Algo::kOneShot;
  if (s == "twoshot" || s == "two-shot") return Algo::kTwoShot;
  if (s == "ring") return Algo::kRing;
  if (s == "hier" || s == "hierarchical") return Algo::kHier;
  if (s == "flat") return Algo::kFlat;
  ICHIBAN_CHECK_ARG(false, "ICHIBAN_ALGO='", s, "': expected one of auto, oneshot, twoshot, ring, hier, flat");
}

namespace {

// Chunks and per-rank windows are cut on 64-byte boundaries so that no two
// ranks write the same cache line.
constexpr int64_t kAlign = 64;

// Piece of a shared all-reduce: reduced, then copied to every peer while it
// is still in the cache.
constexpr int64_t kSharedPiece = 64 << 10;
// Smaller ops do not look for host-shared buffers (the arena's default
// smallest block; below it the publishing barrier would cost more than the
// copies it saves). all_to_all publishes its offsets in the barrier it has
// anyway, so it looks at every size.
constexpr int64_t kSharedMinBytes = 64 << 10;

int64_t elems_per(int64_t bytes, int64_t es) {
  int64_t e = (bytes / kAlign * kAlign) / es;
  return std::max<int64_t>(e, 1);
}

// The n ranks' inputs of one reduction; kept on the stack for group sizes up
// to 16 so that a small op allocates nothing.
class SrcList {
 public:
  explicit SrcList(int n) {
    if (n > kInline) heap_.resize(n);
  }
  const void** data() { return heap_.empty() ? inline_ : heap_.data(); }
  const void*& operator[](int i) { return data()[i]; }

 private:
  static constexpr int kInline = 16;
  const void* inline_[kInline] = {};
  std::vector<const void*> heap_;
};

OpDesc desc(uint32_t op, c10::ScalarType dt, int64_t count, int redop = -1, int root = -1) {
  OpDesc d;
  d.op = op;
  d.dtype = static_cast<int32_t>(dt);
  d.count = count;
  d.redop = redop;
  d.root = root;
  return d;
}

OpDesc byte_desc(uint32_t op, int64_t bytes, int root = -1) {
  OpDesc d;
  d.op = op;
  d.count = bytes;
  d.root = root;
  return d;
}

uint64_t addr(const void* p) { return reinterpret_cast<uint64_t>(p); }

bool overlap(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  return addr(a) < addr(b) + b_bytes && addr(b) < addr(a) + a_bytes;
}

// The single-copy reads of one op. A failed read is raised only after the
// op's last barrier, which every rank still reaches: its peers read from
// others and must not be left waiting for it.
class DirectReads {
 public:
  explicit DirectReads(ShmComm& c) : c_(c) {}
  void read(int p, void* dst, uint64_t src, int64_t bytes) {
    if (err_ != 0 || bytes <= 0) return;
    err_ = c_.read_peer(p, dst, src, bytes);
    if (err_ != 0) peer_ = p;
  }
  // Last barrier: after it no peer reads this rank's buffer any more.
  void finish() {
    c_.sync();
    if (err_ != 0) c_.direct_failed(peer_, err_);
  }

 private:
  ShmComm& c_;
  int err_ = 0;
  int peer_ = -1;
};

// The host-shared buffers of one op (ShmComm::shared, shm/arena.h). Each
// rank publishes the arena offsets of its buffers, or -1 when one is outside
// its arena or `usable` is false there; every rank sees every offset, so all
// take the same path. When ok(), at(p, i) is rank p's buffer i as mapped
// here, and the op ends with finish(): peers touch my buffers until then.
// It costs a barrier, so ops ask only from kSharedMinBytes on.
class SharedBuffers {
 public:
  static constexpr int kMax = 2;
  SharedBuffers(ShmComm& c, std::initializer_list<std::pair<const void*, int64_t>> mine, bool usable = true)
      : c_(c), k_(static_cast<int>(mine.size())), at_(static_cast<size_t>(c.size()) * mine.size()) {
    int64_t off[kMax];
    char* own[kMax];
    int i = 0;
    for (const auto& [ptr, bytes] : mine) {
      own[i] = static_cast<char*>(const_cast<void*>(ptr));
      off[i] = usable ? arena_offset(ptr, bytes) : -1;
      usable = usable && off[i] >= 0;
      ++i;
    }
    if (!usable) std::fill(off, off + k_, -1);
    c.next_unit();
    std::memcpy(c.my_slot(), off, k_ * sizeof(int64_t));
    c.sync();
    ok_ = true;
    for (int p = 0; p < c.size(); ++p) {
      for (i = 0; i < k_; ++i) {
        int64_t o;
        std::memcpy(&o, c.slot(p) + i * sizeof(int64_t), sizeof(o));
        ok_ = ok_ && o >= 0;
        if (o >= 0) at_[p * k_ + i] = p == c.rank() ? own[i] : c.peer_arena(p) + o;
      }
    }
  }
  bool ok() const { return ok_; }
  char* at(int p, int i) const { return at_[p * k_ + i]; }
  void finish(int64_t bytes) {
    c_.next_unit();
    c_.sync();
    c_.count_shared(bytes);
  }

 private:
  ShmComm& c_;
  const int k_;
  std::vector<char*> at_;
  bool ok_ = false;
};

bool use_shared(const ShmComm& c, int64_t bytes) { return c.shared() && c.size() > 1 && bytes >= kSharedMinBytes; }

void oneshot(ShmComm& c, char* data, int64_t count, c10::ScalarType dt, RedOp op, int avg, int64_t es) {
  const int n = c.size();
  const int64_t chunk = elems_per(static_cast<int64_t>(c.slot_bytes()), es);
  SrcList srcs(n);
  for (int64_t off = 0; off < count; off += chunk) {
    const int64_t m = std::min(chunk, count - off);
    c.next_unit();
    std::memcpy(c.my_slot(), data + off * es, m * es);
    c.sync();
    for (int p = 0; p < n; ++p) srcs[p] = c.slot(p);
    reduce_n(dt, op, data + off * es, srcs.data(), n, m, avg);
  }
}

// Two-shot, pipelined. Chunk k (k*M elements on, M = n segments of up to
// seg_max) passes three stages on every rank, each counted in shared memory:
//   0 copy-in : the n-1 segments peers reduce -> my slot of buffer k % D
//   1 reduce  : my segment from my buffer and the peers' slots, in place,
//               then published in my slot's (otherwise unused) segment
//   2 copy-out: the peers' reduced segments -> my buffer
// Copy-in k needs every peer past copy-out k-D (they read buffer k % D until
// then), reduce k every peer past copy-in k, copy-out k every peer past reduce
// k. A rank does the first of copy-out, reduce, copy-in that is ready and
// sleeps on a peer only when none is, so with more ranks than cores a rank
// that holds a core runs up to D chunks ahead instead of handing the core
// over twice per chunk.
class TwoShot {
 public:
  TwoShot(ShmComm& c, char* data, int64_t count, c10::ScalarType dt, RedOp op, int avg)
      : c_(c), n_(c.size()), r_(c.rank()), data_(data), count_(count), dt_(dt), op_(op), avg_(avg),
        es_(c10::elementSize(dt)), seg_max_(elems_per(static_cast<int64_t>(c.slot_bytes()) / n_, es_)),
        chunks_((count + seg_max_ * n_ - 1) / (seg_max_ * n_)), srcs_(n_) {
    for (int s = 0; s < ShmComm::kStages; ++s) base_[s] = c.stage_count(r_, s);
  }

  void run() {
    constexpr int D = ShmComm::kPipeDepth;
    int64_t done[ShmComm::kStages] = {0, 0, 0};  // chunks through each of my stages
    while (done[2] < chunks_) {
      // The first stage in line that is not ready names the peer to sleep on
      // (its every step wakes us; then we look again).
      Lag lag;
      if (done[2] < done[1] && peers_past(1, done[2], lag)) {
        copy_out(done[2]++);
        c_.advance(2);
      } else if (done[1] < done[0] && peers_past(0, done[1], lag)) {
        reduce(done[1]++);
        c_.advance(1);
      } else if (done[0] < chunks_ && (done[0] < D || peers_past(2, done[0] - D, lag))) {
        copy_in(done[0]++);
        c_.advance(0);
      } else {
        c_.wait_progress(lag.peer, lag.seen);
      }
    }
    // Peers may still be copying out of my slots: the pipeline buffers are
    // not the lock-step ones, and the next pipelined op opens with a barrier.
  }

 private:
  // A peer that holds a stage back, and its progress word as read before its
  // stage count (so any later step of it ends the wait).
  struct Lag {
    int peer = -1;
    uint32_t seen = 0;
  };

  // Has every peer passed chunk k through stage s? If not, and `lag` names
  // nobody yet, it names one that has not.
  bool peers_past(int s, int64_t k, Lag& lag) const {
    for (int p = 0; p < n_; ++p) {
      if (p == r_) continue;
      const uint32_t seen = c_.progress(p);
      if (static_cast<int64_t>(static_cast<uint32_t>(c_.stage_count(p, s) - base_[s])) <= k) {
        if (lag.peer < 0) lag = Lag{p, seen};
        return false;
      }
    }
    return true;
  }

  struct Geo {
    char* chunk;
    int64_t m, per;
    int64_t b(int q) const { return std::min<int64_t>(q * per, m); }
    int64_t e(int q) const { return std::min<int64_t>((q + 1) * per, m); }
  };
  Geo geo(int64_t k) const {
    const int64_t off = k * seg_max_ * n_;
    const int64_t m = std::min(seg_max_ * n_, count_ - off);
    return Geo{data_ + off * es_, m, std::min(seg_max_, (m + n_ - 1) / n_)};
  }
  int buf(int64_t k) const { return static_cast<int>(k % ShmComm::kPipeDepth); }

  void copy_in(int64_t k) {
    const Geo g = geo(k);
    char* mine = c_.pipe_slot(buf(k), r_);
    for (int q = 0; q < n_; ++q)
      if (q != r_ && g.e(q) > g.b(q)) std::memcpy(mine + g.b(q) * es_, g.chunk + g.b(q) * es_, (g.e(q) - g.b(q)) * es_);
  }

  void reduce(int64_t k) {
    const Geo g = geo(k);
    const int64_t b = g.b(r_), e = g.e(r_);
    if (e <= b) return;
    for (int p = 0; p < n_; ++p) srcs_[p] = p == r_ ? g.chunk + b * es_ : c_.pipe_slot(buf(k), p) + b * es_;
    reduce_n(dt_, op_, g.chunk + b * es_, srcs_.data(), n_, e - b, avg_);
    std::memcpy(c_.pipe_slot(buf(k), r_) + b * es_, g.chunk + b * es_, (e - b) * es_);
  }

  void copy_out(int64_t k) {
    const Geo g = geo(k);
    for (int q = 0; q < n_; ++q)
      if (q != r_ && g.e(q) > g.b(q))
        std::memcpy(g.chunk + g.b(q) * es_, c_.pipe_slot(buf(k), q) + g.b(q) * es_, (g.e(q) - g.b(q)) * es_);
  }

  ShmComm& c_;
  const int n_, r_;
  char* const data_;
  const int64_t count_;
  const c10::ScalarType dt_;
  const RedOp op_;
  const int avg_;
  const int64_t es_, seg_max_, chunks_;
  SrcList srcs_;
  uint32_t base_[ShmComm::kStages];
};

void twoshot(ShmComm& c, char* data, int64_t count, c10::ScalarType dt, RedOp op, int avg, int64_t) {
  // Every rank is in this op (descriptors checked) before anyone writes a
  // pipeline slot, and stage counts are equal on every rank here.
  c.next_unit();
  c.sync();
  TwoShot(c, data, count, dt, op, avg).run();
}

// All-reduce on host-shared tensors (ShmComm::shared): every rank's tensor
// is in its arena, which every peer maps, so nothing goes through the
// segment. Rank r owns segment r of the tensors: it reduces it, piece by
// piece, from every rank's tensor into its own, and writes the result
// (still in cache) into every peer's. Nobody else reads or writes segment r
// of any tensor, so no rank waits for another until the closing barrier,
// after which no peer touches my tensor any more. Per rank that reads and
// writes the message once (2S), where two-shot moves (5 - 2/n)S.
void shared_allreduce(ShmComm& c, const SharedBuffers& sb, char* data, int64_t count, c10::ScalarType dt,
                      RedOp op, int avg, int64_t es) {
  const int n = c.size(), r = c.rank();
  // Segments start on 64-byte boundaries: owners never write the same line.
  const int64_t line = std::max<int64_t>(kAlign / es, 1);
  const int64_t per = ((count + n - 1) / n + line - 1) / line * line;
  const int64_t b = std::min(r * per, count), e = std::min((r + 1) * per, count);
  const int64_t piece = elems_per(kSharedPiece, es);
  SrcList srcs(n);
  for (int64_t off = b; off < e; off += piece) {
    const int64_t m = std::min(piece, e - off);
    char* mine = data + off * es;
    for (int p = 0; p < n; ++p) srcs[p] = sb.at(p, 0) + off * es;
    reduce_n(dt, op, mine, srcs.data(), n, m, avg);
    for (int k = 1; k < n; ++k) {
      const int q = (r + k) % n;  // writers spread over owners
      std::memcpy(sb.at(q, 0) + off * es, mine, m * es);
    }
  }
}

// Ring on shared memory: at step s rank r adds its own part of segment
// (r - s - 1) mod n to the partial sum its left neighbour published, and
// publishes the result; after n-1 steps rank r holds segment r reduced. Every
// partial sum is formed in the same order on every rank that needs it.
void ring(ShmComm& c, char* data, int64_t count, c10::ScalarType dt, RedOp op, int avg, int64_t es) {
  const int n = c.size();
  const int r = c.rank();
  const int left = (r + n - 1) % n;
  const int64_t seg_max = elems_per(static_cast<int64_t>(c.slot_bytes()), es);
  std::vector<char> partial;
  int64_t off = 0;
  while (off < count) {
    const int64_t m = std::min(seg_max * n, count - off);
    const int64_t per = (m + n - 1) / n;
    auto seg = [&](int q, int64_t& b, int64_t& e) {
      b = std::min<int64_t>(q * per, m);
      e = std::min<int64_t>((q + 1) * per, m);
    };
    partial.resize(per * es);
    // The partial for segment q starts at rank q+1 and ends, complete, at rank q.
    int q = (r + n - 1) % n;  // the segment whose partial I start
    int64_t b, e;
    seg(q, b, e);
    c.next_unit();
    std::memcpy(c.my_slot(), data + (off + b) * es, (e - b) * es);
    c.sync();
    for (int s = 1; s < n; ++s) {
      q = (q + n - 1) % n;  // the left neighbour's partial is for segment r - s - 1
      seg(q, b, e);
      const void* srcs[2] = {c.slot(left), data + (off + b) * es};
      const bool last = s == n - 1;
      // Copy out of the neighbour's slot before reusing buffers next unit.
      reduce_n(dt, op, partial.data(), srcs, 2, e - b, last ? avg : 1);
      c.next_unit();
      std::memcpy(c.my_slot(), partial.data(), (e - b) * es);
      c.sync();
    }
    // Now every rank's slot holds its own segment fully reduced; the next
    // chunk's first barrier orders these reads before any slot is rewritten.
    for (int p = 0; p < n; ++p) {
      int64_t pb, pe;
      seg(p, pb, pe);
      if (pe > pb) std::memcpy(data + (off + pb) * es, c.slot(p), (pe - pb) * es);
    }
    off += m;
  }
}

}  // namespace

void shm_barrier(ShmComm& c, Deadline dl) {
  OpDesc d;
  d.op = kOpBarrier;
  c.begin("barrier", d, dl);
  c.next_unit();
  c.sync();
}

bool shm_allreduce(ShmComm& c, Algo algo, void* data, int64_t count, c10::ScalarType dt, RedOp op,
                   int avg_divisor, Deadline dl) {
  c.begin("allreduce", desc(kOpAllreduce, dt, count, static_cast<int>(op)), dl);
  const int64_t es = c10::elementSize(dt);
  if (count == 0 || c.size() == 1) {
    c.next_unit();
    c.sync();  // still check that every rank agrees
    if (c.size() == 1 && avg_divisor > 1) {
      const void* src = data;
      reduce_n(dt, op, data, &src, 1, count, avg_divisor);
    }
    return false;
  }
  char* p = static_cast<char*>(data);
  if (use_shared(c, count * es)) {
    SharedBuffers sb(c, {{p, count * es}});
    if (sb.ok()) {
      shared_allreduce(c, sb, p, count, dt, op, avg_divisor, es);
      sb.finish(count * es);  // every segment is everywhere; nobody touches my tensor any more
      return true;
    }
    // Somebody's tensor is private: the algorithm below, after this extra barrier.
  }
  switch (algo) {
    case Algo::kTwoShot: twoshot(c, p, count, dt, op, avg_divisor, es); break;
    case Algo::kRing: ring(c, p, count, dt, op, avg_divisor, es); break;
    default: oneshot(c, p, count, dt, op, avg_divisor, es); break;
  }
  return false;
}

bool shm_broadcast(ShmComm& c, void* data, int64_t bytes, int root, Deadline dl) {
  c.begin("broadcast", byte_desc(kOpBroadcast, bytes, root), dl);
  if (use_shared(c, bytes)) {  // every rank copies from the root's tensor
    SharedBuffers sb(c, {{data, bytes}});
    if (sb.ok()) {
      if (c.rank() != root) std::memcpy(data, sb.at(root, 0), bytes);
      sb.finish(bytes);
      return true;
    }
  }
  // No single-copy path here: the root's copy in and the others' copies out
  // run at once on different cores, which beats every rank reading the
  // root's buffer through the kernel (each read pins the root's pages) at
  // every size measured on 2 ranks (benchmarks/results/collectives_cpu2.md).
  char* p = static_cast<char*>(data);
  const int64_t chunk = static_cast<int64_t>(c.slot_bytes());
  int64_t off = 0;
  do {
    const int64_t m = std::min(chunk, bytes - off);
    c.next_unit();
    if (c.rank() == root) std::memcpy(c.my_slot(), p + off, m);
    c.sync();
    if (c.rank() != root) std::memcpy(p + off, c.slot(root), m);
    off += m;
  } while (off < bytes);
  return false;
}

namespace {

// Every rank's `bytes` from `in` land at dst + rank * bytes on `root` (every rank when root < 0),
// one slot-sized chunk per unit.
void gather_chunks(ShmComm& c, const void* in, void* out, int64_t bytes, int root) {
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  const int64_t chunk = static_cast<int64_t>(c.slot_bytes());
  int64_t off = 0;
  do {
    const int64_t m = std::min(chunk, bytes - off);
    c.next_unit();
    std::memcpy(c.my_slot(), src + off, m);
    c.sync();
    if (root < 0 || c.rank() == root)
      for (int p = 0; p < c.size(); ++p) std::memcpy(dst + p * bytes + off, c.slot(p), m);
    off += m;
  } while (off < bytes);
}

}  // namespace

const char* shm_allgather(ShmComm& c, const void* in, void* out, int64_t bytes, Deadline dl) {
  c.begin("allgather", byte_desc(kOpAllgather, bytes), dl);
  const int n = c.size(), r = c.rank();
  char* dst = static_cast<char*>(out);
  // In place (input = my own block of the output, which nobody else
  // writes), or apart; otherwise a peer's write could reach my input.
  const bool in_place = in == dst + r * bytes;
  const bool apart = in_place || !overlap(in, bytes, out, n * bytes);
  if (use_shared(c, n * bytes)) {  // every rank writes its input into every output
    SharedBuffers sb(c, {{in, bytes}, {out, n * bytes}}, apart);
    if (sb.ok()) {
      for (int k = 1; k < n; ++k) {
        const int q = (r + k) % n;
        std::memcpy(sb.at(q, 1) + r * bytes, in, bytes);
      }
      if (!in_place) std::memcpy(dst + r * bytes, in, bytes);
      sb.finish(n * bytes);
      return "shared";
    }
  }
  // Single copy at 2 ranks only. Through the slots each input is copied once
  // and then read by every rank from cache; read directly, it is fetched from
  // memory once per peer. With 3 or more ranks those repeated fetches cost
  // more memory traffic than the copy saves.
  if (c.size() == 2 && c.use_direct(bytes)) {
    // Every rank reads each peer's input straight into its output. Peers read
    // my input while I write my output, so the two must not overlap, except
    // in place (input = my own block of the output, which I never write).
    const uint64_t pub[2] = {addr(in), apart ? 1u : 0u};
    c.next_unit();
    std::memcpy(c.my_slot(), pub, sizeof(pub));
    c.sync();
    bool all_ok = true;
    for (int p = 0; p < n; ++p) all_ok = all_ok && reinterpret_cast<const uint64_t*>(c.slot(p))[1] == 1;
    if (all_ok) {
      DirectReads rd(c);
      for (int k = 1; k < n; ++k) {
        const int p = (r + k) % n;  // readers spread over owners
        rd.read(p, dst + p * bytes, reinterpret_cast<const uint64_t*>(c.slot(p))[0], bytes);
      }
      if (!in_place) std::memcpy(dst + r * bytes, in, bytes);
      rd.finish();
      return "direct";
    }
    // Somebody's buffers overlap: through the slots, like small messages.
  }
  gather_chunks(c, in, out, bytes, -1);
  return "oneshot";
}

bool shm_reduce_scatter(ShmComm& c, const void* in, void* out, int64_t count, c10::ScalarType dt, RedOp op,
                        int avg_divisor, Deadline dl) {
  c.begin("reduce_scatter", desc(kOpReduceScatter, dt, count, static_cast<int>(op)), dl);
  const int n = c.size();
  const int64_t es = c10::elementSize(dt);
  if (use_shared(c, n * count * es)) {  // rank r reduces block r straight from every rank's input
    const int r = c.rank();
    const char* own = static_cast<const char*>(in) + r * count * es;
    // Peers read my input's other blocks: my output must be apart from them.
    const bool apart = out == own || !overlap(in, n * count * es, out, count * es);
    SharedBuffers sb(c, {{in, n * count * es}}, apart);
    if (sb.ok()) {
      SrcList srcs(n);
      for (int p = 0; p < n; ++p) srcs[p] = sb.at(p, 0) + r * count * es;
      reduce_n(dt, op, out, srcs.data(), n, count, avg_divisor);
      sb.finish(n * count * es);
      return true;
    }
  }
  const char* src = static_cast<const char*>(in);
  const int64_t per = elems_per(static_cast<int64_t>(c.slot_bytes()) / n, es);
  SrcList srcs(n);
  int64_t off = 0;
  do {
    const int64_t m = std::min(per, count - off);
    c.next_unit();
    // (n, per) layout in my slot: piece q is destined for rank q.
    for (int q = 0; q < n; ++q) std::memcpy(c.my_slot() + q * per * es, src + (q * count + off) * es, m * es);
    c.sync();
    for (int p = 0; p < n; ++p) srcs[p] = c.slot(p) + c.rank() * per * es;
    reduce_n(dt, op, static_cast<char*>(out) + off * es, srcs.data(), n, m, avg_divisor);
    off += m;
  } while (off < count);
  return false;
}

namespace {

// After the first barrier of an all-to-all: rank p's slot holds what p sends
// to each rank and what it expects from each rank, in bytes.
void check_alltoall_splits(ShmComm& c, c10::ScalarType dt) {
  const int n = c.size();
  const int64_t es = c10::elementSize(dt);
  for (int p = 0; p < n; ++p) {
    const int64_t* sends = reinterpret_cast<const int64_t*>(c.slot(p));
    for (int q = 0; q < n; ++q) {
      const int64_t* recvs = reinterpret_cast<const int64_t*>(c.slot(q)) + n;
      ICHIBAN_DIST_CHECK(sends[q] == recvs[p], "ichiban: mismatched all_to_all splits: rank ", c.label(p),
                        " sends ", sends[q] / es, " elements to rank ", c.label(q), ", which expects ",
                        recvs[p] / es, " from it (input_split_sizes on each rank must match output_split_sizes "
                        "on the receiving rank)");
    }
  }
}

}  // namespace

const char* shm_alltoall(ShmComm& c, const char* in, const int64_t* in_off, const int64_t* in_len, char* out,
                  const int64_t* out_off, const int64_t* out_len, c10::ScalarType dt, Deadline dl) {
  const int n = c.size();
  const int r = c.rank();
  int64_t mine = 0;
  for (int q = 0; q < n; ++q) mine = std::max({mine, in_len[q], out_len[q]});
  OpDesc d = byte_desc(kOpAlltoall, mine);
  d.dtype = static_cast<int32_t>(dt);
  d.check_count = 0;  // splits differ per rank; the largest block sets the rounds
  c.begin("alltoall", d, dl);
  int64_t in_end = 0, out_end = 0;
  for (int q = 0; q < n; ++q) {
    in_end = std::max(in_end, in_off[q] + in_len[q]);
    out_end = std::max(out_end, out_off[q] + out_len[q]);
  }
  const bool apart = !overlap(in, in_end, out, out_end);
  c.next_unit();
  // Every rank publishes its whole split table so that every rank checks
  // every pair and all of them raise together; then, for direct copies, its
  // input offsets, the input's address, whether input and output are apart,
  // and the input's arena offset (-1: not host-shared): (3n + 3) int64
  // [sends; receives; input offsets; address; apart; arena offset].
  const bool table_fits = static_cast<size_t>(3 * n + 3) * sizeof(int64_t) <= c.slot_bytes();
  if (table_fits) {
    int64_t* t = reinterpret_cast<int64_t*>(c.my_slot());
    std::memcpy(t, in_len, n * sizeof(int64_t));
    std::memcpy(t + n, out_len, n * sizeof(int64_t));
    std::memcpy(t + 2 * n, in_off, n * sizeof(int64_t));
    t[3 * n] = static_cast<int64_t>(addr(in));
    t[3 * n + 1] = apart ? 1 : 0;
    t[3 * n + 2] = c.shared() ? arena_offset(in, in_end) : -1;
  }
  c.sync();
  if (table_fits) check_alltoall_splits(c, dt);
  int64_t biggest = 0;
  for (int p = 0; p < n; ++p) biggest = std::max(biggest, c.peer_desc(p).count);
  auto entry = [&](int p, int i) { return reinterpret_cast<const int64_t*>(c.slot(p))[3 * n + i]; };
  bool all_apart = table_fits;
  for (int p = 0; p < n && all_apart; ++p) all_apart = entry(p, 1) == 1;
  bool all_shared = all_apart && c.shared() && n > 1;
  for (int p = 0; p < n && all_shared; ++p) all_shared = entry(p, 2) >= 0;
  if (all_shared) {  // each rank copies its block from every peer's input, mapped here
    for (int k = 1; k < n; ++k) {
      const int p = (r + k) % n;
      const int64_t* t = reinterpret_cast<const int64_t*>(c.slot(p));
      if (out_len[p] > 0) std::memcpy(out + out_off[p], c.peer_arena(p) + entry(p, 2) + t[2 * n + r], out_len[p]);
    }
    if (out_len[r] > 0) std::memcpy(out + out_off[r], in + in_off[r], out_len[r]);
    c.next_unit();
    c.sync();  // nobody reads my input any more
    c.count_shared(in_end);
    return "shared";
  }
  if (all_apart && c.use_direct(biggest)) {  // each rank reads its block from every peer's input
    DirectReads rd(c);
    for (int k = 1; k < n; ++k) {
      const int p = (r + k) % n;
      const int64_t* t = reinterpret_cast<const int64_t*>(c.slot(p));
      rd.read(p, out + out_off[p], static_cast<uint64_t>(t[3 * n]) + t[2 * n + r], out_len[p]);
    }
    if (out_len[r] > 0) std::memcpy(out + out_off[r], in + in_off[r], out_len[r]);
    rd.finish();
    return "direct";
  }
  const int64_t w = std::max<int64_t>(static_cast<int64_t>(c.slot_bytes()) / n / kAlign * kAlign, kAlign);
  for (int64_t off = 0; off < biggest; off += w) {
    c.next_unit();
    for (int q = 0; q < n; ++q) {
      const int64_t m = std::min(w, in_len[q] - off);
      if ((q != r || !apart) && m > 0) std::memcpy(c.my_slot() + q * w, in + in_off[q] + off, m);
    }
    c.sync();
    for (int p = 0; p < n; ++p) {
      const int64_t m = std::min(w, out_len[p] - off);
      if (m <= 0) continue;
      // My block to myself skips the segment unless input and output overlap
      // (then this window of the input must be staged before any write).
      if (p == r && apart) std::memcpy(out + out_off[p] + off, in + in_off[p] + off, m);
      else std::memcpy(out + out_off[p] + off, c.slot(p) + r * w, m);
    }
  }
  return "oneshot";
}

void shm_gather(ShmComm& c, const void* in, void* out, int64_t bytes, int root, Deadline dl) {
  c.begin("gather", byte_desc(kOpGather, bytes, root), dl);
  gather_chunks(c, in, out, bytes, root);
}

void shm_scatter(ShmComm& c, const void* in, void* out, int64_t bytes, int root, Deadline dl) {
  c.begin("scatter", byte_desc(kOpScatter, bytes, root), dl);
  const int n = c.size();
  const char* src = static_cast<const char*>(in);
  const int64_t per = std::max<int64_t>(static_cast<int64_t>(c.slot_bytes()) / n / kAlign * kAlign, kAlign);
  int64_t off = 0;
  do {
    const int64_t m = std::min(per, bytes - off);
    c.next_unit();
    if (c.rank() == root)
      for (int q = 0; q < n; ++q) std::memcpy(c.my_slot() + q * per, src + q * bytes + off, m);
    c.sync();
    std::memcpy(static_cast<char*>(out) + off, c.slot(root) + c.rank() * per, m);
    off += m;
  } while (off < bytes);
}

}  // namespace ichiban
