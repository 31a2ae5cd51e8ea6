// Error helpers shared by every C++ file of ichiban_comm.
//
// ICHIBAN_CHECK_ARG raises ValueError in Python (a bad argument: say which and
// what was expected); ICHIBAN_CHECK raises RuntimeError (a failed operation:
// say what failed and where); ICHIBAN_DIST_CHECK raises
// torch.distributed.DistBackendError (a collective that failed: timeout, dead
// or stuck peer, ranks that disagree), as NCCL and Gloo do. All accept a
// message built from any streamable pieces, like TORCH_CHECK.
//
// ICHIBAN_DIST_CHECK does not capture a native backtrace: TORCH_CHECK's error
// walks every frame of the throwing thread, including frames of libraries
// built by other toolchains, and that unwinder is where a failing op crashed
// a process instead of raising (pytorch/pytorch#117645). The message names the
// op, group, sequence number and ranks instead, which is what a user needs.
#pragma once

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstring>
#include <string>

#define ICHIBAN_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#define ICHIBAN_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define ICHIBAN_DIST_CHECK(cond, ...)                                              \
  do {                                                                              \
    if (C10_UNLIKELY(!(cond))) ::ichiban::throw_dist_error(::c10::str(__VA_ARGS__)); \
  } while (0)

namespace ichiban {

// torch.distributed.DistBackendError in Python; no backtrace is taken.
[[noreturn]] inline void throw_dist_error(std::string msg) {
  throw ::c10::DistBackendError(std::move(msg), /*backtrace=*/nullptr);
}

// "what: strerror(errno)" for a failed system call.
inline std::string sys_error(const std::string& what, int err = errno) {
  return what + ": " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
}

}  // namespace ichiban
