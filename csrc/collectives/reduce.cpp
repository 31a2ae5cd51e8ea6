#include "collectives/reduce.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>

#include <algorithm>
#include <type_traits>

#include "common/errors.h"

namespace ichiban {

const char* redop_name(RedOp op) {
  switch (op) {
    case RedOp::kSum: return "SUM";
    case RedOp::kAvg: return "AVG";
    case RedOp::kProduct: return "PRODUCT";
    case RedOp::kMin: return "MIN";
    case RedOp::kMax: return "MAX";
    case RedOp::kBand: return "BAND";
    case RedOp::kBor: return "BOR";
    case RedOp::kBxor: return "BXOR";
  }
  return "?";
}

namespace {

// Elements per block: the accumulator (8 KiB as float64) stays in L1 while
// the sources stream through it.
constexpr int64_t kBlock = 1024;

template <typename T>
struct AccOf { using type = T; };
template <>
struct AccOf<c10::Half> { using type = float; };
template <>
struct AccOf<c10::BFloat16> { using type = float; };

// Sources are read up to four at a time in one pass: one source per pass
// reads each 4 KiB page on its own, where the hardware prefetcher (which
// stops at page boundaries) starts cold every time; four concurrent streams
// overlap those stalls, which brings a large reduction close to memcpy's cost
// per byte where memory bandwidth is the limit. The order of operations is the
// same left to right on every rank: ((s0 op s1) op s2) op s3 ...
template <typename T, typename Op>
void reduce_blocks(T* out, const void* const* srcs, int n, int64_t count, Op op, int avg_divisor) {
  using A = typename AccOf<T>::type;
  A acc[kBlock];
  for (int64_t i0 = 0; i0 < count; i0 += kBlock) {
    const int64_t m = std::min(kBlock, count - i0);
    auto src = [&](int p) { return static_cast<const T*>(srcs[p]) + i0; };
    int p;
    const T* __restrict a = src(0);
    if (n >= 4) {
      const T* __restrict b = src(1);
      const T* __restrict c = src(2);
      const T* __restrict d = src(3);
      for (int64_t j = 0; j < m; ++j)
        acc[j] = op(op(op(static_cast<A>(a[j]), static_cast<A>(b[j])), static_cast<A>(c[j])), static_cast<A>(d[j]));
      p = 4;
    } else if (n == 3) {
      const T* __restrict b = src(1);
      const T* __restrict c = src(2);
      for (int64_t j = 0; j < m; ++j) acc[j] = op(op(static_cast<A>(a[j]), static_cast<A>(b[j])), static_cast<A>(c[j]));
      p = 3;
    } else if (n == 2) {
      const T* __restrict b = src(1);
      for (int64_t j = 0; j < m; ++j) acc[j] = op(static_cast<A>(a[j]), static_cast<A>(b[j]));
      p = 2;
    } else {
      for (int64_t j = 0; j < m; ++j) acc[j] = static_cast<A>(a[j]);
      p = 1;
    }
    for (; p + 3 <= n; p += 3) {
      const T* __restrict b = src(p);
      const T* __restrict c = src(p + 1);
      const T* __restrict d = src(p + 2);
      for (int64_t j = 0; j < m; ++j)
        acc[j] = op(op(op(acc[j], static_cast<A>(b[j])), static_cast<A>(c[j])), static_cast<A>(d[j]));
    }
    for (; p < n; ++p) {
      const T* __restrict b = src(p);
      for (int64_t j = 0; j < m; ++j) acc[j] = op(acc[j], static_cast<A>(b[j]));
    }
    if constexpr (!std::is_integral_v<A>) {
      if (avg_divisor > 1) {
        const A d = static_cast<A>(avg_divisor);
        for (int64_t j = 0; j < m; ++j) acc[j] = acc[j] / d;
      }
    }
    T* __restrict o = out + i0;
    for (int64_t j = 0; j < m; ++j) o[j] = static_cast<T>(acc[j]);
  }
}

// MIN/MAX as torch.minimum/torch.maximum: a NaN on any rank is the result on
// every rank (x != x only for NaN; integers never take that branch at run
// time). A plain `b < a ? b : a` keeps or drops a NaN depending on which rank
// it came from, and NaN checks through all_reduce(MAX) rely on it surviving.
struct MinOp {
  template <typename A>
  A operator()(A a, A b) const {
    if (a != a) return a;
    if (b != b) return b;
    return b < a ? b : a;
  }
};
struct MaxOp {
  template <typename A>
  A operator()(A a, A b) const {
    if (a != a) return a;
    if (b != b) return b;
    return a < b ? b : a;
  }
};

template <typename T>
void reduce_arith(RedOp op, void* out, const void* const* srcs, int n, int64_t count, int avg) {
  T* o = static_cast<T*>(out);
  switch (op) {
    case RedOp::kSum:
      return reduce_blocks<T>(o, srcs, n, count, [](auto a, auto b) { return a + b; }, 1);
    case RedOp::kAvg:
      return reduce_blocks<T>(o, srcs, n, count, [](auto a, auto b) { return a + b; }, avg);
    case RedOp::kProduct:
      return reduce_blocks<T>(o, srcs, n, count, [](auto a, auto b) { return a * b; }, 1);
    case RedOp::kMin:
      if constexpr (!c10::is_complex<T>::value)
        return reduce_blocks<T>(o, srcs, n, count, MinOp{}, 1);
      break;
    case RedOp::kMax:
      if constexpr (!c10::is_complex<T>::value)
        return reduce_blocks<T>(o, srcs, n, count, MaxOp{}, 1);
      break;
    case RedOp::kBand:
      if constexpr (std::is_integral_v<T>)
        return reduce_blocks<T>(o, srcs, n, count, [](auto a, auto b) { return a & b; }, 1);
      break;
    case RedOp::kBor:
      if constexpr (std::is_integral_v<T>)
        return reduce_blocks<T>(o, srcs, n, count, [](auto a, auto b) { return a | b; }, 1);
      break;
    case RedOp::kBxor:
      if constexpr (std::is_integral_v<T>)
        return reduce_blocks<T>(o, srcs, n, count, [](auto a, auto b) { return a ^ b; }, 1);
      break;
  }
  ICHIBAN_CHECK(false, "ichiban: unsupported reduction ", redop_name(op));
}

// Bool is stored as one byte holding 0 or 1: "or" for SUM/MAX/BOR, "and" for
// PRODUCT/MIN/BAND, "xor" for BXOR keep it 0/1.
void reduce_bool(RedOp op, void* out, const void* const* srcs, int n, int64_t count) {
  uint8_t* o = static_cast<uint8_t*>(out);
  switch (op) {
    case RedOp::kSum:
    case RedOp::kMax:
    case RedOp::kBor:
      return reduce_blocks<uint8_t>(o, srcs, n, count, [](auto a, auto b) { return a | b; }, 1);
    case RedOp::kProduct:
    case RedOp::kMin:
    case RedOp::kBand:
      return reduce_blocks<uint8_t>(o, srcs, n, count, [](auto a, auto b) { return a & b; }, 1);
    case RedOp::kBxor:
      return reduce_blocks<uint8_t>(o, srcs, n, count, [](auto a, auto b) { return a ^ b; }, 1);
    case RedOp::kAvg:
      break;
  }
  ICHIBAN_CHECK(false, "ichiban: unsupported bool reduction ", redop_name(op));
}

bool is_int(c10::ScalarType t) {
  return t == c10::kByte || t == c10::kChar || t == c10::kShort || t == c10::kInt || t == c10::kLong;
}
bool is_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kDouble || t == c10::kHalf || t == c10::kBFloat16;
}
bool is_cplx(c10::ScalarType t) { return t == c10::kComplexFloat || t == c10::kComplexDouble; }

}  // namespace

