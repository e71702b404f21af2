// CUDA kernels of the routing (O2MKD) ops; schemas and CPU kernels are in routing.cpp.
//
// segment_route: ONE launch of one block. Pass 1 counts samples per bucket (shared-memory
// atomics; order-free), thread 0 scans the K+1 counts into offsets, pass 2 walks the batch in
// tiles of blockDim samples in order and places each sample at
//   cursor[bucket] + (same-bucket samples of earlier warps in the tile) + (rank among same-bucket lanes)
// using __match_any_sync, so the sort is stable. B is at most a few thousand samples per step, so
// one block is latency-optimal and needs no grid-wide sync or second launch.
//
// segment_permute: one launch for up to kMaxTensorsPerLaunch tensors of any dtypes (rows are
// copied as raw bytes, 16-byte vectors when aligned); grid = (rows, tensors).
//
// segment_mse_forward / backward: one block per sample row reduces sum((p - t)^2) in fp32 (fp64
// for fp64) and adds w_b / D times it into its segment; the backward writes
// 2 w_b g_seg (p - t) / D in one elementwise pass.
#include <type_traits>
#include "routing/routing.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

namespace fastdistill {
namespace routing {
namespace {

constexpr int kRouteThreads = 1024;
constexpr int kMaxTensorsPerLaunch = 24;
constexpr int kPermuteThreads = 256;
constexpr int kReduceThreads = 256;

// Comparison type of a timestep: int64 for integer timesteps, double for floating ones.
template <typename scalar_t> struct CmpType { using type = double; };
template <> struct CmpType<int64_t> { using type = int64_t; };
template <> struct CmpType<int32_t> { using type = int64_t; };

// Bucket of v: k with bnd[k] <= v < bnd[k+1], or K for out-of-range / NaN values.
template <typename cmp_t>
__device__ __forceinline__ int bucket_of(cmp_t v, const cmp_t* bnd, int K) {
  if (!(v >= bnd[0] && v < bnd[K])) return K;
  int lo = 0, hi = K;  // invariant: bnd[lo] <= v < bnd[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (bnd[mid] <= v) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteThreads) segment_route_kernel(
    const scalar_t* __restrict__ t, const int64_t* __restrict__ bnd_g, int B, int K,
    int64_t* __restrict__ seg_out, int64_t* __restrict__ perm, int64_t* __restrict__ inv,
    int64_t* __restrict__ offsets) {
  using cmp_t = typename CmpType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const int nb = K + 1;  // K segments + the out-of-range bucket
  cmp_t* bnd = reinterpret_cast<cmp_t*>(smem);
  int* cursor = reinterpret_cast<int*>(bnd + nb);
  int* warp_counts = cursor + nb;  // [nwarps][nb]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

  for (int i = tid; i < nb; i += blockDim.x) {
    bnd[i] = static_cast<cmp_t>(bnd_g[i]);
    cursor[i] = 0;
  }
  __syncthreads();
  for (int b = tid; b < B; b += blockDim.x) atomicAdd(&cursor[bucket_of<cmp_t>(static_cast<cmp_t>(t[b]), bnd, K)], 1);
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int k = 0; k < nb; ++k) {
      const int c = cursor[k];
      cursor[k] = run;
      offsets[k] = run;  // offsets[K] = start of the out-of-range bucket = in-range count
      run += c;
    }
  }
  __syncthreads();

  const unsigned below = (1u << lane) - 1u;
  for (int base = 0; base < B; base += blockDim.x) {
    for (int i = tid; i < nwarps * nb; i += blockDim.x) warp_counts[i] = 0;
    __syncthreads();
    const int b = base + tid;
    const bool valid = b < B;
    const int s = valid ? bucket_of<cmp_t>(static_cast<cmp_t>(t[b]), bnd, K) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, s);
    const int rank = __popc(peers & below);
    if (valid && rank == 0) warp_counts[warp * nb + s] = __popc(peers);
    __syncthreads();
    for (int k = tid; k < nb; k += blockDim.x) {  // per bucket: exclusive scan over the warps
      int run = cursor[k];
      for (int w = 0; w < nwarps; ++w) {
        const int c = warp_counts[w * nb + k];
        warp_counts[w * nb + k] = run;
        run += c;
      }
      cursor[k] = run;
    }
    __syncthreads();
    if (valid) {
      const int pos = warp_counts[warp * nb + s] + rank;
      perm[pos] = b;
      inv[b] = pos;
      seg_out[b] = s;
    }
    __syncthreads();
  }
}

struct PermuteBatch {
  const char* src[kMaxTensorsPerLaunch];
  char* dst[kMaxTensorsPerLaunch];
  int64_t row_bytes[kMaxTensorsPerLaunch];
};

