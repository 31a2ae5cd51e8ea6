// alltoall, gather, scatter, barrier and point-to-point ops of IchibanBackend.
#include <ATen/ATen.h>

#include "backend/backend.h"
#include "backend/tensor_utils.h"
#include "backend/work.h"

namespace ichiban {

using WorkPtr = IchibanBackend::WorkPtr;
using c10d::OpType;

namespace {

// Byte offsets and lengths of n row blocks of t along dim 0 (equal blocks when
// splits is empty).
void row_blocks(const at::Tensor& t, const std::vector<int64_t>& splits, int n, const char* arg,
                std::vector<int64_t>& off, std::vector<int64_t>& len) {
  const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
  const int64_t row_bytes = rows == 0 ? 0 : t.numel() / rows * t.element_size();
  off.assign(n, 0);
  len.assign(n, 0);
  if (splits.empty()) {
    ICHIBAN_CHECK_ARG(rows % n == 0, "ichiban: all_to_all_single: ", arg, " has ", rows,
                      " rows, not divisible by the group size ", n, " (pass split sizes)");
    for (int q = 0; q < n; ++q) {
      len[q] = rows / n * row_bytes;
      off[q] = q * len[q];
    }
    return;
  }
  ICHIBAN_CHECK_ARG(static_cast<int>(splits.size()) == n, "ichiban: all_to_all_single: ", arg, " splits have ",
                    splits.size(), " entries, expected the group size ", n);
  int64_t acc = 0;
  for (int q = 0; q < n; ++q) {
    ICHIBAN_CHECK_ARG(splits[q] >= 0, "ichiban: all_to_all_single: negative split in ", arg);
    off[q] = acc * row_bytes;
    len[q] = splits[q] * row_bytes;
    acc += splits[q];
  }
  ICHIBAN_CHECK_ARG(acc == rows, "ichiban: all_to_all_single: ", arg, " splits sum to ", acc, ", but it has ",
                    rows, " rows");
}

// 1-D contiguous concatenation of tensors (each flattened in row-major order).
at::Tensor flat_in(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto& t : ts) flat.push_back(t.reshape({-1}));
  return at::cat(flat);
}

}  // namespace

WorkPtr IchibanBackend::alltoall_base(at::Tensor& output, at::Tensor& input, std::vector<int64_t>& output_splits,
                                      std::vector<int64_t>& input_splits, const c10d::AllToAllOptions& opts) {
  if (to_cuda(input)) return cuda()->alltoall_base(output, input, output_splits, input_splits, opts);
  check_cpu(output, "all_to_all_single", "output");
  check_cpu(input, "all_to_all_single", "input");
  check_same(input, output, "all_to_all_single", "output");
  std::vector<int64_t> in_off, in_len, out_off, out_len;
  row_blocks(input, input_splits, size_, "input", in_off, in_len);
  row_blocks(output, output_splits, size_, "output", out_off, out_len);
  if (multi_host()) {
    return enqueue(OpType::ALLTOALL_BASE, "all_to_all_single", {output},
                   [this, output, input, output_splits, input_splits, opts]() mutable {
                     fallback_->alltoall_base(output, input, output_splits, input_splits, opts)->wait();
                   });
  }
  return submit(!opts.asyncOp, OpType::ALLTOALL_BASE, "all_to_all_single", {output},
                 [this, output, input, in_off, in_len, out_off, out_len]() mutable {
                   const auto t0 = std::chrono::steady_clock::now();
                   at::Tensor in = contig(input);
                   at::Tensor out = contig(output);
                   const char* path = shm_alltoall(*comm_, static_cast<const char*>(in.data_ptr()), in_off.data(),
                                                   in_len.data(), static_cast<char*>(out.data_ptr()), out_off.data(),
                                                   out_len.data(), out.scalar_type(), deadline());
                   write_back(output, out);
                   log("all_to_all_single", path, in.numel() * in.element_size(), t0);
                 });
}

WorkPtr IchibanBackend::alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                 const c10d::AllToAllOptions& opts) {
  if (!inputs.empty() && to_cuda(inputs[0])) return cuda()->alltoall(outputs, inputs, opts);
  ICHIBAN_CHECK_ARG(static_cast<int>(outputs.size()) == size_ && static_cast<int>(inputs.size()) == size_,
                    "ichiban: all_to_all expects ", size_, " input and output tensors, got ", inputs.size(),
                    " and ", outputs.size());
  std::vector<int64_t> in_off(size_), in_len(size_), out_off(size_), out_len(size_);
  int64_t a = 0, b = 0;
  for (int q = 0; q < size_; ++q) {
    check_cpu(inputs[q], "all_to_all", "inputs");
    check_cpu(outputs[q], "all_to_all", "outputs");
    check_same(inputs[0], inputs[q], "all_to_all", "inputs");
    check_same(inputs[0], outputs[q], "all_to_all", "outputs");
    in_off[q] = a;
    in_len[q] = inputs[q].numel() * inputs[q].element_size();
    a += in_len[q];
    out_off[q] = b;
    out_len[q] = outputs[q].numel() * outputs[q].element_size();
    b += out_len[q];
  }
  if (multi_host()) {
    return enqueue(OpType::ALLTOALL, "all_to_all", outputs, [this, outputs, inputs, opts]() mutable {
      fallback_->alltoall(outputs, inputs, opts)->wait();
    });
  }
  return enqueue(OpType::ALLTOALL, "all_to_all", outputs,
                 [this, outputs, inputs, in_off, in_len, out_off, out_len]() mutable {
                   at::Tensor in = flat_in(inputs);
                   at::Tensor out = at::empty({out_off.back() / outputs[0].element_size() +
                                               out_len.back() / outputs[0].element_size()},
                                              outputs[0].options());
                   shm_alltoall(*comm_, static_cast<const char*>(in.data_ptr()), in_off.data(), in_len.data(),
                                static_cast<char*>(out.data_ptr()), out_off.data(), out_len.data(),
                                out.scalar_type(), deadline());
                   int64_t off = 0;
                   for (auto& o : outputs) {
                     o.copy_(out.narrow(0, off, o.numel()).view(o.sizes()));
                     off += o.numel();
                   }
                 });
}

