// The Python module care_kernels._C_cuda: importing it registers the CUDA implementations
// (TORCH_LIBRARY_IMPL(care_kernels, CUDA, ...)) of ops whose schemas care_kernels._C defines.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "care_kernels CUDA twins of the group ops";
  m.def("built_with_torch", []() { return std::string(CARE_KERNELS_TORCH_VERSION); });
}
