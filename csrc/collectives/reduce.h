// Element-wise reductions of n equally long buffers, in a fixed source order
// so that every rank computes bit-identical results.
//
// float16/bfloat16 accumulate in float32 and round once; complex supports SUM
// and AVG (as Gloo does); bool maps SUM/MAX/BOR to "or" and PRODUCT/MIN/BAND
// to "and"; AVG divides the float sum by n and is refused for integers.
// MIN/MAX propagate NaN, and SUM/AVG of +Inf and -Inf give NaN, as torch does.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace ichiban {

enum class RedOp : uint8_t { kSum = 0, kAvg, kProduct, kMin, kMax, kBand, kBor, kBxor };

const char* redop_name(RedOp op);

// Throws (naming `opname`, the dtype and the reduction) when unsupported.
void check_reduction(c10::ScalarType dtype, RedOp op, const char* opname);

// out[i] = srcs[0][i] (op) srcs[1][i] (op) ... for i < count. out may alias
// any source (each block is accumulated before it is stored).
void reduce_n(c10::ScalarType dtype, RedOp op, void* out, const void* const* srcs, int nsrc, int64_t count,
              int avg_divisor);

}  // namespace ichiban
