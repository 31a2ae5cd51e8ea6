// Whole-buffer POSIX file I/O that retries short transfers and EINTR and turns
// every failure into an error naming the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ichiban {

void write_all(int fd, const void* data, size_t n, const std::string& path);
// Reads exactly n bytes at offset; a short file is an error ("truncated").
void pread_all(int fd, void* data, size_t n, int64_t offset, const std::string& path);
void fsync_or_throw(int fd, const std::string& path);
void fsync_dir(const std::string& dir);

}  // namespace ichiban
