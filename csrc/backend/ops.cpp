// The collectives of IchibanBackend: checks on the caller's thread, the work
// itself queued to the progress thread (backend.cpp).
#include <ATen/ATen.h>

#include <numeric>

#include "backend/backend.h"
#include "backend/tensor_utils.h"
#include "backend/work.h"

namespace ichiban {

using WorkPtr = IchibanBackend::WorkPtr;
using c10d::OpType;

namespace {

// 1-D contiguous concatenation of tensors (each flattened in row-major order).
at::Tensor flat_cat(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto& t : ts) flat.push_back(t.reshape({-1}));
  return at::cat(flat);
}

// Splits a 1-D tensor back into tensors shaped like `outs` and copies into them.
void flat_split_into(const at::Tensor& flat, std::vector<at::Tensor>& outs) {
  int64_t off = 0;
  for (auto& o : outs) {
    o.copy_(flat.narrow(0, off, o.numel()).view(o.sizes()));
    off += o.numel();
  }
}


}  // namespace

WorkPtr IchibanBackend::allreduce(std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& opts) {
  if (!tensors.empty() && to_cuda(tensors[0])) return cuda()->allreduce(tensors, opts);
  check_one(tensors, "allreduce", "tensors");
  ICHIBAN_CHECK_ARG(!opts.sparseIndices.has_value(), "ichiban: allreduce does not support sparse tensors");
  const RedOp op = to_redop(opts.reduceOp, "allreduce");
  check_reduction(tensors[0].scalar_type(), op, "allreduce");
  at::Tensor t = tensors[0];
  return submit(!opts.asyncOp, OpType::ALLREDUCE, "allreduce", tensors, [this, t, op]() mutable {
    at::Tensor c = contig(t);
    allreduce_now(c, op, "allreduce");
    write_back(t, c);
  });
}

WorkPtr IchibanBackend::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                            const c10d::AllreduceCoalescedOptions& opts) {
  if (!tensors.empty() && to_cuda(tensors[0])) return cuda()->allreduce_coalesced(tensors, opts);
  const RedOp op = to_redop(opts.reduceOp, "allreduce_coalesced");
  for (const auto& t : tensors) {
    check_cpu(t, "allreduce_coalesced", "tensors");
    check_reduction(t.scalar_type(), op, "allreduce_coalesced");
  }
  return enqueue(OpType::ALLREDUCE_COALESCED, "allreduce_coalesced", tensors, [this, tensors, op]() mutable {
    for (auto& t : tensors) {
      at::Tensor c = contig(t);
      allreduce_now(c, op, "allreduce_coalesced");
      write_back(t, c);
    }
  });
}

WorkPtr IchibanBackend::reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) {
  if (!tensors.empty() && to_cuda(tensors[0])) return cuda()->reduce(tensors, opts);
  check_one(tensors, "reduce", "tensors");
  const int root = static_cast<int>(opts.rootRank);
  ICHIBAN_CHECK_ARG(root >= 0 && root < size_, "ichiban: reduce: root ", root, " is not a rank of the group");
  const RedOp op = to_redop(opts.reduceOp, "reduce");
  check_reduction(tensors[0].scalar_type(), op, "reduce");
  at::Tensor t = tensors[0];
  return submit(!opts.asyncOp, OpType::REDUCE, "reduce", tensors, [this, t, op, root]() mutable {
    // Non-roots keep their input: they reduce a copy.
    at::Tensor c = rank_ == root ? contig(t) : t.contiguous().clone();
    allreduce_now(c, op, "reduce");
    if (rank_ == root) write_back(t, c);
  });
}

