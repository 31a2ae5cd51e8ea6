// Argument checks and contiguous staging shared by the backend's ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Types.hpp>

#include <vector>

#include "collectives/reduce.h"
#include "common/errors.h"

namespace ichiban {

// CPU, dense; names the op and argument otherwise (CUDA tensors belong to NCCL).
inline void check_cpu(const at::Tensor& t, const char* op, const char* arg) {
  ICHIBAN_CHECK_ARG(t.defined(), "ichiban: ", op, ": ", arg, " is an undefined tensor");
  ICHIBAN_CHECK_ARG(t.layout() == c10::kStrided, "ichiban: ", op, ": ", arg,
                    " must be a dense (strided) tensor, got layout ", t.layout());
  ICHIBAN_CHECK_ARG(t.device().is_cpu(), "ichiban: ", op, ": ", arg, " is on ", t.device(),
                    "; the ichiban backend moves CPU tensors, CUDA tensors go to NCCL "
                    "(init_process_group(\"ichiban\") on a GPU machine maps cuda to nccl, as does "
                    "backend=\"cpu:ichiban,cuda:nccl\")");
}

inline void check_one(const std::vector<at::Tensor>& v, const char* op, const char* arg) {
  ICHIBAN_CHECK_ARG(v.size() == 1, "ichiban: ", op, " expects exactly one tensor in ", arg, ", got ", v.size());
  check_cpu(v[0], op, arg);
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* what) {
  ICHIBAN_CHECK_ARG(a.scalar_type() == b.scalar_type(), "ichiban: ", op, ": ", what, " has dtype ",
                    b.scalar_type(), ", expected ", a.scalar_type());
}

// A list of n tensors (one per rank), each like `like`.
inline void check_list(const std::vector<at::Tensor>& list, const at::Tensor& like, int n, const char* op,
                const char* arg) {
  ICHIBAN_CHECK_ARG(static_cast<int>(list.size()) == n, "ichiban: ", op, ": ", arg, " must hold ", n,
                    " tensors (one per rank), got ", list.size());
  for (const auto& t : list) {
    check_cpu(t, op, arg);
    check_same(like, t, op, arg);
    ICHIBAN_CHECK_ARG(t.numel() == like.numel(), "ichiban: ", op, ": every tensor in ", arg, " must have ",
                      like.numel(), " elements, got ", t.numel());
  }
}

inline at::Tensor contig(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// Copies a contiguous staging tensor back into a (possibly strided) destination.
inline void write_back(at::Tensor& dst, const at::Tensor& staged) {
  if (dst.data_ptr() != staged.data_ptr() || !dst.is_contiguous()) dst.copy_(staged.view(dst.sizes()));
}

inline RedOp to_redop(const c10d::ReduceOp& op, const char* name) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM: return RedOp::kSum;
    case c10d::ReduceOp::AVG: return RedOp::kAvg;
    case c10d::ReduceOp::PRODUCT: return RedOp::kProduct;
    case c10d::ReduceOp::MIN: return RedOp::kMin;
    case c10d::ReduceOp::MAX: return RedOp::kMax;
    case c10d::ReduceOp::BAND: return RedOp::kBand;
    case c10d::ReduceOp::BOR: return RedOp::kBor;
    case c10d::ReduceOp::BXOR: return RedOp::kBxor;
    default: break;
  }
  ICHIBAN_CHECK_ARG(false, "ichiban: ", name, " does not support this ReduceOp (PREMUL_SUM is not supported)");
}

inline c10d::ReduceOp to_c10d(RedOp op) {
  switch (op) {
    case RedOp::kSum: return c10d::ReduceOp::SUM;
    case RedOp::kAvg: return c10d::ReduceOp::SUM;  // divided by the caller
    case RedOp::kProduct: return c10d::ReduceOp::PRODUCT;
    case RedOp::kMin: return c10d::ReduceOp::MIN;
    case RedOp::kMax: return c10d::ReduceOp::MAX;
    case RedOp::kBand: return c10d::ReduceOp::BAND;
    case RedOp::kBor: return c10d::ReduceOp::BOR;
    case RedOp::kBxor: return c10d::ReduceOp::BXOR;
  }
  return c10d::ReduceOp::SUM;
}

}  // namespace ichiban
