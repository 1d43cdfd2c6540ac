// Python bindings of the svdquant._C extension.
//
// Always built: build_info() (what this build contains). Kernel entry points are compiled
// and registered only for the architectures the build targets (setup.py defines
// SVDQ_WITH_SM90A when it compiles the Hopper family in csrc/sm90/).
#include <torch/extension.h>

#include <string>
#include <vector>

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["archs"] = std::string(SVDQ_BUILD_ARCHS);
  std::vector<std::string> kernels;
  info["kernels"] = kernels;
  info["torch_cuda"] =
#ifdef WITH_CUDA
      true;
#else
      false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "svdquant compiled kernels";
  m.def("build_info", &build_info, "architectures and kernels compiled into this build");
}
