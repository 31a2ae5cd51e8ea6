// The Python module ichiban_comm._C. This file only binds: each folder defines
// its own bind_* function next to the code it exposes.
#include <torch/extension.h>

namespace ichiban {
void bind_common(pybind11::module_& m);
void bind_backend(pybind11::module_& m);
void bind_checkpoint(pybind11::module_& m);
void bind_data(pybind11::module_& m);
}  // namespace ichiban

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ichiban_comm native core: shared-memory collectives, checkpoint I/O, data pipeline";
  ichiban::bind_common(m);
  auto backend = m.def_submodule("backend", "the c10d backend");
  auto checkpoint = m.def_submodule("checkpoint", "checkpoint staging and I/O");
  auto data = m.def_submodule("data", "token data pipeline");
  ichiban::bind_backend(backend);
  ichiban::bind_checkpoint(checkpoint);
  ichiban::bind_data(data);
}
