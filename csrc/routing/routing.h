// Shared declarations of the routing (O2MKD) ops: the CPU kernels live in routing.cpp, the CUDA
// kernels in routing.cu (built only with FASTDISTILL_WITH_CUDA).
#pragma once

// ATen only (not torch/extension.h, which pulls in Python and pybind11): keeps nvcc's host pass short.
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace fastdistill {
namespace routing {

// The CUDA counting sort keeps one counter per (warp, bucket) in shared memory; K students plus
// the out-of-range bucket must fit.
constexpr int64_t kMaxSegments = 256;

void check_route_inputs(const at::Tensor& timesteps, const at::Tensor& boundaries);
void check_permute_inputs(const std::vector<at::Tensor>& tensors, const at::Tensor& index);
void check_mse_inputs(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                      const at::Tensor& segment_ids);


}  // namespace routing
}  // namespace fastdistill