void check_reduction(c10::ScalarType dtype, RedOp op, const char* opname) {
  bool ok = false;
  if (is_float(dtype)) ok = op == RedOp::kSum || op == RedOp::kAvg || op == RedOp::kProduct ||
                            op == RedOp::kMin || op == RedOp::kMax;
  else if (is_int(dtype)) ok = op != RedOp::kAvg;
  else if (dtype == c10::kBool) ok = op != RedOp::kAvg;
  else if (is_cplx(dtype)) ok = op == RedOp::kSum || op == RedOp::kAvg;
  ICHIBAN_CHECK_ARG(ok, "ichiban: ", opname, " does not support ReduceOp.", redop_name(op), " on dtype ",
                    c10::toString(dtype),
                    " (floats: SUM/AVG/PRODUCT/MIN/MAX; integers and bool: SUM/PRODUCT/MIN/MAX/BAND/BOR/BXOR; "
                    "complex: SUM/AVG)");
}

void reduce_n(c10::ScalarType dtype, RedOp op, void* out, const void* const* srcs, int nsrc, int64_t count,
              int avg_divisor) {
  if (count <= 0) return;
  switch (dtype) {
    case c10::kFloat: return reduce_arith<float>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kDouble: return reduce_arith<double>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kHalf: return reduce_arith<c10::Half>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kBFloat16: return reduce_arith<c10::BFloat16>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kComplexFloat: return reduce_arith<c10::complex<float>>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kComplexDouble:
      return reduce_arith<c10::complex<double>>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kByte: return reduce_arith<uint8_t>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kChar: return reduce_arith<int8_t>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kShort: return reduce_arith<int16_t>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kInt: return reduce_arith<int32_t>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kLong: return reduce_arith<int64_t>(op, out, srcs, nsrc, count, avg_divisor);
    case c10::kBool: return reduce_bool(op, out, srcs, nsrc, count);
    default: break;
  }
  ICHIBAN_CHECK_ARG(false, "ichiban: reductions do not support dtype ", c10::toString(dtype));
}

}  // namespace ichiban
