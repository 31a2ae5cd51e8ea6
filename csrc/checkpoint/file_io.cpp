#include "checkpoint/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "common/errors.h"

namespace ichiban {

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      ICHIBAN_CHECK(false, sys_error("write to " + path));
    }
    ICHIBAN_CHECK(w > 0, "write to ", path, " wrote nothing (device full?)");
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void pread_all(int fd, void* data, size_t n, int64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  size_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd, p + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      ICHIBAN_CHECK(false, sys_error("read from " + path));
    }
    ICHIBAN_CHECK(r > 0, "file ", path, " is truncated: wanted bytes [", offset, ", ",
                  offset + static_cast<int64_t>(n), ") but it ends at byte ",
                  offset + static_cast<int64_t>(done));
    done += static_cast<size_t>(r);
  }
}

void fsync_or_throw(int fd, const std::string& path) {
  while (::fsync(fd) != 0) {
    if (errno == EINTR) continue;
    ICHIBAN_CHECK(false, sys_error("fsync of " + path));
  }
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ICHIBAN_CHECK(fd >= 0, sys_error("open directory " + dir));
  int rc;
  do {
    rc = ::fsync(fd);
  } while (rc != 0 && errno == EINTR);
  int err = errno;
  ::close(fd);
  ICHIBAN_CHECK(rc == 0, sys_error("fsync of directory " + dir, err));
}

}  // namespace ichiban
