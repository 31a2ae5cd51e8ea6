// Python bindings of csrc/backend/: the IchibanBackend class and its factory.
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include "backend/backend.h"
#include "collectives/reduce.h"
#include "shm/arena.h"
#include "shm/segment.h"

namespace py = pybind11;

namespace ichiban {

namespace {

c10::intrusive_ptr<c10d::Backend> as_backend(const py::object& o) {
  if (o.is_none()) return {};
  return o.cast<c10::intrusive_ptr<c10d::Backend>>();
}

}  // namespace

void bind_backend(pybind11::module_& m) {
  // The base class is registered by torch's c10d bindings, which
  // torch.distributed initialises on import.
  py::module_::import("torch.distributed");

  py::class_<IchibanBackend, c10d::Backend, c10::intrusive_ptr<IchibanBackend>>(m, "IchibanBackend")
      .def_property_readonly("inter_host_bytes", &IchibanBackend::inter_host_bytes,
                             "bytes this group sent through the inter-host engine")
      .def_property_readonly("num_hosts", &IchibanBackend::num_hosts)
      .def_property_readonly("local_size", &IchibanBackend::local_size, "ranks of this group on this host")
      .def_property_readonly("direct", &IchibanBackend::direct,
                             "whether this host's members copy large blocks directly between processes")
      .def_property_readonly("direct_bytes", &IchibanBackend::direct_bytes,
                             "bytes this rank read directly from peers' buffers")
      .def_property_readonly("shared", &IchibanBackend::shared,
                             "whether this host's members read and write each other's host-shared tensors")
      .def_property_readonly("shared_declined", &IchibanBackend::shared_declined,
                             "why this rank does not use host-shared tensors ('' when it does or a peer declined)")
      .def_property_readonly("shared_bytes", &IchibanBackend::shared_bytes,
                             "bytes of the ops this rank ran on host-shared tensors (read and written in the peers' memory)")
      .def_property_readonly("worker_wakeups", &IchibanBackend::worker_wakeups,
                             "how often the progress thread woke up (a synchronous op run inline does not wake it)")
      .def("choose_allreduce",
           [](const IchibanBackend& b, int64_t bytes) { return std::string(algo_name(b.choose_allreduce(bytes))); },
           py::arg("bytes"), "the all-reduce algorithm used for a message of `bytes`");

  m.def(
      "create",
      [](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, const std::string& group_name,
         const std::string& shm_name, double timeout_s, std::vector<int> host_of, std::vector<int> labels,
         int64_t slot_bytes, int64_t oneshot_max_bytes, const std::string& algo, bool debug, int spin_iters,
         int yield_iters, const py::object& fallback, const py::object& inter, const py::object& cuda, bool direct,
         int64_t direct_min_bytes, bool shared) {
        BackendConfig cfg;
        cfg.group_name = group_name;
        cfg.shm_name = shm_name;
        cfg.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000.0));
        cfg.host_of = std::move(host_of);
        cfg.labels = std::move(labels);
        cfg.slot_bytes = slot_bytes;
        cfg.oneshot_max_bytes = oneshot_max_bytes;
        cfg.algo = algo;
        cfg.debug = debug;
        cfg.spin_iters = spin_iters;
        cfg.yield_iters = yield_iters;
        cfg.direct = direct;
        cfg.direct_min_bytes = direct_min_bytes;
        cfg.shared = shared;
        auto fb = as_backend(fallback);
        auto in = as_backend(inter);
        auto cu = as_backend(cuda);
        py::gil_scoped_release release;  // the rendezvous waits on peers
        return c10::make_intrusive<IchibanBackend>(store, rank, size, std::move(cfg), std::move(fb), std::move(in), std::move(cu));
      },
      py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("group_name"), py::arg("shm_name"),
      py::arg("timeout_s"), py::arg("host_of"), py::arg("labels"), py::arg("slot_bytes"),
      py::arg("oneshot_max_bytes"), py::arg("algo"), py::arg("debug"), py::arg("spin_iters"),
      py::arg("yield_iters"), py::arg("fallback"), py::arg("inter"), py::arg("cuda"), py::arg("direct"),
      py::arg("direct_min_bytes"), py::arg("shared"),
      "Create the backend of one process group (collective: every member calls it).");

  m.def("global_inter_host_bytes", &global_inter_host_bytes,
        "bytes sent through the inter-host engine by every ichiban group of this process");
  m.def(
      "enable_shared_tensors",
      [](uint64_t reserve_bytes, uint64_t min_bytes) { arena_enable(reserve_bytes, min_bytes); },
      py::arg("reserve_bytes"), py::arg("min_bytes"),
      "Install the host-shared CPU allocator (idempotent; see ichiban_comm.distributed.enable_shared_tensors).");
  m.def("shared_tensors_enabled", &arena_enabled);
  m.def("shared_tensor_stats", [] {
    const ArenaStats s = arena_stats();
    py::dict d;
    d["reserve"] = s.reserve;
    d["top"] = s.top;
    d["in_use"] = s.in_use;
    d["free"] = s.free_bytes;
    d["allocations"] = s.allocations;
    d["fallbacks"] = s.fallbacks;
    return d;
  });
  m.def(
      "shared_tensor_offset", [](const at::Tensor& t) { return arena_offset(t.data_ptr(), t.nbytes()); },
      py::arg("tensor"), "offset of the tensor's bytes in this process's arena, or -1");
  m.def("trim_shared_tensors", &arena_trim, "return the free arena blocks' pages to the system; bytes released");
  m.def("shm_name", &shm_safe_name, py::arg("name"), "the /dev/shm name a segment called `name` gets");
}

}  // namespace ichiban
