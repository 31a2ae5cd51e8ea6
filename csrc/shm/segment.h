// A POSIX shared-memory segment mapped into this process.
//
// One segment per (process group, host). The creator removes any stale segment
// of the same name (left by a job that crashed while connecting), creates and
// sizes it; the others open it by name. Once every member has mapped it the
// name is unlinked (unlink_name), so the memory lives exactly as long as the
// mappings: a normal exit, a crash or destroy_process_group all release it and
// nothing is left in /dev/shm.
#pragma once

#include <cstddef>
#include <string>

namespace ichiban {

class ShmSegment {
 public:
  // create=true: O_EXCL create after removing a stale segment of that name.
  ShmSegment(const std::string& name, size_t bytes, bool create);
  ~ShmSegment();
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;

  void* data() const { return base_; }
  size_t size() const { return bytes_; }
  const std::string& name() const { return name_; }

  // Removes the name from /dev/shm (idempotent); the mapping stays valid.
  void unlink_name();

 private:
  std::string name_;
  size_t bytes_ = 0;
  void* base_ = nullptr;
  bool linked_ = false;
};

// A name valid for shm_open: "/" + name with any '/' replaced, at most 250 chars.
std::string shm_safe_name(const std::string& name);

}  // namespace ichiban
