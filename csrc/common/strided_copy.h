// Gathering a strided (non-contiguous) tensor into a contiguous buffer.
//
// This is the copy at the heart of a checkpoint snapshot and of packing a
// non-contiguous collective input: elements are written in the row-major order
// of the source's shape. Dimensions that are contiguous with each other are
// merged first, so most real views reduce to 1-3 dimensions.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ichiban {

constexpr int kMaxGatherDims = 12;

struct StridedLayout {
  int ndim = 0;                       // after merging
  int64_t sizes[kMaxGatherDims];      // outermost first
  int64_t strides[kMaxGatherDims];    // in elements
  int64_t numel = 0;
  int64_t elem_size = 0;              // bytes
};

// Merges adjacent dims (dropping size-1 dims); errors if more than
// kMaxGatherDims remain.
StridedLayout make_layout(const at::Tensor& src);

// out must be contiguous, same dtype and numel as src, on the same device.
// CPU: split across the default thread pool; CUDA: a kernel on the current stream.
void strided_gather(const at::Tensor& src, at::Tensor& out);

void strided_gather_cpu(const at::Tensor& src, at::Tensor& out);
#ifdef ICHIBAN_WITH_CUDA
void strided_gather_cuda(const at::Tensor& src, at::Tensor& out);  // csrc/cuda/strided_gather.cu
#endif

}  // namespace ichiban
