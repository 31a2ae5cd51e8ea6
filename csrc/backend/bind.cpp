// Python bindings of csrc/backend/: the IchibanBackend class and its factory.
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include "backend/backend.h"
#include "backend/work.h"
#include "common/env.h"
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
      .def_property_readonly("intra_host_bytes", &IchibanBackend::intra_host_bytes,
                             "payload bytes of the ops this rank ran through this host's shared memory")
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
      .def_property_readonly("has_segment", &IchibanBackend::has_segment,
                             "whether this group's /dev/shm segment exists (made by its first CPU op)")
      .def_property_readonly("has_cuda_group", &IchibanBackend::has_cuda_group,
                             "whether this group's NCCL group exists (made by its first CUDA op)")
      .def_property_readonly("heartbeat", &IchibanBackend::heartbeat,
                             "whether peers are watched by heartbeat (members in different PID namespaces)")
      .def_property_readonly("options", [](const IchibanBackend& b) { return b.config(); },
                             "a copy of the settings this group runs with")
      .def_property_readonly("worker_wakeups", &IchibanBackend::worker_wakeups,
                             "how often the progress thread woke up (a synchronous op run inline does not wake it)")
      .def("choose_allreduce",
           [](const IchibanBackend& b, int64_t bytes) { return std::string(algo_name(b.choose_allreduce(bytes))); },
           py::arg("bytes"), "the all-reduce algorithm used for a message of `bytes`");

  // The settings object (IchibanOptions in Python subclasses it). A fresh one
  // holds the defaults of backend.h; fill_from_env() applies ICHIBAN_*.
  py::class_<BackendConfig>(m, "BackendConfig")
      .def(py::init<>())
      .def("fill_from_env", &BackendConfig::fill_from_env,
           "override the defaults with the ICHIBAN_* environment variables that are set")
      .def("_copy", [](const BackendConfig& c) { return BackendConfig(c); })
      .def_readwrite("slot_bytes", &BackendConfig::slot_bytes)
      .def_readwrite("oneshot_max_bytes", &BackendConfig::oneshot_max_bytes)
      .def_readwrite("algo", &BackendConfig::algo)
      .def_readwrite("debug", &BackendConfig::debug)
      .def_readwrite("spin_iters", &BackendConfig::spin_iters)
      .def_readwrite("yield_iters", &BackendConfig::yield_iters)
      .def_readwrite("direct", &BackendConfig::direct)
      .def_readwrite("direct_min_bytes", &BackendConfig::direct_min_bytes)
      .def_readwrite("shared", &BackendConfig::shared)
      .def_readwrite("nccl", &BackendConfig::nccl)
      .def_readwrite("liveness", &BackendConfig::liveness)
      .def_readwrite("heartbeat_ms", &BackendConfig::heartbeat_ms)
      .def_readwrite("group_name", &BackendConfig::group_name)
      .def_readwrite("shm_name", &BackendConfig::shm_name)
      .def_readwrite("host_of", &BackendConfig::host_of)
      .def_readwrite("labels", &BackendConfig::labels)
      .def_property(
          "timeout_s", [](const BackendConfig& c) { return c.timeout.count() / 1000.0; },
          [](BackendConfig& c, double s) { c.timeout = std::chrono::milliseconds(static_cast<int64_t>(s * 1000.0)); })
      .def("spin_for", &BackendConfig::spin_for, py::arg("local_size"),
           "busy polls a waiter makes on a host with local_size ranks (spin_iters, with -1 resolved)");

  m.def(
      "create",
      [](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, const BackendConfig& cfg,
         const py::object& fallback, const py::object& inter, const py::object& make_cuda) {
        auto fb = as_backend(fallback);
        auto in = as_backend(inter);
        IchibanBackend::Factory factory;
        if (!make_cuda.is_none()) {
          // The callable is Python's: hold it and call it under the GIL, and drop it there too.
          auto fn = std::shared_ptr<py::object>(new py::object(make_cuda), [](py::object* o) {
            py::gil_scoped_acquire gil;
            delete o;
          });
          factory = [fn]() {
            py::gil_scoped_acquire gil;
            return as_backend((*fn)());
          };
        }
        py::gil_scoped_release release;  // the rendezvous waits on peers
        return c10::make_intrusive<IchibanBackend>(store, rank, size, cfg, std::move(fb), std::move(in),
                                                   std::move(factory));
      },
      py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("config"), py::arg("fallback"), py::arg("inter"),
      py::arg("make_cuda"),
      "Create the backend of one process group (every member calls it). make_cuda: None, or a callable "
      "returning the NCCL backend, called on the first CUDA tensor.");
  m.def("env_flag", [](const std::string& name, bool fallback) { return env_flag(name.c_str(), fallback); },
        py::arg("name"), py::arg("default") = false,
        "the one parser of ICHIBAN_* on/off variables (1/0, true/false, yes/no, on/off)");

  m.def("thread_blocked_ns", &IchibanWork::thread_blocked_ns,
        "nanoseconds the calling thread has spent blocked in ichiban ops (waits and inline runs)");
  m.def("global_intra_host_bytes", &ShmComm::global_local_bytes,
        "payload bytes of the ops every ichiban group of this process ran through this host's shared memory");
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
