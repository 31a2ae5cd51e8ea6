#include "shm/comm.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <sstream>

#include <c10/core/ScalarType.h>

#include "common/errors.h"
#include "shm/arena.h"
#include "shm/cma.h"

namespace ichiban {

namespace {
constexpr uint64_t kMagic = 0x6e61626968636921ULL;  // "!ichiban"

// False once pid has exited, including as a zombie its parent has not reaped.
bool pid_alive(int32_t pid) {
  if (kill(pid, 0) != 0) return errno != ESRCH;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (!f) return true;
  char buf[512];
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close = std::strrchr(buf, ')');  // "pid (comm) S ..."
  return !(close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X'));
}
// The inode of this process's PID namespace (0 when /proc does not say).
uint64_t pid_namespace() {
  struct stat st;
  return stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

// How often a member in heartbeat mode bumps its counter: a fraction of the
// staleness limit, so a peer is declared gone only after many missed beats.
constexpr int kBeatsPerLimit = 20;
}  // namespace

struct ShmComm::Header {
  uint64_t magic;
  uint32_t nranks;
  uint32_t pad;
  uint64_t slot_bytes;
  alignas(64) std::atomic<uint32_t> sleepers;
};

struct ShmComm::RankCtl {
  alignas(64) std::atomic<uint32_t> step;  // futex word: barriers and pipeline progress
  int32_t pid;
  uint32_t direct_ok;  // setup_direct: this rank could read every peer
  uint32_t shared_ok;  // setup_shared: this rank has an arena and mapped every peer's
  alignas(64) OpDesc desc[2];  // indexed by barrier parity
  alignas(64) std::atomic<uint32_t> stage[kStages];
  uint64_t pidns;                    // inode of the member's PID namespace
  std::atomic<uint32_t> heartbeat;   // bumped by the member's beat thread (heartbeat mode)
};

const char* opcode_name(uint32_t op) {
  switch (op) {
    case kOpBarrier: return "barrier";
    case kOpAllreduce: return "allreduce";
    case kOpBroadcast: return "broadcast";
    case kOpAllgather: return "allgather";
    case kOpReduceScatter: return "reduce_scatter";
    case kOpAlltoall: return "alltoall";
    case kOpGather: return "gather";
    case kOpScatter: return "scatter";
    case kOpReduce: return "reduce";
    case kOpSetup: return "group setup";
  }
  return "unknown op";
}

size_t ShmComm::data_offset(int n) {
  size_t ctl_end = kHeaderBytes + static_cast<size_t>(n) * kCtlBytes;
  return (ctl_end + 4095) / 4096 * 4096;
}

size_t ShmComm::segment_bytes(int n, size_t slot_bytes) {
  return data_offset(n) + kBuffers * static_cast<size_t>(n) * slot_bytes;
}

ShmComm::ShmComm(std::unique_ptr<ShmSegment> seg, bool creator, int rank, int n, size_t slot_bytes,
                 WaitPolicy policy, std::string group_label, std::vector<int> labels)
    : seg_(std::move(seg)), rank_(rank), n_(n), slot_(slot_bytes), policy_(policy),
      group_(std::move(group_label)), labels_(std::move(labels)) {
  static_assert(sizeof(RankCtl) <= kCtlBytes, "RankCtl must fit its 256-byte stride");
  static_assert(sizeof(Header) <= kHeaderBytes, "Header must fit its page");
  ICHIBAN_CHECK(seg_->size() >= segment_bytes(n, slot_bytes), "ichiban: segment too small");
  Header* h = header();
  if (creator) {
    // Fresh pages read as zero: counters start at 0. Magic goes last.
    h->nranks = static_cast<uint32_t>(n);
    h->slot_bytes = slot_bytes;
    std::atomic_thread_fence(std::memory_order_release);
    h->magic = kMagic;
  } else {
    ICHIBAN_CHECK(h->magic == kMagic && h->nranks == static_cast<uint32_t>(n) && h->slot_bytes == slot_bytes,
                  "ichiban: shared-memory segment ", seg_->name(), " does not match this group (", n,
                  " ranks, ", slot_bytes, "-byte slots): another job may be using the same name");
  }
  ctl(rank_)->pid = static_cast<int32_t>(getpid());
  ctl(rank_)->pidns = pid_namespace();
}

ShmComm::~ShmComm() {
  if (beater_) {
    beater_stop_.store(true);
    beater_->join();
  }
}

void ShmComm::setup_liveness(const std::string& mode, int64_t heartbeat_ms) {
  ICHIBAN_CHECK_ARG(mode == "auto" || mode == "pid" || mode == "heartbeat",
                    "ichiban: liveness must be 'auto', 'pid' or 'heartbeat', got '", mode, "'");
  ICHIBAN_CHECK_ARG(heartbeat_ms > 0, "ichiban: heartbeat_ms must be positive, got ", heartbeat_ms);
  bool mixed = false;
  for (int p = 0; p < n_; ++p) mixed = mixed || ctl(p)->pidns != ctl(rank_)->pidns || ctl(p)->pidns == 0;
  // Every member sees the same namespaces, so all of them choose the same mode.
  heartbeat_ = n_ > 1 && (mode == "heartbeat" || (mode == "auto" && mixed));
  if (mode == "pid" && mixed)
    std::fprintf(stderr, "[ichiban] group %s: members live in different PID namespaces but liveness=pid: "
                 "a peer's exit is detected by the timeout only\n", group_.c_str());
  if (!heartbeat_) return;
  heartbeat_ms_ = heartbeat_ms;
  beat_seen_.assign(n_, 0);
  beat_at_.assign(n_, std::chrono::steady_clock::now());
  for (int p = 0; p < n_; ++p) beat_seen_[p] = ctl(p)->heartbeat.load(std::memory_order_acquire);
  std::atomic<uint32_t>* mine = &ctl(rank_)->heartbeat;
  const auto period = std::chrono::milliseconds(std::max<int64_t>(1, heartbeat_ms / kBeatsPerLimit));
  beater_ = std::make_unique<std::thread>([this, mine, period] {
    while (!beater_stop_.load(std::memory_order_relaxed)) {
      mine->fetch_add(1, std::memory_order_release);
      std::this_thread::sleep_for(period);
    }
  });
}

std::string ShmComm::peer_gone(int p) {
  const int32_t pid = ctl(p)->pid;
  if (!heartbeat_) return (pid > 0 && !pid_alive(pid)) ? rank_and_pid(p, pid) + " exited" : "";
  const auto now = std::chrono::steady_clock::now();
  const uint32_t beat = ctl(p)->heartbeat.load(std::memory_order_acquire);
  if (beat != beat_seen_[p]) {
    beat_seen_[p] = beat;
    beat_at_[p] = now;
    return "";
  }
  const auto quiet = std::chrono::duration_cast<std::chrono::milliseconds>(now - beat_at_[p]).count();
  if (quiet < heartbeat_ms_) return "";
  return "rank " + std::to_string(labels_[p]) + " (in another PID namespace) exited or stopped responding: no "
         "heartbeat for " + std::to_string(quiet) + " ms";
}

void ShmComm::check_abort(uint32_t target, int only) {
  if (abort_ && abort_->load(std::memory_order_acquire)) fail_wait(target, "was aborted", only);
}

ShmComm::Header* ShmComm::header() const { return static_cast<Header*>(seg_->data()); }

ShmComm::RankCtl* ShmComm::ctl(int p) const {
  return reinterpret_cast<RankCtl*>(static_cast<char*>(seg_->data()) + kHeaderBytes + p * kCtlBytes);
}

char* ShmComm::slot(int p) const {
  size_t b = unit_ & 1;
  return static_cast<char*>(seg_->data()) + data_offset(n_) + (b * n_ + p) * slot_;
}

char* ShmComm::pipe_slot(int i, int p) const {
  return static_cast<char*>(seg_->data()) + data_offset(n_) + ((2 + i) * n_ + p) * slot_;
}

uint32_t ShmComm::stage_count(int p, int s) const { return ctl(p)->stage[s].load(std::memory_order_acquire); }

uint32_t ShmComm::progress(int p) const { return ctl(p)->step.load(std::memory_order_acquire); }

void ShmComm::advance(int s) {
  RankCtl* me = ctl(rank_);
  me->stage[s].store(me->stage[s].load(std::memory_order_relaxed) + 1, std::memory_order_release);
  ++step_;
  flag_publish(&me->step, step_, &header()->sleepers);
}

std::string ShmComm::rank_and_pid(int p, int32_t pid) const {
  return "rank " + std::to_string(labels_[p]) + " (pid " + std::to_string(pid) + ")";
}

void ShmComm::wait_progress(int p, uint32_t seen) {
  std::atomic<uint32_t>* word = &ctl(p)->step;
  if (word->load(std::memory_order_acquire) != seen) return;
  flag_wait(word, seen + 1, &header()->sleepers, policy_, [&] { on_pipeline_slice(); });
}

// In a pipelined op the peer waited on may itself be waiting on another one,
// so every peer's liveness is checked; on the deadline the rank furthest
// behind is the one named.
void ShmComm::on_pipeline_slice() {
  int behind = -1, first_dead = -1;
  std::string dead;
  for (int q = 0; q < n_; ++q) {
    if (q == rank_) continue;
    const std::string gone = peer_gone(q);
    if (!gone.empty()) {
      dead += (dead.empty() ? "" : ", ") + gone;
      if (first_dead < 0) first_dead = q;
    }
    if (behind < 0 || static_cast<int32_t>(progress(q) - progress(behind)) < 0) behind = q;
  }
  // Name every dead peer: one that failed because another died may be gone too.
  if (!dead.empty()) fail_wait(0, "failed: " + dead, first_dead);
  check_abort(0, behind);
  if (std::chrono::steady_clock::now() >= deadline_) fail_wait(0, "timed out", behind);
}

namespace {
std::atomic<int64_t> g_local_bytes{0};
}  // namespace

void ShmComm::begin(const char* opname, const OpDesc& desc, std::chrono::steady_clock::time_point deadline) {
  ICHIBAN_DIST_CHECK(!broken(), "ichiban: ", opname, " (sequence number ", seq_, ") on group '", group_,
                     "' cannot run: the group failed earlier (", broken_reason_,
                     "); destroy it and create a new one");
  opname_ = opname;
  desc_ = desc;
  pending_desc_ = true;
  deadline_ = deadline;
  if (n_ > 1 && desc.op != kOpBarrier && desc.op != kOpSetup) {
    const int64_t es = desc.dtype < 0 ? 1 : static_cast<int64_t>(c10::elementSize(static_cast<c10::ScalarType>(desc.dtype)));
    local_bytes_.fetch_add(desc.count * es, std::memory_order_relaxed);
    g_local_bytes.fetch_add(desc.count * es, std::memory_order_relaxed);
  }
}

int64_t ShmComm::global_local_bytes() { return g_local_bytes.load(std::memory_order_relaxed); }

const OpDesc& ShmComm::peer_desc(int p) const { return ctl(p)->desc[step_ & 1]; }

void ShmComm::fail_wait(uint32_t target, const std::string& why, int only) {
  std::ostringstream missing;
  bool first = true;
  for (int p = 0; p < n_; ++p) {
    if (p == rank_ || (only >= 0 && p != only)) continue;
    if (only < 0 && reached(ctl(p)->step.load(std::memory_order_acquire), target)) continue;
    missing << (first ? "" : ", ") << labels_[p];
    first = false;
  }
  std::ostringstream msg;
  msg << "ichiban: " << opname_ << " (sequence number " << seq_ << ") on group '" << group_ << "' " << why
      << "; ranks still missing: [" << missing.str() << "] (this is rank " << labels_[rank_] << ")";
  broken_reason_ = msg.str();
  throw_dist_error(broken_reason_);
}

void ShmComm::on_slice(int p, uint32_t target, int only) {
  check_abort(target, only);
  const std::string gone = peer_gone(p);
  if (!gone.empty()) fail_wait(target, "failed: " + gone, only);
  if (std::chrono::steady_clock::now() >= deadline_) fail_wait(target, "timed out", only);
}

void ShmComm::sync() {
  const uint32_t target = step_ + 1;
  RankCtl* me = ctl(rank_);
  if (pending_desc_) me->desc[target & 1] = desc_;
  flag_publish(&me->step, target, &header()->sleepers);
  for (int p = 0; p < n_; ++p) {
    if (p == rank_) continue;
    std::atomic<uint32_t>* word = &ctl(p)->step;
    // Peer already there (the common case when ranks have cores): skip the
    // out-of-line wait and the callback object it needs.
    if (reached(word->load(std::memory_order_acquire), target)) continue;
    flag_wait(word, target, &header()->sleepers, policy_, [&] { on_slice(p, target); });
  }
  step_ = target;
  if (pending_desc_) {
    pending_desc_ = false;
    check_descs();
  }
}

void ShmComm::check_descs() {
  auto describe = [](const OpDesc& d) {
    std::ostringstream s;
    s << opcode_name(d.op);
    if (d.dtype >= 0) {
      s << " of " << d.count << " " << c10::toString(static_cast<c10::ScalarType>(d.dtype)) << " elements";
    } else if (d.check_count) {
      s << " of " << d.count << " bytes";
    }
    if (d.redop >= 0) s << " (reduce op " << d.redop << ")";
    if (d.root >= 0) s << " (root " << d.root << ")";
    return s.str();
  };
  // Every rank sees every descriptor, so all of them raise together and the
  // group stays usable.
  std::ostringstream others;
  int first = -1;
  for (int p = 0; p < n_; ++p) {
    const OpDesc& d = ctl(p)->desc[step_ & 1];
    bool same = d.op == desc_.op && d.dtype == desc_.dtype && d.redop == desc_.redop && d.root == desc_.root &&
                (!desc_.check_count || d.count == desc_.count);
    if (same) continue;
    others << (first < 0 ? "" : ", ") << labels_[p];
    if (first < 0) first = p;
  }
  if (first < 0) return;
  throw_dist_error(c10::str("ichiban: mismatched collectives on group '", group_, "' at sequence number ", seq_,
                            ": rank ", labels_[rank_], " called ", describe(desc_), " while rank ",
                            labels_[first], " called ", describe(ctl(first)->desc[step_ & 1]),
                            "; ranks that disagree with rank ", labels_[rank_], ": [", others.str(),
                            "] (every rank must call the same op with the same sizes and dtype)"));
}

void ShmComm::setup_direct(bool want, int64_t min_bytes, std::chrono::steady_clock::time_point deadline) {
  direct_ = false;
  direct_min_ = min_bytes;
  if (n_ == 1) return;
  probe_ = kMagic ^ static_cast<uint64_t>(getpid());
  OpDesc d;
  d.op = kOpSetup;
  begin("group setup", d, deadline);
  next_unit();
  const uint64_t mine = reinterpret_cast<uint64_t>(&probe_);
  std::memcpy(my_slot(), &mine, sizeof(mine));
  sync();
  bool ok = want;
  for (int p = 0; p < n_ && ok; ++p) {
    if (p == rank_) continue;
    uint64_t where, got = 0;
    std::memcpy(&where, slot(p), sizeof(where));
    ok = cma_read(ctl(p)->pid, &got, where, sizeof(got)) == 0 &&
         got == (kMagic ^ static_cast<uint64_t>(ctl(p)->pid));
  }
  ctl(rank_)->direct_ok = ok ? 1 : 0;
  sync();  // the same unit: nobody writes the slots meanwhile
  bool all = true;
  for (int p = 0; p < n_; ++p) all = all && ctl(p)->direct_ok == 1;
  direct_ = all;
}

void ShmComm::setup_shared(bool want, std::chrono::steady_clock::time_point deadline) {
  shared_ = false;
  peer_arena_.assign(n_, nullptr);
  if (n_ == 1) return;
  const ArenaInfo mine = want ? arena_info() : ArenaInfo{};
  shared_why_ = !want ? "turned off on this rank" : mine.id == 0 ? "no arena in this process" : "";
  OpDesc d;
  d.op = kOpSetup;
  begin("group setup", d, deadline);
  next_unit();
  std::memcpy(my_slot(), &mine, sizeof(mine));
  sync();
  bool ok = mine.id != 0;
  for (int p = 0; p < n_ && ok; ++p) {
    if (p == rank_) continue;
    ArenaInfo peer;
    std::memcpy(&peer, slot(p), sizeof(peer));
    if (peer.id == 0) {
      ok = false;
      shared_why_ = rank_and_pid(p, ctl(p)->pid) + " has no arena";
      break;
    }
    std::string err;
    peer_arena_[p] = arena_map_peer(peer, &err);
    if (!peer_arena_[p]) {
      ok = false;
      shared_why_ = "cannot map the arena of " + rank_and_pid(p, ctl(p)->pid) + ": " + err;
    }
  }
  ctl(rank_)->shared_ok = ok ? 1 : 0;
  sync();  // the same unit: nobody writes the slots meanwhile
  bool all = true;
  for (int p = 0; p < n_; ++p) all = all && ctl(p)->shared_ok == 1;
  if (ok && !all) shared_why_ = "a peer could not map every arena";
  shared_ = all;
}

int ShmComm::read_peer(int p, void* dst, uint64_t src, int64_t bytes) {
  const int err = cma_read(ctl(p)->pid, dst, src, bytes);
  if (err == 0) direct_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  return err;
}

void ShmComm::direct_failed(int p, int err) {
  const int32_t pid = ctl(p)->pid;
  if (err == ESRCH || !pid_alive(pid)) fail_wait(0, "failed: " + rank_and_pid(p, pid) + " exited", p);
  throw_dist_error(c10::str("ichiban: ", opname_, " (sequence number ", seq_, ") on group '", group_,
                            "': reading ", rank_and_pid(p, pid), "'s buffer directly failed: ", std::strerror(err),
                            " (set ICHIBAN_CMA=0 or IchibanOptions(direct=False) to copy through shared memory "
                            "instead)"));
}

}  // namespace ichiban
