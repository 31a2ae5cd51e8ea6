// The members of one process group on one host, talking through one shared
// segment: per-rank step counters (a barrier is "publish step t, wait until
// every peer reached t"), per-rank operation descriptors (checked at the first
// barrier of every op, so mismatched sizes or dtypes across ranks are an error
// rather than corruption) and per-rank data slots.
//
// Segment layout (offsets in bytes):
//   [0, 4096)                      Header
//   [4096, 4096 + n*256)           RankCtl of rank 0..n-1, one cache-line group each
//   [data_offset, +kBuffers*n*slot) slot(buffer b, rank p) at data_offset + (b*n + p)*slot
//
// Lock-step algorithms use buffers 0 and 1, alternating per unit of work (one
// chunk of one op: write own slot, >= 1 barrier, read peers' slots). Unit u+2
// reuses unit u's buffer only after every rank passed unit u+1's first
// barrier, i.e. after all reads of unit u.
//
// Pipelined algorithms use the kPipeDepth buffers after those. Each rank
// publishes how many chunks it has passed through each stage (stage_count),
// and waits only for the peers' stages it depends on, so a rank that has the
// core can run several chunks ahead of one that does not. They open with a
// full barrier (every peer has left the previous op) and their buffers are
// disjoint from the lock-step ones, so neither kind can overwrite a slot the
// other is still reading.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "shm/segment.h"
#include "shm/wait.h"

namespace ichiban {

// What one rank is about to do; compared across ranks at an op's first barrier.
struct OpDesc {
  uint32_t op = 0;        // OpCode
  int32_t dtype = -1;     // c10::ScalarType, -1 for byte ops
  int32_t redop = -1;
  int32_t root = -1;
  int64_t count = 0;      // elements (or bytes for dtype -1)
  uint32_t check_count = 1;
  uint32_t pad = 0;
};

enum OpCode : uint32_t {
  kOpBarrier = 1, kOpAllreduce, kOpBroadcast, kOpAllgather, kOpReduceScatter, kOpAlltoall,
  kOpGather, kOpScatter, kOpReduce, kOpSetup,
};
const char* opcode_name(uint32_t op);

class ShmComm {
 public:
  static constexpr size_t kHeaderBytes = 4096;
  static constexpr size_t kCtlBytes = 256;
  static constexpr int kPipeDepth = 4;
  static constexpr int kBuffers = 2 + kPipeDepth;
  static constexpr int kStages = 3;

  static size_t data_offset(int n);
  static size_t segment_bytes(int n, size_t slot_bytes);

  // labels[p]: how rank p is named in errors (its rank in the process group).
  ShmComm(std::unique_ptr<ShmSegment> seg, bool creator, int rank, int n, size_t slot_bytes,
          WaitPolicy policy, std::string group_label, std::vector<int> labels);

  int rank() const { return rank_; }
  int size() const { return n_; }
  int label(int p) const { return labels_[p]; }  // rank p's rank in the process group
  size_t slot_bytes() const { return slot_; }
  ShmSegment& segment() { return *seg_; }

  // Start an op: descriptor to check at the next barrier, deadline for all waits.
  void begin(const char* opname, const OpDesc& desc, std::chrono::steady_clock::time_point deadline);
  // Advance to the next unit of work (flips the buffer).
  void next_unit() { ++unit_; }
  char* slot(int p) const;  // this unit's slot of rank p
  char* my_slot() const { return slot(rank_); }
  // Barrier across the host's members. The first one after begin() compares descriptors.
  void sync();
  // Descriptor of peer p at the last barrier (after sync()).
  const OpDesc& peer_desc(int p) const;

  // Pipelined algorithms. The slot of rank p in pipeline buffer i (0..kPipeDepth-1).
  char* pipe_slot(int i, int p) const;
  // Chunks rank p has passed through stage s (counts wrap; equal on every
  // rank between ops).
  uint32_t stage_count(int p, int s) const;
  // Count one more chunk through my stage s and wake whoever waits on me.
  void advance(int s);
  // Peer p's progress word; wait_progress returns once it moved past `seen`
  // (raising on the deadline or a dead peer, like sync()).
  uint32_t progress(int p) const;
  void wait_progress(int p, uint32_t seen);

  // A wait that failed (timeout, dead peer) leaves peers mid-op: every later op fails fast.
  bool broken() const { return !broken_reason_.empty(); }

  // The group's sequence number of the op about to run (named in errors).
  void set_seq(uint64_t seq) { seq_ = seq; }
  // Every wait checks *flag after each sleep slice and fails once it is set
  // (the backend's abort()): a stopped peer cannot hold an abort.
  void set_abort_flag(const std::atomic<bool>* flag) { abort_ = flag; }