WorkPtr IchibanBackend::broadcast(std::vector<at::Tensor>& tensors, const c10d::BroadcastOptions& opts) {
  if (!tensors.empty() && to_cuda(tensors[0])) return cuda()->broadcast(tensors, opts);
  check_one(tensors, "broadcast", "tensors");
  const int root = static_cast<int>(opts.rootRank);
  ICHIBAN_CHECK_ARG(root >= 0 && root < size_, "ichiban: broadcast: root ", root, " is not a rank of the group");
  at::Tensor t = tensors[0];
  if (multi_host()) {
    return enqueue(OpType::BROADCAST, "broadcast", tensors, [this, tensors, opts]() mutable {
      fallback_->broadcast(tensors, opts)->wait();
    });
  }
  return submit(!opts.asyncOp, OpType::BROADCAST, "broadcast", tensors, [this, t, root]() mutable {
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor c = contig(t);
    // Root's rank within this host's segment equals its group rank on one host.
    const bool shared = shm_broadcast(*comm_, c.data_ptr(), c.numel() * c.element_size(), root, deadline());
    if (rank_ != root) write_back(t, c);
    log("broadcast", shared ? "shared" : "oneshot", c.numel() * c.element_size(), t0);
  });
}

WorkPtr IchibanBackend::_allgather_base(at::Tensor& output, at::Tensor& input, const c10d::AllgatherOptions& opts) {
  if (to_cuda(input)) return cuda()->_allgather_base(output, input, opts);
  check_cpu(output, "all_gather_into_tensor", "output");
  check_cpu(input, "all_gather_into_tensor", "input");
  check_same(input, output, "all_gather_into_tensor", "output");
  ICHIBAN_CHECK_ARG(output.numel() == input.numel() * size_, "ichiban: all_gather_into_tensor: output has ",
                    output.numel(), " elements, expected world size x input = ", size_, " x ", input.numel());
  if (multi_host()) {
    return enqueue(OpType::_ALLGATHER_BASE, "all_gather_into_tensor", {output},
                   [this, output, input, opts]() mutable { fallback_->_allgather_base(output, input, opts)->wait(); });
  }
  return submit(!opts.asyncOp, OpType::_ALLGATHER_BASE, "all_gather_into_tensor", {output}, [this, output, input]() mutable {
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor in = contig(input);
    at::Tensor out = contig(output);
    const char* path = shm_allgather(*comm_, in.data_ptr(), out.data_ptr(), in.numel() * in.element_size(), deadline());
    write_back(output, out);
    log("all_gather_into_tensor", path, in.numel() * in.element_size(), t0);
  });
}

WorkPtr IchibanBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                                  const c10d::AllgatherOptions& opts) {
  if (!inputs.empty() && to_cuda(inputs[0])) return cuda()->allgather(outputs, inputs, opts);
  check_one(inputs, "allgather", "input");
  ICHIBAN_CHECK_ARG(outputs.size() == 1, "ichiban: allgather expects one output list, got ", outputs.size());
  check_list(outputs[0], inputs[0], size_, "allgather", "output list");
  if (multi_host()) {
    return enqueue(OpType::ALLGATHER, "allgather", outputs[0], [this, outputs, inputs, opts]() mutable {
      fallback_->allgather(outputs, inputs, opts)->wait();
    });
  }
  at::Tensor input = inputs[0];
  std::vector<at::Tensor> outs = outputs[0];
  return submit(!opts.asyncOp, OpType::ALLGATHER, "allgather", outs, [this, input, outs]() mutable {
    at::Tensor in = contig(input);
    at::Tensor flat = at::empty({in.numel() * size_}, in.options());
    shm_allgather(*comm_, in.data_ptr(), flat.data_ptr(), in.numel() * in.element_size(), deadline());
    flat_split_into(flat, outs);
  });
}

WorkPtr IchibanBackend::allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                            std::vector<at::Tensor>& inputs, const c10d::AllgatherOptions& opts) {
  if (!inputs.empty() && to_cuda(inputs[0])) return cuda()->allgather_coalesced(outputs, inputs, opts);
  ICHIBAN_CHECK_ARG(outputs.size() == inputs.size(), "ichiban: allgather_coalesced: ", outputs.size(),
                    " output lists for ", inputs.size(), " inputs");
  std::vector<at::Tensor> all;
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_cpu(inputs[i], "allgather_coalesced", "inputs");
    check_list(outputs[i], inputs[i], size_, "allgather_coalesced", "output list");
    all.insert(all.end(), outputs[i].begin(), outputs[i].end());
  }
  if (multi_host()) {
    return enqueue(OpType::ALLGATHER_COALESCED, "allgather_coalesced", all, [this, outputs, inputs, opts]() mutable {
      fallback_->allgather_coalesced(outputs, inputs, opts)->wait();
    });
  }
  return enqueue(OpType::ALLGATHER_COALESCED, "allgather_coalesced", all, [this, outputs, inputs]() mutable {
    for (size_t i = 0; i < inputs.size(); ++i) {
      at::Tensor in = contig(inputs[i]);
      at::Tensor flat = at::empty({in.numel() * size_}, in.options());
      shm_allgather(*comm_, in.data_ptr(), flat.data_ptr(), in.numel() * in.element_size(), deadline());
      flat_split_into(flat, outputs[i]);
    }
  });
}

