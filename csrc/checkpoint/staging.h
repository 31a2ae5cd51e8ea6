// The snapshot: host memory for the staging pool and the C++ copy into it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ichiban {

// nbytes of page-aligned host memory as a 1-D uint8 tensor that owns it.
// Pages are touched by the thread pool up front (the first snapshot must not
// pay page faults) and marked MADV_DONTFORK (a forked child never shares or
// copies them; once pinned by the CUDA driver they must stay in one process).
at::Tensor alloc_staging(int64_t nbytes);

// Copies each CPU tensor srcs[i] (any strides, any dtype) into
// pool[offsets[i] : offsets[i] + nbytes(srcs[i])) in row-major order. Contiguous
// tensors are cut into pieces spread over the thread pool; strided ones go
// through strided_gather. Call without the GIL.
void stage_copy(const std::vector<at::Tensor>& srcs, at::Tensor pool,
                const std::vector<int64_t>& offsets);

// Parallel memcpy of a contiguous CPU tensor's bytes into another of the same size.
void copy_bytes(at::Tensor dst, const at::Tensor& src);

}  // namespace ichiban
