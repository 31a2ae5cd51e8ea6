// Python bindings of csrc/backend/ (filled in as the capability lands).
#include <torch/extension.h>

namespace ichiban {

void bind_backend(pybind11::module_& m) { (void)m; }

}  // namespace ichiban
