// Collectives over one host's shared segment (ShmComm), on contiguous buffers.
//
// Every function starts an op (descriptor + deadline), so callers only pass
// raw pointers and sizes; large messages go through the slots chunk by chunk.
//   allreduce one-shot : write my chunk, barrier, each rank reduces all slots.
//                        1 barrier/chunk; reads n*C per rank: best for small C.
//   allreduce two-shot : write my chunk, barrier, rank r reduces segment r into
//                        its own slot, barrier, everyone copies all segments out.
//                        2 barriers/chunk; reads ~2C per rank: best for large C.
//                        On host-shared tensors (shm/arena.h) it reads the
//                        peers' tensors in place and copies nothing in.
//   allreduce ring     : reduce-scatter by passing partial segments to the next
//                        rank (n-1 steps), then all-gather: n barriers/chunk.
#pragma once

#include <c10/core/ScalarType.h>

#include <chrono>
#include <cstdint>

#include "collectives/reduce.h"
#include "shm/comm.h"

namespace ichiban {

enum class Algo : uint8_t { kAuto = 0, kOneShot, kTwoShot, kRing, kHier, kFlat };
const char* algo_name(Algo a);
Algo parse_algo(const std::string& s);  // "", "auto", "oneshot", "twoshot", "ring", "hier", "flat"

using Deadline = std::chrono::steady_clock::time_point;

void shm_barrier(ShmComm& c, Deadline dl);

// data: count elements, reduced in place. avg_divisor: n of the whole group
// (the hierarchical path divides only once, at the end). Returns true when
// two-shot ran on host-shared tensors ("inplace": ShmComm::shared and every
// rank's tensor in its arena).
bool shm_allreduce(ShmComm& c, Algo algo, void* data, int64_t count, c10::ScalarType dt, RedOp op,
                   int avg_divisor, Deadline dl);

// Ops on host-shared buffers (ShmComm::shared, shm/arena.h: every rank's
// buffers in its arena, of kSharedMinBytes = 64 KiB or more) read and write
// the peers' buffers directly instead of going through the slots.

// root's bytes to everyone. True when it ran on host-shared buffers.
bool shm_broadcast(ShmComm& c, void* data, int64_t bytes, int root, Deadline dl);

// in: bytes per rank; out: n*bytes, rank p's at p*bytes. Returns the path:
// "shared" (each rank wrote its input into every output), "direct" (inputs
// read from the peers, ShmComm::use_direct) or "oneshot" (the slots).
const char* shm_allgather(ShmComm& c, const void* in, void* out, int64_t bytes, Deadline dl);

// in: n*count elements; out: count elements (block r reduced over ranks).
// True when it ran on host-shared buffers.
bool shm_reduce_scatter(ShmComm& c, const void* in, void* out, int64_t count, c10::ScalarType dt, RedOp op,
                        int avg_divisor, Deadline dl);

// Block q of `in` (in_off[q], in_len[q] bytes) goes to rank q; block p of
// `out` (out_off[p], out_len[p]) comes from rank p. in_len[q] on rank p must
// equal out_len[p] on rank q. Returns the path, as shm_allgather.
const char* shm_alltoall(ShmComm& c, const char* in, const int64_t* in_off, const int64_t* in_len, char* out,
                  const int64_t* out_off, const int64_t* out_len, c10::ScalarType dt, Deadline dl);

// in: bytes from each rank; out (root only): n*bytes.
void shm_gather(ShmComm& c, const void* in, void* out, int64_t bytes, int root, Deadline dl);

// in (root only): n*bytes; out: bytes.
void shm_scatter(ShmComm& c, const void* in, void* out, int64_t bytes, int root, Deadline dl);

}  // namespace ichiban
