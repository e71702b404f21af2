// fastdistill._C: the compiled half of fastdistill.
//
// This file owns the `fastdistill` operator namespace (TORCH_LIBRARY may appear once per
// namespace); every op file adds its schemas with TORCH_LIBRARY_FRAGMENT and its kernels with
// TORCH_LIBRARY_IMPL(fastdistill, CPU / CUDA, m). Python registers fake (meta) kernels and
// autograd for them in fastdistill/ops/.
//
// The Python module itself exposes only build facts, so that `fastdistill info` can say
// truthfully what was compiled.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>
#ifdef FASTDISTILL_WITH_CUDA
#include <cuda.h>
#endif

#include <string>

TORCH_LIBRARY(fastdistill, m) {
  // Schemas are defined by the op files (TORCH_LIBRARY_FRAGMENT). This block only claims the
  // namespace, so that `torch.ops.fastdistill` exists as soon as the extension is loaded.
}

namespace {

py::dict build_info() {
  py::dict info;
#ifdef FASTDISTILL_WITH_CUDA
  info["with_cuda"] = true;
#ifdef CUDA_VERSION
  info["cuda_version"] = std::to_string(CUDA_VERSION);
#endif
#else
  info["with_cuda"] = false;
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                         std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdistill compiled kernels (ops live under torch.ops.fastdistill)";
  m.def("build_info", &build_info, "Facts fixed when the extension was compiled.");
}
