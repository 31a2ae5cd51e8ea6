// Python bindings of csrc/checkpoint/: staging pool, copier, chunk writer and reader.
#include <torch/extension.h>

#include <tuple>

#include "checkpoint/chunk_codec.h"
#include "checkpoint/crc32c.h"
#include "checkpoint/file_io.h"
#include "checkpoint/reader.h"
#include "checkpoint/staging.h"
#include "checkpoint/writer.h"
#include "checkpoint/zstd_lib.h"

namespace py = pybind11;

namespace ichiban {

namespace {

// (offset, length, plane_width) into source 0, or (source, offset, length, plane_width)
using BlobTuple = std::vector<int64_t>;
// (path, file_offset, stored_length, raw_length, crc, codec, planes, dst_index, dst_offset, label)
using ReadTuple = std::tuple<std::string, int64_t, int64_t, int64_t, uint32_t, int, int, int64_t,
                             int64_t, std::string>;

uint32_t crc_of(py::buffer b, uint32_t start, bool software) {
  py::buffer_info info = b.request();
  const size_t n = static_cast<size_t>(info.size * info.itemsize);
  py::gil_scoped_release nogil;
  return software ? crc32c_software(info.ptr, n, start) : crc32c(info.ptr, n, start);
}

uint32_t crc_of_tensor(const at::Tensor& t, bool software) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), "crc32c: tensor must be contiguous on CPU");
  const size_t n = static_cast<size_t>(t.numel()) * t.element_size();
  py::gil_scoped_release nogil;
  return software ? crc32c_software(t.data_ptr(), n) : crc32c(t.data_ptr(), n);
}

}  // namespace

