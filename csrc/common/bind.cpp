#include <torch/extension.h>

#include "common/strided_copy.h"
#include "common/thread_pool.h"

namespace ichiban {

void bind_common(pybind11::module_& m) {
  m.def("native_build_info", [] {
    pybind11::dict d;
#ifdef ICHIBAN_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["version"] = ICHIBAN_VERSION;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    d["torch_version_major"] = TORCH_VERSION_MAJOR;
    d["torch_version_minor"] = TORCH_VERSION_MINOR;
    return d;
  }, "Facts compiled into the native module.");
  m.def("strided_gather", &strided_gather, pybind11::arg("src"), pybind11::arg("out"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Copy src (any strides) into the contiguous out, in row-major order of src's shape.");
  m.def("num_threads", [] { return default_pool().size(); },
        "Threads in the native worker pool (ICHIBAN_NUM_THREADS).");
}

}  // namespace ichiban
