#include "checkpoint/chunk_codec.h"

#include <cstring>

#include "checkpoint/zstd_lib.h"
#include "common/errors.h"

namespace ichiban {

namespace {

template <int W>
void split_fixed(const uint8_t* in, uint8_t* out, size_t m) {
  for (size_t i = 0; i < m; ++i)
    for (int p = 0; p < W; ++p) out[p * m + i] = in[i * W + p];
}

template <int W>
void merge_fixed(const uint8_t* in, uint8_t* out, size_t m) {
  for (size_t i = 0; i < m; ++i)
    for (int p = 0; p < W; ++p) out[i * W + p] = in[p * m + i];
}

}  // namespace

void split_byte_planes(const uint8_t* in, uint8_t* out, size_t n, int width) {
  ICHIBAN_CHECK_ARG(width >= 1 && n % static_cast<size_t>(width) == 0, "byte planes: ", n,
                    " bytes is not a multiple of the element width ", width);
  const size_t m = n / static_cast<size_t>(width);
  switch (width) {
    case 1: std::memcpy(out, in, n); return;
    case 2: split_fixed<2>(in, out, m); return;
    case 4: split_fixed<4>(in, out, m); return;
    case 8: split_fixed<8>(in, out, m); return;
    default:
      for (size_t i = 0; i < m; ++i)
        for (int p = 0; p < width; ++p) out[p * m + i] = in[i * width + p];
  }
}

void merge_byte_planes(const uint8_t* in, uint8_t* out, size_t n, int width) {
  ICHIBAN_CHECK_ARG(width >= 1 && n % static_cast<size_t>(width) == 0, "byte planes: ", n,
                    " bytes is not a multiple of the element width ", width);
  const size_t m = n / static_cast<size_t>(width);
  switch (width) {
    case 1: std::memcpy(out, in, n); return;
    case 2: merge_fixed<2>(in, out, m); return;
    case 4: merge_fixed<4>(in, out, m); return;
    case 8: merge_fixed<8>(in, out, m); return;
    default:
      for (size_t i = 0; i < m; ++i)
        for (int p = 0; p < width; ++p) out[i * width + p] = in[p * m + i];
  }
}

ChunkCodecContext::~ChunkCodecContext() {
  const ZstdLib* z = zstd_lib();
  if (z && cctx_) z->freeCCtx(cctx_);
  if (z && dctx_) z->freeDCtx(dctx_);
}

const uint8_t* ChunkCodecContext::encode(const uint8_t* in, size_t n, int plane_width, int level,
                                         size_t* out_n, int* codec, int* planes) {
  const ZstdLib& z = zstd_require();
  if (!cctx_) cctx_ = z.createCCtx();
  ICHIBAN_CHECK(cctx_ != nullptr, "zstd: could not create a compression context (out of memory?)");
  const uint8_t* src = in;
  if (plane_width > 1) {
    planes_buf_.resize(n);
    split_byte_planes(in, planes_buf_.data(), n, plane_width);
    src = planes_buf_.data();
  }
  out_buf_.resize(z.compressBound(n));
  size_t r = z.compressCCtx(cctx_, out_buf_.data(), out_buf_.size(), src, n, level);
  ICHIBAN_CHECK(!z.isError(r), "zstd compression failed: ", z.getErrorName(r));
  if (r >= n) {  // incompressible: store the original bytes
    *out_n = n;
    *codec = kCodecRaw;
    *planes = 1;
    return in;
  }
  *out_n = r;
  *codec = kCodecZstd;
  *planes = plane_width;
  return out_buf_.data();
}

void ChunkCodecContext::decode(const uint8_t* stored, size_t stored_n, int codec, int planes,
                               uint8_t* dst, size_t raw_n) {
  if (codec == kCodecRaw) {
    ICHIBAN_CHECK(stored_n == raw_n, "raw chunk of ", stored_n, " bytes, expected ", raw_n);
    std::memcpy(dst, stored, raw_n);
    return;
  }
  ICHIBAN_CHECK(codec == kCodecZstd, "unknown chunk codec ", codec);
  const ZstdLib& z = zstd_require();
  if (!dctx_) dctx_ = z.createDCtx();
  ICHIBAN_CHECK(dctx_ != nullptr, "zstd: could not create a decompression context");
  uint8_t* target = dst;
  if (planes > 1) {
    planes_buf_.resize(raw_n);
    target = planes_buf_.data();
  }
  size_t r = z.decompressDCtx(dctx_, target, raw_n, stored, stored_n);
  ICHIBAN_CHECK(!z.isError(r), "zstd decompression failed: ", z.getErrorName(r));
  ICHIBAN_CHECK(r == raw_n, "zstd chunk decompressed to ", r, " bytes, expected ", raw_n);
  if (planes > 1) merge_byte_planes(target, dst, raw_n, planes);
}

}  // namespace ichiban