void bind_checkpoint(py::module_& m) {
  m.def("crc32c", &crc_of, py::arg("data"), py::arg("crc") = 0, py::arg("software") = false,
        "CRC-32C of a bytes-like object (continuing from crc); software=True forces the table path.");
  m.def("crc32c_tensor", &crc_of_tensor, py::arg("tensor"), py::arg("software") = false,
        "CRC-32C of a contiguous CPU tensor's bytes.");
  m.def("crc32c_hardware", &crc32c_hardware_available, "Whether crc32c uses the SSE4.2 instruction.");
  m.def("zstd_available", [] { return zstd_lib() != nullptr; }, "Whether libzstd could be loaded.");
  m.def("zstd_error", &zstd_load_error, "Why libzstd could not be loaded ('' when it could).");
  m.def("zstd_version", [] {
    const ZstdLib* z = zstd_lib();
    return z ? static_cast<int64_t>(z->versionNumber()) : int64_t(-1);
  });
  m.def("split_byte_planes", [](const at::Tensor& src, int width) {
    TORCH_CHECK_VALUE(src.is_contiguous() && src.scalar_type() == at::kByte, "split_byte_planes: src must be contiguous uint8");
    at::Tensor out = at::empty_like(src);
    split_byte_planes(src.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), src.numel(), width);
    return out;
  }, py::arg("src"), py::arg("width"));
  m.def("alloc_staging", &alloc_staging, py::arg("nbytes"),
        py::call_guard<py::gil_scoped_release>(), "Prefaulted, MADV_DONTFORK host memory (uint8 tensor).");
  py::class_<StagingArena, std::shared_ptr<StagingArena>>(m, "StagingArena",
      "Reserved address space for a staging pool that grows in place (see staging.h).")
      .def(py::init<int64_t>(), py::arg("reserve_bytes"))
      .def_property_readonly("reserved", &StagingArena::reserved)
      .def_property_readonly("size", &StagingArena::size)
      .def_property_readonly("address", [](const StagingArena& a) {
        return reinterpret_cast<uintptr_t>(a.base());
      })
      .def("grow", &StagingArena::grow, py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def("prefault", &StagingArena::prefault, py::arg("offset"), py::arg("length"),
           py::call_guard<py::gil_scoped_release>())
      .def("lock", &StagingArena::lock, py::arg("offset"), py::arg("length"),
           py::call_guard<py::gil_scoped_release>(), "mlock a range: 0 or the errno.")
      .def("tensor", [](std::shared_ptr<StagingArena> a) {
        // The tensor keeps the arena (and so the mapping) alive.
        return at::from_blob(a->base(), {a->size()}, [a](void*) {},
                             at::TensorOptions().dtype(at::kByte).device(at::kCPU));
      }, "The mapped bytes [0, size) as a uint8 tensor that keeps the arena alive.");
  m.def("stage_copy", &stage_copy, py::arg("srcs"), py::arg("pool"), py::arg("offsets"),
        py::call_guard<py::gil_scoped_release>(), "Copy CPU tensors into the staging pool at byte offsets.");
  m.def("copy_bytes", &copy_bytes, py::arg("dst"), py::arg("src"),
        py::call_guard<py::gil_scoped_release>(), "Parallel byte copy between contiguous CPU tensors.");
  m.def("fsync_dir", &fsync_dir, py::arg("path"), py::call_guard<py::gil_scoped_release>());
  m.def("read_chunks", [](const std::vector<ReadTuple>& items, const std::vector<at::Tensor>& dsts) {
    std::vector<ReadSpec> specs;
    specs.reserve(items.size());
    for (const auto& it : items) {
      ReadSpec s;
      std::tie(s.path, s.file_offset, s.stored_length, s.raw_length, s.crc, s.codec, s.planes,
               s.dst_index, s.dst_offset, s.label) = it;
      specs.push_back(std::move(s));
    }
    py::gil_scoped_release nogil;
    read_chunks(specs, dsts);
  }, py::arg("specs"), py::arg("dsts"),
        "Read, verify (crc32c) and decode chunks into dsts; spec = (path, file_offset, stored_length, "
        "raw_length, crc, codec, planes, dst_index, dst_offset, label).");

  py::class_<WriteJob>(m, "WriteJob")
      .def(py::init([](py::object source, const std::vector<BlobTuple>& blobs,
                       std::vector<std::string> paths, int64_t chunk_bytes, int codec, int level) {
             std::vector<at::Tensor> sources;
             if (THPVariable_Check(source.ptr()))
               sources.push_back(source.cast<at::Tensor>());
             else
               sources = source.cast<std::vector<at::Tensor>>();
             std::vector<BlobSpec> specs;
             specs.reserve(blobs.size());
             for (const auto& b : blobs) {
               TORCH_CHECK_VALUE(b.size() == 3 || b.size() == 4, "WriteJob: a blob is (offset, length, "
                                 "plane_width) or (source, offset, length, plane_width)");
               BlobSpec s;
               size_t k = 0;
               if (b.size() == 4) s.source = b[k++];
               s.offset = b[k];
               s.length = b[k + 1];
               s.plane_width = static_cast<int>(b[k + 2]);
               specs.push_back(s);
             }
             return std::make_unique<WriteJob>(std::move(sources), std::move(specs), std::move(paths),
                                               chunk_bytes, codec, level);
           }),
           py::arg("source"), py::arg("blobs"), py::arg("paths"), py::arg("chunk_bytes"),
           py::arg("codec"), py::arg("level"),
           "Start writer threads (one per path) persisting blobs of source (a uint8 tensor or a list "
           "of them): [(offset, length, plane_width)] or [(source, offset, length, plane_width)].")
      .def("done", &WriteJob::done)
      .def("wait", &WriteJob::wait, py::call_guard<py::gil_scoped_release>())
      .def("wait_for", &WriteJob::wait_for, py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("bytes_stored", &WriteJob::bytes_stored)
      .def("records", [](const WriteJob& j) {
        py::list out;
        for (const auto& r : j.records())
          out.append(py::make_tuple(r.blob, r.index, r.raw_offset, r.raw_length, r.file, r.file_offset,
                                    r.stored_length, r.crc, r.codec, r.planes));
        return out;
      }, "Per chunk: (blob, index, raw_offset, raw_length, file, file_offset, stored_length, crc, codec, planes).");
}

}  // namespace ichiban
