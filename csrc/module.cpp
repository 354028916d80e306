// The Python module care_kernels._C. Importing it runs the static TORCH_LIBRARY registrations of every
// csrc/cpu/*.cpp file (the ops then live under torch.ops.care_kernels); the functions below only report
// how the binary was built, so Python can refuse a binary built against another torch.
#include <torch/extension.h>

#include "cpu/row_epilogues.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "care_kernels native CPU kernels (ops registered under torch.ops.care_kernels)";
  m.def("built_with_torch", []() { return std::string(CARE_KERNELS_TORCH_VERSION); },
        "torch.__version__ the extension was compiled against");
  m.def("openmp_max_threads", &openmp_max_threads, "OpenMP threads the CPU kernels use");
  m.def("cpu_isa", &care_kernels::row_epilogues::active_isa,
        "build of the row epilogues in use: 'avx512', 'avx2' or 'default' (follows ATEN_CPU_CAPABILITY)");
}