  // Liveness. Peers are checked by pid (kill(pid, 0)) while every member sees
  // the others' pids, i.e. shares this PID namespace; a member in another one
  // (a container sharing /dev/shm and the hostname) would be reported as
  // exited, or another process mistaken for it. setup_liveness is collective,
  // once, after every member mapped the segment: if the members' namespaces
  // differ (or mode is "heartbeat"), each member bumps a heartbeat counter in
  // its RankCtl from a background thread, and a peer whose counter stays
  // still for heartbeat_ms is reported as not responding. mode: "auto",
  // "pid" or "heartbeat".
  void setup_liveness(const std::string& mode, int64_t heartbeat_ms);
  bool heartbeat() const { return heartbeat_; }

  // Single-copy reads (shm/cma.h). setup_direct is collective, once, right
  // after every member mapped the segment: each member that `want`s it reads
  // a probe word from every peer; direct() is true on all members only if
  // every read succeeded, so all of them take the same path in every op.
  void setup_direct(bool want, int64_t min_bytes, std::chrono::steady_clock::time_point deadline);
  bool direct() const { return direct_; }
  // Whether an op whose largest per-peer block is `bytes` copies directly.
  bool use_direct(int64_t bytes) const { return direct_ && n_ > 1 && bytes >= direct_min_; }
  // Reads `bytes` at `src` (an address in peer p's process) into dst;
  // returns 0 or an errno (counted in direct_bytes() on success).
  int read_peer(int p, void* dst, uint64_t src, int64_t bytes);
  // Raises for a failed read_peer (after the op's last barrier).
  [[noreturn]] void direct_failed(int p, int err);
  int64_t direct_bytes() const { return direct_bytes_.load(std::memory_order_relaxed); }
  // Payload bytes of the ops this rank ran through this host's segment (each op's descriptor
  // count times its element size; barriers and set-up are not counted), and the same summed
  // over every group of this process.
  int64_t local_bytes() const { return local_bytes_.load(std::memory_order_relaxed); }
  static int64_t global_local_bytes();

  // Host-shared tensors (shm/arena.h). setup_shared is collective, once,
  // after setup_direct: every member with an arena publishes it, maps every
  // peer's, and shared() is true on all members only if all of them could.
  // Then an op may read and write a peer's tensors in place when every peer
  // publishes their arena offsets (collectives/algorithms.h).
  void setup_shared(bool want, std::chrono::steady_clock::time_point deadline);
  bool shared() const { return shared_; }
  const std::string& shared_declined() const { return shared_why_; }  // why not, on this rank ("" if it is)
  char* peer_arena(int p) const { return peer_arena_[p]; }  // peer p's arena mapped here (read-write)
  void count_shared(int64_t bytes) { shared_bytes_.fetch_add(bytes, std::memory_order_relaxed); }
  int64_t shared_bytes() const { return shared_bytes_.load(std::memory_order_relaxed); }  // of ops run that way

 private:
  struct Header;
  struct RankCtl;
  Header* header() const;
  RankCtl* ctl(int p) const;
  void check_descs();
  // only >= 0: name just that rank as missing (a pipelined wait); else every
  // rank that has not reached target.
  [[noreturn]] void fail_wait(uint32_t target, const std::string& why, int only = -1);
  void on_slice(int p, uint32_t target, int only = -1);
  void on_pipeline_slice();
  std::string rank_and_pid(int p, int32_t pid) const;  // "rank 2 (pid 1234)", as errors name them
  // "" while peer p is alive, else why not ("rank 2 (pid 1234) exited").
  std::string peer_gone(int p);
  void check_abort(uint32_t target, int only);

  std::unique_ptr<ShmSegment> seg_;
  int rank_;
  int n_;
  size_t slot_;
  WaitPolicy policy_;
  std::string group_;
  std::vector<int> labels_;
  uint32_t step_ = 0;
  uint64_t unit_ = 0;
  bool pending_desc_ = false;
  OpDesc desc_;
  const char* opname_ = "";
  std::chrono::steady_clock::time_point deadline_;
  std::string broken_reason_;
  bool direct_ = false;
  int64_t direct_min_ = INT64_MAX;
  uint64_t probe_ = 0;  // read by peers in setup_direct
  std::atomic<int64_t> direct_bytes_{0};
  std::atomic<int64_t> local_bytes_{0};
  bool shared_ = false;
  std::string shared_why_;
  std::vector<char*> peer_arena_;
  std::atomic<int64_t> shared_bytes_{0};
  uint64_t seq_ = 0;
  const std::atomic<bool>* abort_ = nullptr;
  bool heartbeat_ = false;
  int64_t heartbeat_ms_ = 0;
  std::vector<uint32_t> beat_seen_;  // per peer: last heartbeat value seen and when
  std::vector<std::chrono::steady_clock::time_point> beat_at_;
  std::unique_ptr<std::thread> beater_;
  std::atomic<bool> beater_stop_{false};

 public:
  ~ShmComm();
};

}  // namespace ichiban