WorkPtr IchibanBackend::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                        std::vector<at::Tensor>& inputs,
                                                        const c10d::AllgatherOptions& opts) {
  if (!inputs.empty() && to_cuda(inputs[0])) return cuda()->allgather_into_tensor_coalesced(outputs, inputs, opts);
  ICHIBAN_CHECK_ARG(outputs.size() == inputs.size(), "ichiban: allgather_into_tensor_coalesced: ",
                    outputs.size(), " outputs for ", inputs.size(), " inputs");
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_cpu(inputs[i], "allgather_into_tensor_coalesced", "inputs");
    check_cpu(outputs[i], "allgather_into_tensor_coalesced", "outputs");
    check_same(inputs[i], outputs[i], "allgather_into_tensor_coalesced", "outputs");
    ICHIBAN_CHECK_ARG(outputs[i].numel() == inputs[i].numel() * size_, "ichiban: allgather_into_tensor_coalesced: "
                      "output ", i, " has ", outputs[i].numel(), " elements, expected ", inputs[i].numel() * size_);
  }
  return enqueue(OpType::COALESCED, "allgather_into_tensor_coalesced", outputs,
                 [this, outputs, inputs, opts]() mutable {
                   if (multi_host()) {
                     fallback_->allgather_into_tensor_coalesced(outputs, inputs, opts)->wait();
                     return;
                   }
                   for (size_t i = 0; i < inputs.size(); ++i) {
                     at::Tensor in = contig(inputs[i]);
                     at::Tensor out = contig(outputs[i]);
                     shm_allgather(*comm_, in.data_ptr(), out.data_ptr(), in.numel() * in.element_size(),
                                   deadline());
                     write_back(outputs[i], out);
                   }
                 });
}

WorkPtr IchibanBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                             const c10d::ReduceScatterOptions& opts) {
  if (to_cuda(input)) return cuda()->_reduce_scatter_base(output, input, opts);
  check_cpu(output, "reduce_scatter_tensor", "output");
  check_cpu(input, "reduce_scatter_tensor", "input");
  check_same(input, output, "reduce_scatter_tensor", "output");
  ICHIBAN_CHECK_ARG(input.numel() == output.numel() * size_, "ichiban: reduce_scatter_tensor: input has ",
                    input.numel(), " elements, expected world size x output = ", size_, " x ", output.numel());
  const RedOp op = to_redop(opts.reduceOp, "reduce_scatter_tensor");
  check_reduction(input.scalar_type(), op, "reduce_scatter_tensor");
  if (multi_host()) {
    return enqueue(OpType::_REDUCE_SCATTER_BASE, "reduce_scatter_tensor", {output},
                   [this, output, input, opts, op]() mutable {
                     c10d::ReduceScatterOptions o = opts;
                     o.reduceOp = to_c10d(op);
                     fallback_->_reduce_scatter_base(output, input, o)->wait();
                     if (op == RedOp::kAvg) output.div_(size_);
                   });
  }
  return submit(!opts.asyncOp, OpType::_REDUCE_SCATTER_BASE, "reduce_scatter_tensor", {output},
                 [this, output, input, op]() mutable {
                   const auto t0 = std::chrono::steady_clock::now();
                   at::Tensor in = contig(input);
                   at::Tensor out = contig(output);
                   const bool shared = shm_reduce_scatter(*comm_, in.data_ptr(), out.data_ptr(), out.numel(),
                                                          out.scalar_type(), op, op == RedOp::kAvg ? size_ : 1,
                                                          deadline());
                   write_back(output, out);
                   log("reduce_scatter_tensor", shared ? "shared" : "oneshot", in.numel() * in.element_size(), t0);
                 });
}

