// Background persistence of a staged snapshot: writer threads that never take
// the GIL cut the staged bytes into chunks, encode (optional byte planes +
// zstd), checksum (crc32c of the stored bytes), append to one file per thread
// and fsync. The caller learns, per chunk, where it went and its checksum;
// those records become the manifest.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ichiban {

struct BlobSpec {
  int64_t offset = 0;    // bytes into the source buffer
  int64_t length = 0;    // bytes
  int plane_width = 1;   // element size for byte planes (used only with compression)
};

struct ChunkRecord {
  int64_t blob = 0;         // index into the job's blobs
  int64_t index = 0;        // chunk number within the blob
  int64_t raw_offset = 0;   // bytes into the blob
  int64_t raw_length = 0;
  int32_t file = 0;         // index into the job's paths
  int64_t file_offset = 0;
  int64_t stored_length = 0;
  uint32_t crc = 0;         // crc32c of the stored bytes
  int32_t codec = 0;        // ChunkCodec
  int32_t planes = 1;       // byte-plane width applied before compression
};

class WriteJob {
 public:
  // Starts one thread per path. source is a 1-D uint8 CPU tensor (the staging
  // pool) kept alive until the job ends; codec 0 = none, 1 = zstd.
  WriteJob(at::Tensor source, std::vector<BlobSpec> blobs, std::vector<std::string> paths,
           int64_t chunk_bytes, int codec, int level);
  ~WriteJob();
  WriteJob(const WriteJob&) = delete;
  WriteJob& operator=(const WriteJob&) = delete;

  bool done() const { return finished_.load(); }
  // Blocks until every thread has fsynced and closed its file; rethrows the first error.
  void wait();
  // Waits up to timeout_s seconds; true when finished.
  bool wait_for(double timeout_s);
  const std::vector<ChunkRecord>& records() const { return records_; }
  int64_t bytes_stored() const { return bytes_stored_.load(); }

 private:
  void run(int thread_index);
  void fail(const std::string& msg);

  at::Tensor source_;
  std::vector<BlobSpec> blobs_;
  std::vector<std::string> paths_;
  int codec_;
  int level_;
  std::vector<ChunkRecord> records_;  // one per chunk, filled by whichever thread wrote it
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> bytes_stored_{0};
  std::atomic<bool> failed_{false};
  std::atomic<bool> finished_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  int running_ = 0;
  std::string error_;
  std::vector<std::thread> threads_;
};

}  // namespace ichiban
