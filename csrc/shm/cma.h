// Single-copy reads from a peer process's memory (Linux cross-memory attach,
// process_vm_readv). A collective that moves whole buffers (all-gather,
// broadcast, all-to-all) can then copy each byte once, from the owner's
// tensor straight into the reader's, instead of twice through the shared
// segment. Needs the same user and no ptrace restriction between the ranks
// (a container's seccomp profile or Yama can forbid it): ShmComm probes it
// when a group is created and every member falls back together.
#pragma once

#include <sys/types.h>

#include <cstdint>

namespace ichiban {

// Copies `bytes` from address `src` in process `pid` to `dst`, in pieces that
// keep the kernel's page pinning short. Returns 0, or the errno of the failed
// call (ESRCH: the process is gone; EPERM: not allowed; EFAULT: bad address).
int cma_read(pid_t pid, void* dst, uint64_t src, int64_t bytes);

}  // namespace ichiban
