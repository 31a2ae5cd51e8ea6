// CUDA strided gather: one thread per output element (grid-stride loop),
// specialised on element size so each load/store is a single instruction.
// Used to pack non-contiguous CUDA tensors into contiguous staging buffers
// (checkpoint snapshots, collective send buffers) without an extra copy.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "common/errors.h"
#include "common/strided_copy.h"

namespace ichiban {
namespace {

struct Layout {
  int ndim;
  int64_t sizes[kMaxGatherDims];
  int64_t strides[kMaxGatherDims];
};

template <int kBytes>
struct alignas(kBytes) Word {
  unsigned char b[kBytes];
};

template <int kBytes>
__global__ void gather_kernel(const Word<kBytes>* __restrict__ src, Word<kBytes>* __restrict__ dst,
                              Layout L, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = i, off = 0;
#pragma unroll
    for (int d = kMaxGatherDims - 1; d >= 0; --d) {
      if (d < L.ndim) {
        off += (rem % L.sizes[d]) * L.strides[d];
        rem /= L.sizes[d];
      }
    }
    dst[i] = src[off];
  }
}

template <int kBytes>
void launch(const at::Tensor& src, at::Tensor& out, const Layout& L, int64_t numel, cudaStream_t s) {
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65535LL * 8);
  gather_kernel<kBytes><<<static_cast<unsigned>(blocks), threads, 0, s>>>(
      static_cast<const Word<kBytes>*>(src.data_ptr()), static_cast<Word<kBytes>*>(out.data_ptr()),
      L, numel);
  cudaError_t err = cudaGetLastError();
  ICHIBAN_CHECK(err == cudaSuccess, "strided_gather: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void strided_gather_cuda(const at::Tensor& src, at::Tensor& out) {
  if (src.numel() == 0) return;
  StridedLayout SL = make_layout(src);
  Layout L;
  L.ndim = SL.ndim;
  for (int d = 0; d < SL.ndim; ++d) {
    L.sizes[d] = SL.sizes[d];
    L.strides[d] = SL.strides[d];
  }
  // The kernel walks dims innermost-last; indices below ndim are the real ones.
  const c10::cuda::CUDAGuard guard(src.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (SL.elem_size) {
    case 1: launch<1>(src, out, L, SL.numel, stream); break;
    case 2: launch<2>(src, out, L, SL.numel, stream); break;
    case 4: launch<4>(src, out, L, SL.numel, stream); break;
    case 8: launch<8>(src, out, L, SL.numel, stream); break;
    case 16: launch<16>(src, out, L, SL.numel, stream); break;
    default:
      ICHIBAN_CHECK_ARG(false, "strided_gather: unsupported element size ", SL.elem_size, " bytes");
  }
}

}  // namespace ichiban
