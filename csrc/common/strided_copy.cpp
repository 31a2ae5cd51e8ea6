#include "common/strided_copy.h"

#include <cstring>

#include "common/errors.h"
#include "common/thread_pool.h"

namespace ichiban {

StridedLayout make_layout(const at::Tensor& src) {
  StridedLayout L;
  L.numel = src.numel();
  L.elem_size = static_cast<int64_t>(src.element_size());
  // Walk from the innermost dim outwards, merging dim d into the current group
  // when stride[d] == size[group] * stride[group].
  int64_t sizes[64], strides[64];
  int n = 0;
  for (int64_t d = src.dim() - 1; d >= 0; --d) {
    int64_t sz = src.size(d), st = src.stride(d);
    if (sz == 1) continue;
    if (n > 0 && st == sizes[n - 1] * strides[n - 1]) {
      sizes[n - 1] *= sz;
      continue;
    }
    ICHIBAN_CHECK_ARG(n < 64, "strided_gather: tensor has too many dimensions");
    sizes[n] = sz;
    strides[n] = st;
    ++n;
  }
  if (n == 0) {  // a scalar or all-ones shape
    sizes[0] = 1;
    strides[0] = 1;
    n = 1;
  }
  ICHIBAN_CHECK_ARG(n <= kMaxGatherDims, "strided_gather: src has ", n,
                    " non-mergeable dimensions; at most ", kMaxGatherDims, " are supported");
  L.ndim = n;
  for (int i = 0; i < n; ++i) {  // reverse: outermost first
    L.sizes[i] = sizes[n - 1 - i];
    L.strides[i] = strides[n - 1 - i];
  }
  return L;
}

namespace {

// Copies output elements [begin, end) (counted in rows of the innermost dim).
void gather_rows(const StridedLayout& L, const char* src, char* dst, int64_t row_begin,
                 int64_t row_end) {
  const int inner = L.ndim - 1;
  const int64_t row_len = L.sizes[inner];
  const int64_t es = L.elem_size;
  const bool inner_contig = L.strides[inner] == 1;
  for (int64_t row = row_begin; row < row_end; ++row) {
    // Offset of this row's first element in src.
    int64_t rem = row, off = 0;
    for (int d = inner - 1; d >= 0; --d) {
      off += (rem % L.sizes[d]) * L.strides[d];
      rem /= L.sizes[d];
    }
    char* out = dst + row * row_len * es;
    const char* in = src + off * es;
    if (inner_contig) {
      std::memcpy(out, in, static_cast<size_t>(row_len * es));
    } else {
      const int64_t step = L.strides[inner] * es;
      for (int64_t i = 0; i < row_len; ++i) std::memcpy(out + i * es, in + i * step, es);
    }
  }
}

}  // namespace

void strided_gather_cpu(const at::Tensor& src, at::Tensor& out) {
  if (src.numel() == 0) return;
  StridedLayout L = make_layout(src);
  const char* s = static_cast<const char*>(src.data_ptr()) ;
  char* d = static_cast<char*>(out.data_ptr());
  const int64_t row_len = L.sizes[L.ndim - 1];
  const int64_t rows = L.numel / row_len;
  // ~256 KiB of output per task keeps threading overhead under a few percent.
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, row_len * L.elem_size));
  default_pool().parallel_for(static_cast<size_t>(rows), static_cast<size_t>(grain),
                              [&](size_t b, size_t e) {
                                gather_rows(L, s, d, static_cast<int64_t>(b), static_cast<int64_t>(e));
                              });
}

void strided_gather(const at::Tensor& src, at::Tensor& out) {
  ICHIBAN_CHECK_ARG(out.is_contiguous(), "strided_gather: out must be contiguous");
  ICHIBAN_CHECK_ARG(out.scalar_type() == src.scalar_type(), "strided_gather: out has dtype ",
                    out.scalar_type(), " but src has ", src.scalar_type());
  ICHIBAN_CHECK_ARG(out.numel() == src.numel(), "strided_gather: out has ", out.numel(),
                    " elements but src has ", src.numel());
  ICHIBAN_CHECK_ARG(out.device() == src.device(), "strided_gather: out is on ", out.device(),
                    " but src is on ", src.device());
  if (src.is_cuda()) {
#ifdef ICHIBAN_WITH_CUDA
    strided_gather_cuda(src, out);
    return;
#else
    ICHIBAN_CHECK(false, "strided_gather: src is a CUDA tensor but ichiban_comm was built without "
                  "CUDA sources; rebuild with nvcc on the PATH");
#endif
  }
  ICHIBAN_CHECK_ARG(src.device().is_cpu(), "strided_gather: unsupported device ", src.device());
  strided_gather_cpu(src, out);
}

}  // namespace ichiban