WorkPtr IchibanBackend::gather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
                               const c10d::GatherOptions& opts) {
  if (!inputs.empty() && to_cuda(inputs[0])) return cuda()->gather(outputs, inputs, opts);
  check_one(inputs, "gather", "input");
  const int root = static_cast<int>(opts.rootRank);
  ICHIBAN_CHECK_ARG(root >= 0 && root < size_, "ichiban: gather: root ", root, " is not a rank of the group");
  std::vector<at::Tensor> outs;
  if (rank_ == root) {
    ICHIBAN_CHECK_ARG(outputs.size() == 1, "ichiban: gather: the root expects one output list, got ",
                      outputs.size());
    check_list(outputs[0], inputs[0], size_, "gather", "gather_list");
    outs = outputs[0];
  } else {
    ICHIBAN_CHECK_ARG(outputs.empty() || outputs[0].empty(), "ichiban: gather: only the root passes a gather_list");
  }
  if (multi_host()) {
    return enqueue(OpType::GATHER, "gather", outs, [this, outputs, inputs, opts]() mutable {
      fallback_->gather(outputs, inputs, opts)->wait();
    });
  }
  at::Tensor input = inputs[0];
  return enqueue(OpType::GATHER, "gather", outs, [this, input, outs, root]() mutable {
    at::Tensor in = contig(input);
    at::Tensor flat = rank_ == root ? at::empty({in.numel() * size_}, in.options()) : at::Tensor();
    shm_gather(*comm_, in.data_ptr(), rank_ == root ? flat.data_ptr() : nullptr, in.numel() * in.element_size(),
               root, deadline());
    if (rank_ == root) {
      int64_t off = 0;
      for (auto& o : outs) {
        o.copy_(flat.narrow(0, off, o.numel()).view(o.sizes()));
        off += o.numel();
      }
    }
  });
}

WorkPtr IchibanBackend::scatter(std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
                                const c10d::ScatterOptions& opts) {
  if (!outputs.empty() && to_cuda(outputs[0])) return cuda()->scatter(outputs, inputs, opts);
  check_one(outputs, "scatter", "output");
  const int root = static_cast<int>(opts.rootRank);
  ICHIBAN_CHECK_ARG(root >= 0 && root < size_, "ichiban: scatter: root ", root, " is not a rank of the group");
  std::vector<at::Tensor> ins;
  if (rank_ == root) {
    ICHIBAN_CHECK_ARG(inputs.size() == 1, "ichiban: scatter: the root expects one input list, got ", inputs.size());
    check_list(inputs[0], outputs[0], size_, "scatter", "scatter_list");
    ins = inputs[0];
  } else {
    ICHIBAN_CHECK_ARG(inputs.empty() || inputs[0].empty(), "ichiban: scatter: only the root passes a scatter_list");
  }
  if (multi_host()) {
    return enqueue(OpType::SCATTER, "scatter", outputs, [this, outputs, inputs, opts]() mutable {
      fallback_->scatter(outputs, inputs, opts)->wait();
    });
  }
  at::Tensor output = outputs[0];
  return enqueue(OpType::SCATTER, "scatter", outputs, [this, output, ins, root]() mutable {
    at::Tensor flat = rank_ == root ? flat_in(ins) : at::Tensor();
    at::Tensor out = contig(output);
    shm_scatter(*comm_, rank_ == root ? flat.data_ptr() : nullptr, out.data_ptr(), out.numel() * out.element_size(),
                root, deadline());
    write_back(output, out);
  });
}

WorkPtr IchibanBackend::barrier(const c10d::BarrierOptions& opts) {
  // A group bound to a GPU synchronises through NCCL, as c10d users expect.
  if (make_cuda_ && opts.device.has_value() && opts.device->is_cuda()) return cuda()->barrier(opts);
  return submit(!opts.asyncOp, OpType::BARRIER, "barrier", {}, [this, opts]() {
    if (multi_host()) {
      require_fallback("barrier");
      fallback_->barrier(opts)->wait();
    } else {
      shm_barrier(*comm_, deadline());
    }
  });
}

WorkPtr IchibanBackend::send(std::vector<at::Tensor>& tensors, int dst, int tag) {
  if (!tensors.empty() && to_cuda(tensors[0])) return cuda()->send(tensors, dst, tag);
  check_one(tensors, "send", "tensors");
  require_fallback("send");
  return fallback_->send(tensors, dst, tag);
}

WorkPtr IchibanBackend::recv(std::vector<at::Tensor>& tensors, int src, int tag) {
  if (!tensors.empty() && to_cuda(tensors[0])) return cuda()->recv(tensors, src, tag);
  check_one(tensors, "recv", "tensors");
  require_fallback("recv");
  return fallback_->recv(tensors, src, tag);
}

WorkPtr IchibanBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  if (!tensors.empty() && to_cuda(tensors[0])) return cuda()->recvAnysource(tensors, tag);
  check_one(tensors, "recv", "tensors");
  require_fallback("recv");
  return fallback_->recvAnysource(tensors, tag);
}

}  // namespace ichiban
