// Encoding one checkpoint chunk: byte planes, then zstd, on the writer threads.
//
// Floating-point bytes barely compress as they are: the sign/exponent byte of
// each element, which takes few distinct values, sits between mantissa bytes
// that look random. Grouping byte k of every element together ("byte planes")
// puts the compressible bytes next to each other; zstd then finds them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ichiban {

enum ChunkCodec : int { kCodecRaw = 0, kCodecZstd = 1 };

// out[p * m + i] = in[i * width + p], m = n / width; n must be a multiple of width.
void split_byte_planes(const uint8_t* in, uint8_t* out, size_t n, int width);
void merge_byte_planes(const uint8_t* in, uint8_t* out, size_t n, int width);

// Per-thread zstd state and buffers, reused across chunks.
class ChunkCodecContext {
 public:
  ChunkCodecContext() = default;
  ~ChunkCodecContext();
  ChunkCodecContext(const ChunkCodecContext&) = delete;
  ChunkCodecContext& operator=(const ChunkCodecContext&) = delete;

  // Compresses in[0:n) (byte planes of plane_width first when > 1). Returns the
  // bytes to store: the compressed frame when it is smaller than the input, else
  // the input itself (codec set to kCodecRaw, planes to 1).
  const uint8_t* encode(const uint8_t* in, size_t n, int plane_width, int level, size_t* out_n,
                        int* codec, int* planes);

  // Restores raw bytes dst[0:raw_n) from what encode() stored.
  void decode(const uint8_t* stored, size_t stored_n, int codec, int planes, uint8_t* dst,
              size_t raw_n);

 private:
  void* cctx_ = nullptr;
  void* dctx_ = nullptr;
  std::vector<uint8_t> planes_buf_;
  std::vector<uint8_t> out_buf_;
};

}  // namespace ichiban
