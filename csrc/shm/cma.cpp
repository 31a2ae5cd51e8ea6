#include "shm/cma.h"

#include <sys/uio.h>

#include <algorithm>
#include <cerrno>

namespace ichiban {

namespace {
// The kernel pins every page of a piece before copying it: small pieces pay
// that per call, one call over a whole large range loses the cache. Pieces of
// about 1 MiB sit between the two and come close to memcpy's rate.
constexpr int64_t kPiece = 1 << 20;
}  // namespace

int cma_read(pid_t pid, void* dst, uint64_t src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  int64_t done = 0;
  while (done < bytes) {
    const int64_t want = std::min(kPiece, bytes - done);
    struct iovec local{d + done, static_cast<size_t>(want)};
    struct iovec remote{reinterpret_cast<void*>(src + done), static_cast<size_t>(want)};
    const ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (got == 0) return EFAULT;  // nothing readable there
    done += got;
  }
  return 0;
}

}  // namespace ichiban
