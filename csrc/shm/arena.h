// Host-shared tensor memory: a CPU allocator whose large blocks live in one
// memfd-backed arena per process, which the other ranks of the host map.
//
// A private tensor can only reach a peer through a copy (into the shared
// segment, or by the kernel's single copy). When every rank's tensor is in
// its arena, all-reduce needs no copy at all: each rank reduces its segment
// straight from every rank's tensor and writes the result into all of them
// (ShmComm::shared, the "inplace" all-reduce). That reads and writes the
// message once per rank, where two-shot moves 4.5x it at world size 4.
//
// Opt-in (ICHIBAN_SHARED_TENSORS=1, or enable_shared_tensors() before the
// tensors and the process group are created), because it changes two things
// for every CPU tensor of the process:
//  - freed blocks stay in the arena for reuse (like a caching allocator)
//    until arena_trim() returns their pages;
//  - a child forked after it was enabled shares (does not copy) the parent's
//    arena tensors. The child allocates nothing new from the arena.
// Blocks below min_bytes, and everything once the arena is full, come from
// the allocator that was installed before.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace ichiban {

// What a peer needs to map this process's arena (id 0: no arena).
struct ArenaInfo {
  int32_t pid = 0;
  int32_t fd = -1;
  uint64_t id = 0;        // random; the arena's first 8 bytes, checked by whoever maps it
  uint64_t reserve = 0;   // bytes mapped (the arena never moves or grows past this)
};

struct ArenaStats {
  uint64_t reserve = 0;
  uint64_t top = 0;        // high-water mark of the arena (bytes ever carved)
  uint64_t in_use = 0;     // bytes in live blocks
  uint64_t free_bytes = 0; // carved but free (kept for reuse)
  uint64_t allocations = 0;  // blocks served from the arena
  uint64_t fallbacks = 0;    // large requests that did not fit (served by the previous allocator)
};

// Installs the allocator (idempotent; the first call's sizes stand).
// reserve_bytes 0: the machine's physical memory. Raises if another CPU
// allocator of higher priority is installed or the arena cannot be mapped.
void arena_enable(uint64_t reserve_bytes, uint64_t min_bytes);
bool arena_enabled();  // false in a child forked after arena_enable
ArenaInfo arena_info();
ArenaStats arena_stats();
// Offset of [p, p + bytes) in this process's arena, or -1 if it is not inside it.
int64_t arena_offset(const void* p, int64_t bytes);
// Returns the pages of every free block to the system; returns the bytes released.
uint64_t arena_trim();

// The base address of a peer's arena mapped read-write into this process (cached per
// (pid, id) for the life of the process), or nullptr with *err set. Needs the
// same access as reading /proc/<pid>/fd (same user, no ptrace restriction).
char* arena_map_peer(const ArenaInfo& peer, std::string* err);

}  // namespace ichiban