template <typename vec_t>
__device__ __forceinline__ void copy_row(const char* __restrict__ src, char* __restrict__ dst, int64_t n_bytes) {
  const vec_t* s = reinterpret_cast<const vec_t*>(src);
  vec_t* d = reinterpret_cast<vec_t*>(dst);
  const int64_t n = n_bytes / static_cast<int64_t>(sizeof(vec_t));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}

__global__ void __launch_bounds__(kPermuteThreads) segment_permute_kernel(
    PermuteBatch batch, const int64_t* __restrict__ index, int64_t B) {
  const int64_t j = blockIdx.x;
  const int tensor = blockIdx.y;
  const int64_t row = index[j];
  CUDA_KERNEL_ASSERT(row >= 0 && row < B);
  const int64_t rb = batch.row_bytes[tensor];
  const char* src = batch.src[tensor] + row * rb;
  char* dst = batch.dst[tensor] + j * rb;
  const uintptr_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                          static_cast<uintptr_t>(rb);
  if ((align & 15) == 0) copy_row<int4>(src, dst, rb);
  else if ((align & 3) == 0) copy_row<int>(src, dst, rb);
  else copy_row<char>(src, dst, rb);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) segment_mse_forward_kernel(
    const scalar_t* __restrict__ p, const scalar_t* __restrict__ t, const acc_t* __restrict__ w,
    const int64_t* __restrict__ seg, int64_t D, int64_t K, acc_t* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const int64_t s = seg[b];
  if (s < 0 || s >= K) return;  // out-of-range sample: belongs to no segment
  const scalar_t* pb = p + b * D;
  const scalar_t* tb = t + b * D;
  acc_t sum = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const acc_t diff = static_cast<acc_t>(pb[d]) - static_cast<acc_t>(tb[d]);
    sum += diff * diff;
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
  __shared__ acc_t partial[kReduceThreads / 32];
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) total += partial[i];
    atomicAdd(out + s, total * w[b] / static_cast<acc_t>(D));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void segment_mse_backward_kernel(
    const acc_t* __restrict__ g, const scalar_t* __restrict__ p, const scalar_t* __restrict__ t,
    const acc_t* __restrict__ w, const int64_t* __restrict__ seg, int64_t B, int64_t D, int64_t K,
    scalar_t* __restrict__ out) {
  const int64_t n = B * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / D;
    const int64_t s = seg[b];
    const acc_t coef = (s >= 0 && s < K) ? g[s] * w[b] * acc_t(2) / static_cast<acc_t>(D) : acc_t(0);
    out[i] = static_cast<scalar_t>(coef * (static_cast<acc_t>(p[i]) - static_cast<acc_t>(t[i])));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> segment_route_cuda(const at::Tensor& timesteps_in,
                                                                              const at::Tensor& boundaries_in) {
  check_route_inputs(timesteps_in, boundaries_in);
  const c10::cuda::CUDAGuard guard(timesteps_in.device());
  const auto timesteps = timesteps_in.contiguous();
  const auto boundaries = boundaries_in.contiguous();
  const int64_t B = timesteps.size(0);
  const int64_t K = boundaries.size(0) - 1;
  TORCH_CHECK(B <= INT_MAX, "segment_route: at most ", INT_MAX, " samples");
  auto opts = timesteps.options().dtype(at::kLong);
  auto segment_ids = at::empty({B}, opts);
  auto permutation = at::empty({B}, opts);
  auto inverse = at::empty({B}, opts);
  auto offsets = at::empty({K + 1}, opts);
  const int threads = static_cast<int>(std::min<int64_t>(kRouteThreads, std::max<int64_t>(32, (B + 31) / 32 * 32)));
  const int nb = static_cast<int>(K + 1);
  const size_t smem = nb * sizeof(int64_t) + nb * sizeof(int) + static_cast<size_t>(threads / 32) * nb * sizeof(int);
  auto stream = at::cuda::getCurrentCUDAStream();
  // One launch for every timestep dtype the op accepts (the kernel is templated on it).
  auto launch = [&](auto* ts) {
    using ts_t = std::remove_cv_t<std::remove_pointer_t<decltype(ts)>>;
    segment_route_kernel<ts_t><<<1, threads, smem, stream>>>(
        ts, boundaries.data_ptr<int64_t>(), static_cast<int>(B), static_cast<int>(K),
        segment_ids.data_ptr<int64_t>(), permutation.data_ptr<int64_t>(), inverse.data_ptr<int64_t>(),
        offsets.data_ptr<int64_t>());
  };
  AT_DISPATCH_SWITCH(timesteps.scalar_type(), "segment_route_cuda",
      AT_DISPATCH_CASE(at::kLong, [&] { launch(timesteps.data_ptr<scalar_t>()); })
      AT_DISPATCH_CASE(at::kInt, [&] { launch(timesteps.data_ptr<scalar_t>()); })
      AT_DISPATCH_CASE(at::kFloat, [&] { launch(timesteps.data_ptr<scalar_t>()); })
      AT_DISPATCH_CASE(at::kDouble, [&] { launch(timesteps.data_ptr<scalar_t>()); }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {segment_ids, permutation, inverse, offsets};
}

std::vector<at::Tensor> segment_permute_cuda(at::TensorList tensors_in, const at::Tensor& index_in,
                                             const at::Tensor& /*inverse: used by the backward only*/) {
  std::vector<at::Tensor> tensors;
  tensors.reserve(tensors_in.size());
  for (const auto& t : tensors_in) tensors.push_back(t.contiguous());
  check_permute_inputs(tensors, index_in);
  const c10::cuda::CUDAGuard guard(index_in.device());
  const auto index = index_in.contiguous();
  const int64_t B = index.size(0);
  TORCH_CHECK(B <= INT_MAX, "segment_permute: at most ", INT_MAX, " rows");
  std::vector<at::Tensor> outs;
  outs.reserve(tensors.size());
  for (const auto& t : tensors) outs.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  if (B == 0 || tensors.empty()) return outs;
  auto stream = at::cuda::getCurrentCUDAStream();
  // Every tensor of a launch shares the launch; more than kMaxTensorsPerLaunch take several.
  for (size_t first = 0; first < tensors.size(); first += kMaxTensorsPerLaunch) {
    PermuteBatch batch{};
    int n = 0;
    for (size_t i = first; i < tensors.size() && n < kMaxTensorsPerLaunch; ++i) {
      if (tensors[i].numel() == 0) continue;
      batch.src[n] = static_cast<const char*>(tensors[i].data_ptr());
      batch.dst[n] = static_cast<char*>(outs[i].data_ptr());
      batch.row_bytes[n] = tensors[i].numel() / B * static_cast<int64_t>(tensors[i].element_size());
      ++n;
    }
    if (n == 0) continue;
    segment_permute_kernel<<<dim3(static_cast<unsigned>(B), n), kPermuteThreads, 0, stream>>>(
        batch, index.data_ptr<int64_t>(), B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return outs;
}

at::Tensor segment_mse_forward_cuda(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& weight_in,
                                    const at::Tensor& segment_ids_in, int64_t num_segments) {
  check_mse_inputs(pred_in, target_in, weight_in, segment_ids_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const auto pred = pred_in.contiguous();
  const auto target = target_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto seg = segment_ids_in.contiguous();
  const int64_t B = pred.size(0);
  const int64_t D = B == 0 ? 0 : pred.numel() / B;
  const auto acc_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({num_segments}, pred.options().dtype(acc_dtype));
  if (B == 0 || D == 0) return out;
  TORCH_CHECK(B <= INT_MAX, "segment_mse: at most ", INT_MAX, " samples");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "segment_mse_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    segment_mse_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kReduceThreads, 0, stream>>>(
        pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), weight.data_ptr<acc_t>(), seg.data_ptr<int64_t>(), D,
        num_segments, out.data_ptr<acc_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor segment_mse_backward_cuda(const at::Tensor& grad_in, const at::Tensor& pred_in, const at::Tensor& target_in,
                                     const at::Tensor& weight_in, const at::Tensor& segment_ids_in) {
  check_mse_inputs(pred_in, target_in, weight_in, segment_ids_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const auto pred = pred_in.contiguous();
  const auto target = target_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto seg = segment_ids_in.contiguous();
  const auto acc_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto grad = grad_in.to(acc_dtype).contiguous();
  const int64_t B = pred.size(0);
  const int64_t D = B == 0 ? 0 : pred.numel() / B;
  auto out = at::empty_like(pred, at::MemoryFormat::Contiguous);
  const int64_t n = B * D;
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads,
                                           static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "segment_mse_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    segment_mse_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        grad.data_ptr<acc_t>(), pred.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), weight.data_ptr<acc_t>(),
        seg.data_ptr<int64_t>(), B, D, grad.size(0), out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace routing
}  // namespace fastdistill

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("segment_route", &fastdistill::routing::segment_route_cuda);
  m.impl("segment_permute", &fastdistill::routing::segment_permute_cuda);
  m.impl("segment_mse_forward", &fastdistill::routing::segment_mse_forward_cuda);
  m.impl("segment_mse_backward", &fastdistill::routing::segment_mse_backward_cuda);
}
