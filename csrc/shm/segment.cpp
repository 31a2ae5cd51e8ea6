#include "shm/segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "common/errors.h"

namespace ichiban {

std::string shm_safe_name(const std::string& name) {
  std::string out = "/";
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-' || c == '.';
    out.push_back(ok ? c : '_');
  }
  // NAME_MAX is 255 on Linux; keep the tail, which carries the group and host.
  if (out.size() > 250) out = "/" + out.substr(out.size() - 249);
  return out;
}

ShmSegment::ShmSegment(const std::string& name, size_t bytes, bool create) : name_(shm_safe_name(name)) {
  int fd = -1;
  if (create) {
    shm_unlink(name_.c_str());  // a stale segment of a crashed job with this name
    fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    ICHIBAN_CHECK(fd >= 0, sys_error("ichiban: shm_open(create) " + name_));
    // Reserve every page now: tmpfs hands out pages on first touch, and a
    // touch that finds /dev/shm full is a SIGBUS in the middle of an op, where
    // this is an error at group creation. Filesystems without fallocate fall
    // back to a plain size.
    int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
    if (err == EOPNOTSUPP || err == EINVAL) err = ftruncate(fd, static_cast<off_t>(bytes)) == 0 ? 0 : errno;
    if (err != 0) {
      close(fd);
      shm_unlink(name_.c_str());
      ICHIBAN_CHECK(false, sys_error("ichiban: reserving " + std::to_string(bytes) + " bytes of /dev/shm for " +
                                         name_ + " failed (is /dev/shm full? ICHIBAN_SHM_SLOT_BYTES sets the size)",
                                     err));
    }
    linked_ = true;
  } else {
    fd = shm_open(name_.c_str(), O_RDWR, 0600);
    ICHIBAN_CHECK(fd >= 0, sys_error("ichiban: shm_open " + name_));
    struct stat st;
    if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < bytes) {
      close(fd);
      ICHIBAN_CHECK(false, "ichiban: shared-memory segment ", name_, " is smaller than the ", bytes,
                    " bytes its creator announced");
    }
  }
  bytes_ = bytes;
  base_ = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  close(fd);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    if (create) unlink_name();
    ICHIBAN_CHECK(false, sys_error("ichiban: mmap " + name_, err));
  }
}

void ShmSegment::unlink_name() {
  if (linked_) {
    shm_unlink(name_.c_str());
    linked_ = false;
  }
}

ShmSegment::~ShmSegment() {
  unlink_name();
  if (base_) munmap(base_, bytes_);
}

}  // namespace ichiban
