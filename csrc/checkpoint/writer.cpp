#include "checkpoint/writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>

#include "checkpoint/chunk_codec.h"
#include "checkpoint/crc32c.h"
#include "checkpoint/file_io.h"
#include "checkpoint/zstd_lib.h"
#include "common/errors.h"

namespace ichiban {

WriteJob::WriteJob(at::Tensor source, std::vector<BlobSpec> blobs, std::vector<std::string> paths,
                   int64_t chunk_bytes, int codec, int level)
    : source_(std::move(source)), blobs_(std::move(blobs)), paths_(std::move(paths)),
      codec_(codec), level_(level) {
  ICHIBAN_CHECK_ARG(source_.device().is_cpu() && source_.scalar_type() == at::kByte &&
                        source_.dim() == 1 && source_.is_contiguous(),
                    "WriteJob: source must be a contiguous 1-D uint8 CPU tensor");
  ICHIBAN_CHECK_ARG(!paths_.empty(), "WriteJob: paths must name at least one file");
  ICHIBAN_CHECK_ARG(chunk_bytes >= 64 && chunk_bytes % 8 == 0,
                    "WriteJob: chunk_bytes must be a multiple of 8 and >= 64, got ", chunk_bytes);
  ICHIBAN_CHECK_ARG(codec == kCodecRaw || codec == kCodecZstd, "WriteJob: codec must be 0 or 1");
  const int64_t size = source_.numel();
  for (size_t b = 0; b < blobs_.size(); ++b) {
    const BlobSpec& s = blobs_[b];
    ICHIBAN_CHECK_ARG(s.offset >= 0 && s.length >= 0 && s.offset + s.length <= size,
                      "WriteJob: blob ", b, " [", s.offset, ", +", s.length,
                      ") is outside the source of ", size, " bytes");
    ICHIBAN_CHECK_ARG(s.plane_width >= 1 && s.length % s.plane_width == 0, "WriteJob: blob ", b,
                      " length ", s.length, " is not a multiple of its element width ",
                      s.plane_width);
    // Chunks hold whole elements so byte planes never straddle two chunks.
    for (int64_t off = 0, i = 0; off < s.length; off += chunk_bytes, ++i) {
      ChunkRecord r;
      r.blob = static_cast<int64_t>(b);
      r.index = i;
      r.raw_offset = off;
      r.raw_length = std::min(chunk_bytes, s.length - off);
      records_.push_back(r);
    }
  }
  if (codec_ == kCodecZstd) (void)zstd_require();  // a missing libzstd fails here, at the call
  running_ = static_cast<int>(paths_.size());
  threads_.reserve(paths_.size());
  for (size_t t = 0; t < paths_.size(); ++t) threads_.emplace_back([this, t] { run(static_cast<int>(t)); });
}

WriteJob::~WriteJob() {
  failed_.store(true);  // stop early if still running
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void WriteJob::run(int ti) {
  const std::string& path = paths_[ti];
  int fd = -1;
  try {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    ICHIBAN_CHECK(fd >= 0, sys_error("open " + path + " for writing"));
    ChunkCodecContext ctx;
    const uint8_t* base = source_.data_ptr<uint8_t>();
    int64_t file_offset = 0;
    const int64_t n = static_cast<int64_t>(records_.size());
    for (;;) {
      if (failed_.load()) break;
      int64_t k = next_.fetch_add(1);
      if (k >= n) break;
      ChunkRecord& r = records_[k];
      const BlobSpec& s = blobs_[r.blob];
      const uint8_t* raw = base + s.offset + r.raw_offset;
      const uint8_t* stored = raw;
      size_t stored_n = static_cast<size_t>(r.raw_length);
      int codec = kCodecRaw, planes = 1;
      if (codec_ == kCodecZstd)
        stored = ctx.encode(raw, static_cast<size_t>(r.raw_length), s.plane_width, level_,
                            &stored_n, &codec, &planes);
      r.crc = crc32c(stored, stored_n);
      write_all(fd, stored, stored_n, path);
      r.file = ti;
      r.file_offset = file_offset;
      r.stored_length = static_cast<int64_t>(stored_n);
      r.codec = codec;
      r.planes = planes;
      file_offset += static_cast<int64_t>(stored_n);
      bytes_stored_.fetch_add(static_cast<int64_t>(stored_n));
    }
    if (!failed_.load()) fsync_or_throw(fd, path);
    int rc = ::close(fd);
    fd = -1;
    ICHIBAN_CHECK(rc == 0, sys_error("close " + path));
  } catch (const c10::Error& e) {
    if (fd >= 0) ::close(fd);
    fail(e.what_without_backtrace());
  } catch (const std::exception& e) {
    if (fd >= 0) ::close(fd);
    fail(e.what());
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (--running_ == 0) {
    finished_.store(true);
    cv_.notify_all();
  }
}

void WriteJob::fail(const std::string& msg) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_.empty()) error_ = msg;
  failed_.store(true);
}

void WriteJob::wait() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return running_ == 0; });
  }
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  std::lock_guard<std::mutex> lock(mu_);
  ICHIBAN_CHECK(error_.empty(), error_);
}

bool WriteJob::wait_for(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [this] { return running_ == 0; });
}

}  // namespace ichiban
