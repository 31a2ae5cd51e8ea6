// Reading checkpoint chunks back: parallel preads, crc32c verification of the
// stored bytes, then decoding (zstd, byte planes) straight into the caller's
// buffer. A mismatch raises an error that starts with the chunk's label (the
// caller puts step, file and tensor there).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ichiban {

struct ReadSpec {
  std::string path;
  int64_t file_offset = 0;
  int64_t stored_length = 0;
  int64_t raw_length = 0;
  uint32_t crc = 0;
  int codec = 0;
  int planes = 1;
  int64_t dst_index = 0;   // which destination buffer
  int64_t dst_offset = 0;  // bytes into it
  std::string label;       // prefixed to any error about this chunk
};

// dsts: contiguous uint8 CPU tensors. Runs on the default thread pool.
void read_chunks(const std::vector<ReadSpec>& specs, const std::vector<at::Tensor>& dsts);

}  // namespace ichiban
