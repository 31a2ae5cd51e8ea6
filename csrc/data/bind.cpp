// Python bindings of csrc/data/ (filled in as the capability lands).
#include <torch/extension.h>

namespace ichiban {

void bind_data(pybind11::module_& m) { (void)m; }

}  // namespace ichiban
