// Python bindings of csrc/checkpoint/ (filled in as the capability lands).
#include <torch/extension.h>

namespace ichiban {

void bind_checkpoint(pybind11::module_& m) { (void)m; }

}  // namespace ichiban