WorkPtr IchibanBackend::reduce_scatter(std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
                                       const c10d::ReduceScatterOptions& opts) {
  if (!outputs.empty() && to_cuda(outputs[0])) return cuda()->reduce_scatter(outputs, inputs, opts);
  check_one(outputs, "reduce_scatter", "output");
  ICHIBAN_CHECK_ARG(inputs.size() == 1, "ichiban: reduce_scatter expects one input list, got ", inputs.size());
  check_list(inputs[0], outputs[0], size_, "reduce_scatter", "input list");
  const RedOp op = to_redop(opts.reduceOp, "reduce_scatter");
  check_reduction(outputs[0].scalar_type(), op, "reduce_scatter");
  at::Tensor output = outputs[0];
  std::vector<at::Tensor> ins = inputs[0];
  return enqueue(OpType::REDUCE_SCATTER, "reduce_scatter", outputs, [this, output, ins, op, opts]() mutable {
    at::Tensor flat = flat_cat(ins);
    at::Tensor out = contig(output);
    if (multi_host()) {
      c10d::ReduceScatterOptions o = opts;
      o.reduceOp = to_c10d(op);
      fallback_->_reduce_scatter_base(out, flat, o)->wait();
      if (op == RedOp::kAvg) out.div_(size_);
    } else {
      shm_reduce_scatter(*comm_, flat.data_ptr(), out.data_ptr(), out.numel(), out.scalar_type(), op,
                         op == RedOp::kAvg ? size_ : 1, deadline());
    }
    write_back(output, out);
  });
}

WorkPtr IchibanBackend::reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                        std::vector<at::Tensor>& inputs,
                                                        const c10d::ReduceScatterOptions& opts) {
  if (!inputs.empty() && to_cuda(inputs[0])) return cuda()->reduce_scatter_tensor_coalesced(outputs, inputs, opts);
  ICHIBAN_CHECK_ARG(outputs.size() == inputs.size(), "ichiban: reduce_scatter_tensor_coalesced: ",
                    outputs.size(), " outputs for ", inputs.size(), " inputs");
  const RedOp op = to_redop(opts.reduceOp, "reduce_scatter_tensor_coalesced");
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_cpu(inputs[i], "reduce_scatter_tensor_coalesced", "inputs");
    check_cpu(outputs[i], "reduce_scatter_tensor_coalesced", "outputs");
    check_same(inputs[i], outputs[i], "reduce_scatter_tensor_coalesced", "outputs");
    check_reduction(inputs[i].scalar_type(), op, "reduce_scatter_tensor_coalesced");
    ICHIBAN_CHECK_ARG(inputs[i].numel() == outputs[i].numel() * size_, "ichiban: reduce_scatter_tensor_coalesced: "
                      "input ", i, " has ", inputs[i].numel(), " elements, expected ", outputs[i].numel() * size_);
  }
  return enqueue(OpType::COALESCED, "reduce_scatter_tensor_coalesced", outputs,
                 [this, outputs, inputs, op, opts]() mutable {
                   for (size_t i = 0; i < inputs.size(); ++i) {
                     at::Tensor in = contig(inputs[i]);
                     at::Tensor out = contig(outputs[i]);
                     if (multi_host()) {
                       c10d::ReduceScatterOptions o = opts;
                       o.reduceOp = to_c10d(op);
                       fallback_->_reduce_scatter_base(out, in, o)->wait();
                       if (op == RedOp::kAvg) out.div_(size_);
                     } else {
                       shm_reduce_scatter(*comm_, in.data_ptr(), out.data_ptr(), out.numel(), out.scalar_type(),
                                          op, op == RedOp::kAvg ? size_ : 1, deadline());
                     }
                     write_back(outputs[i], out);
                   }
                 });
}

}  // namespace ichiban
