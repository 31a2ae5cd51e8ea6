// Error helpers shared by every C++ file of ichiban_comm.
//
// ICHIBAN_CHECK_ARG raises ValueError in Python (a bad argument: say which and
// what was expected); ICHIBAN_CHECK raises RuntimeError (a failed operation:
// say what failed and where). Both accept a message built from any streamable
// pieces, like TORCH_CHECK.
#pragma once

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstring>
#include <string>

#define ICHIBAN_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#define ICHIBAN_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace ichiban {

// "what: strerror(errno)" for a failed system call.
inline std::string sys_error(const std::string& what, int err = errno) {
  return what + ": " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
}

}  // namespace ichiban
