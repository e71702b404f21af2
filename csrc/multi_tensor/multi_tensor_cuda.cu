// Multi-tensor parameter ops: CUDA kernels (the `cuda` backend). Schemas and CPU kernels are in
// multi_tensor.cpp; element formulas in multi_tensor.h.
//
// One launch covers every tensor of the lists, however many (the parameters of a whole UNet):
//   * the host writes a table (one Entry per non-empty tensor: up to three data pointers, dtype
//     codes, numel and the index of the tensor's first chunk) into pinned memory and copies it to
//     the device with one async copy on the current stream;
//   * each tensor is cut into chunks of kChunk elements; a grid of at most 4 blocks per SM walks
//     the chunks grid-stride and finds a chunk's tensor by binary search over first_chunk;
//   * dtypes are read per tensor at run time (a uniform branch per block), so bf16/fp16/fp32/fp64
//     tensors mix freely in one launch without a template per dtype combination (keeps nvcc time
//     small); arithmetic is fp32, fp64 where a triple holds an fp64 tensor;
//   * each thread handles 4 consecutive elements per step, with 8/16-byte vector loads when the
//     tensor's base pointer allows it.
// moment_dot is deterministic: each chunk's block writes its fp32 block sum (fixed-shape tree) to
// partial[chunk] as fp64; the last block to finish (an integer atomic counter, no float atomics)
// adds the partials in a fixed order. The counter is zeroed by the same host-to-device copy that
// uploads the table, so a call is one copy and one kernel.
#include "multi_tensor/multi_tensor.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace fastdistill {
namespace multi_tensor {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;  // consecutive elements per thread per step
constexpr int kBlocksPerSm = 4;

struct Entry {
  const void* ptr[3];
  int64_t numel;
  int64_t first_chunk;
  int32_t dtype[3];
  int32_t vec_ok;  // every pointer of the entry is aligned for kIlp-element vector access
};

int32_t code_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "multi_tensor: unsupported dtype ", t.scalar_type());
  }
  return kAbsent;
}

int64_t elem_size(int32_t code) { return code == kF32 ? 4 : (code == kF64 ? 8 : 2); }

// ---------------------------------------------------------------- device helpers

template <typename T>
__device__ __forceinline__ T load1(const void* p, int32_t code, int64_t i) {
  switch (code) {
    case kF32: return static_cast<T>(static_cast<const float*>(p)[i]);
    case kF16: return static_cast<T>(__half2float(static_cast<const __half*>(p)[i]));
    case kBF16: return static_cast<T>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    default: return static_cast<T>(static_cast<const double*>(p)[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store1(void* p, int32_t code, int64_t i, T x) {
  switch (code) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(x); break;
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(x)); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(x)); break;
    default: static_cast<double*>(p)[i] = static_cast<double>(x); break;
  }
}

// Elements i .. i+3 (i a multiple of 4, base pointer aligned: one 8/16-byte access, two for fp64).
template <typename T>
__device__ __forceinline__ void load4(const void* p, int32_t code, int64_t i, T (&out)[kIlp]) {
  switch (code) {
    case kF32: {
      const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
      break;
    }
    case kF16: {
      const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __half*>(p) + i);
      const __half2* h = reinterpret_cast<const __half2*>(&raw);
      const float2 a = __half22float2(h[0]), b = __half22float2(h[1]);
      out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
      break;
    }
    case kBF16: {
      const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(p) + i);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
      const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
      out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
      break;
    }
    default: {
      const double2* q = reinterpret_cast<const double2*>(static_cast<const double*>(p) + i);
      const double2 a = q[0], b = q[1];
      out[0] = static_cast<T>(a.x); out[1] = static_cast<T>(a.y);
      out[2] = static_cast<T>(b.x); out[3] = static_cast<T>(b.y);
      break;
    }
  }
}

template <typename T>
__device__ __forceinline__ void store4(void* p, int32_t code, int64_t i, const T (&in)[kIlp]) {
  switch (code) {
    case kF32:
      *reinterpret_cast<float4*>(static_cast<float*>(p) + i) =
          make_float4(static_cast<float>(in[0]), static_cast<float>(in[1]), static_cast<float>(in[2]),
                      static_cast<float>(in[3]));
      break;
    case kF16: {
      uint2 raw;
      __half2* h = reinterpret_cast<__half2*>(&raw);
      h[0] = __halves2half2(__float2half_rn(static_cast<float>(in[0])), __float2half_rn(static_cast<float>(in[1])));
      h[1] = __halves2half2(__float2half_rn(static_cast<float>(in[2])), __float2half_rn(static_cast<float>(in[3])));
      *reinterpret_cast<uint2*>(static_cast<__half*>(p) + i) = raw;
      break;
    }
    case kBF16: {
      uint2 raw;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
      h[0] = __halves2bfloat162(__float2bfloat16_rn(static_cast<float>(in[0])),
                                __float2bfloat16_rn(static_cast<float>(in[1])));
      h[1] = __halves2bfloat162(__float2bfloat16_rn(static_cast<float>(in[2])),
                                __float2bfloat16_rn(static_cast<float>(in[3])));
      *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(p) + i) = raw;
      break;
    }
    default: {
      double2* q = reinterpret_cast<double2*>(static_cast<double*>(p) + i);
      q[0] = make_double2(static_cast<double>(in[0]), static_cast<double>(in[1]));
      q[1] = make_double2(static_cast<double>(in[2]), static_cast<double>(in[3]));
      break;
    }
  }
}

// Loads elements i .. i+n-1 (n <= 4) of a tensor, vectorised when possible; unused lanes get 0.
template <typename T>
__device__ __forceinline__ void load_group(const void* p, int32_t code, int64_t i, int n, bool vec,
                                           T (&out)[kIlp]) {
  if (vec && n == kIlp) {
    load4<T>(p, code, i, out);
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k) out[k] = k < n ? load1<T>(p, code, i + k) : T(0);
  }
}

template <typename T>
__device__ __forceinline__ void store_group(void* p, int32_t code, int64_t i, int n, bool vec, const T (&in)[kIlp]) {
  if (vec && n == kIlp) {
    store4<T>(p, code, i, in);
  } else {
#pragma unroll
    for (int k = 0; k < kIlp; ++k)
      if (k < n) store1<T>(p, code, i + k, in[k]);
  }
}

// Index of the entry holding global chunk c: the last entry with first_chunk <= c.
__device__ __forceinline__ int find_entry(const Entry* table, int n_entries, int64_t c) {
  int lo = 0, hi = n_entries - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid].first_chunk <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Fixed-shape block sum (warp shuffles, then one warp over the warp sums): deterministic.
template <typename T>
__device__ T block_sum(T x, T* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : T(0);
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;  // valid in thread 0
}

// ---------------------------------------------------------------- kernels

template <typename T>
__device__ void dot_chunk(const Entry& e, int64_t chunk, double eps, double* partial, T* shared) {
  const int64_t start = (chunk - e.first_chunk) * kChunk;
  const int64_t count = min(kChunk, e.numel - start);
  const bool has_v = e.dtype[2] != kAbsent;
  const bool vec = e.vec_ok != 0;
  const T te = static_cast<T>(eps);
  T acc = T(0);
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * kIlp; j < count; j += static_cast<int64_t>(blockDim.x) * kIlp) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kIlp), count - j));
    T a[kIlp], b[kIlp], v[kIlp];
    load_group<T>(e.ptr[0], e.dtype[0], start + j, n, vec, a);
    load_group<T>(e.ptr[1], e.dtype[1], start + j, n, vec, b);
    if (has_v) load_group<T>(e.ptr[2], e.dtype[2], start + j, n, vec, v);
#pragma unroll
    for (int k = 0; k < kIlp; ++k)
      if (k < n) acc += dot_term<T>(a[k], b[k], has_v ? v[k] : T(0), has_v, te);
  }
  const T s = block_sum<T>(acc, shared);
  if (threadIdx.x == 0) partial[chunk] = static_cast<double>(s);
}

__global__ void __launch_bounds__(kThreads) moment_dot_kernel(const Entry* table, int n_entries,
                                                              int64_t total_chunks, double eps, double* partial,
                                                              unsigned int* counter, void* out, int out_is_double) {
  __shared__ double shared_d[kThreads / 32];
  __shared__ float shared_f[kThreads / 32];
  __shared__ bool is_last;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const Entry& e = table[find_entry(table, n_entries, c)];
    const bool wide = e.dtype[0] == kF64 || e.dtype[1] == kF64 || e.dtype[2] == kF64;
    if (wide) dot_chunk<double>(e, c, eps, partial, shared_d);
    else dot_chunk<float>(e, c, eps, partial, shared_f);
  }
  // Last block done adds the partials in a fixed order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < total_chunks; c += blockDim.x) acc += __ldcg(partial + c);
  const double total = block_sum<double>(acc, shared_d);
  if (threadIdx.x == 0) {
    if (out_is_double) *static_cast<double*>(out) = total;
    else *static_cast<float*>(out) = static_cast<float>(total);
  }
}

template <typename T>
__device__ void perturb_chunk(const Entry& e, int64_t chunk, double step, double eps) {
  const int64_t start = (chunk - e.first_chunk) * kChunk;
  const int64_t count = min(kChunk, e.numel - start);
  const bool has_v = e.dtype[2] != kAbsent;
  const bool vec = e.vec_ok != 0;
  const T ts = static_cast<T>(step), te = static_cast<T>(eps);
  void* pp = const_cast<void*>(e.ptr[0]);
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * kIlp; j < count; j += static_cast<int64_t>(blockDim.x) * kIlp) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kIlp), count - j));
    T p[kIlp], g[kIlp], v[kIlp];
    load_group<T>(pp, e.dtype[0], start + j, n, vec, p);
    load_group<T>(e.ptr[1], e.dtype[1], start + j, n, vec, g);
    if (has_v) load_group<T>(e.ptr[2], e.dtype[2], start + j, n, vec, v);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) p[k] = perturb<T>(p[k], g[k], has_v ? v[k] : T(0), has_v, ts, te);
    store_group<T>(pp, e.dtype[0], start + j, n, vec, p);
  }
}

__global__ void __launch_bounds__(kThreads) perturb_kernel(const Entry* table, int n_entries, int64_t total_chunks,
                                                           double step, double eps) {
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const Entry& e = table[find_entry(table, n_entries, c)];
    const bool wide = e.dtype[0] == kF64 || e.dtype[1] == kF64 || e.dtype[2] == kF64;
    if (wide) perturb_chunk<double>(e, c, step, eps);
    else perturb_chunk<float>(e, c, step, eps);
  }
}

template <typename T>
__device__ void clip_chunk(const Entry& e, int64_t chunk, double bound) {
  const int64_t start = (chunk - e.first_chunk) * kChunk;
  const int64_t count = min(kChunk, e.numel - start);
  const bool vec = e.vec_ok != 0;
  const T tb = static_cast<T>(bound);
  void* pp = const_cast<void*>(e.ptr[0]);
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * kIlp; j < count; j += static_cast<int64_t>(blockDim.x) * kIlp) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kIlp), count - j));
    T p[kIlp], q[kIlp];
    load_group<T>(pp, e.dtype[0], start + j, n, vec, p);
    bool changed = false;
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      q[k] = clip<T>(p[k], tb);
      changed = changed || (k < n && q[k] != p[k]);
    }
    // Clamped values are rare after the first clip: skip the write of an unchanged group.
    if (changed) store_group<T>(pp, e.dtype[0], start + j, n, vec, q);
  }
}

__global__ void __launch_bounds__(kThreads) clip_kernel(const Entry* table, int n_entries, int64_t total_chunks,
                                                        double bound) {
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const Entry& e = table[find_entry(table, n_entries, c)];
    if (e.dtype[0] == kF64) clip_chunk<double>(e, c, bound);
    else clip_chunk<float>(e, c, bound);
  }
}

// ---------------------------------------------------------------- host side

void check_cuda_list(const char* op, const char* name, at::TensorList list, const at::Device& device) {
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    const auto st = t.scalar_type();
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but the first tensor is on ",
                device);
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
                "[", i, "] must be float32, float16, bfloat16 or float64, got ", st);
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", name, "[", i,
                "] must be non-overlapping and dense (e.g. contiguous)");
  }
}

void check_cuda_pair(const char* op, const char* name, at::TensorList ref, at::TensorList other) {
  TORCH_CHECK(ref.size() == other.size(), op, ": ", name, " has ", other.size(), " tensors but the first list has ",
              ref.size());
  for (size_t i = 0; i < ref.size(); ++i)
    TORCH_CHECK(ref[i].sizes() == other[i].sizes() && ref[i].strides() == other[i].strides(), op, ": ", name, "[",
                i, "] has shape ", other[i].sizes(), " but the first list has shape ", ref[i].sizes());
}

struct Table {
  at::Tensor device_buffer;  // entries, then (for moment_dot) the zeroed counter
  int n_entries = 0;
  int64_t total_chunks = 0;
  const Entry* entries() const { return reinterpret_cast<const Entry*>(device_buffer.data_ptr()); }
  unsigned int* counter() const {
    return reinterpret_cast<unsigned int*>(static_cast<char*>(device_buffer.data_ptr()) +
                                           static_cast<int64_t>(n_entries) * sizeof(Entry));
  }
};

Table upload_table(const at::Device& device, std::initializer_list<const std::vector<at::Tensor>*> lists) {
  const auto& first = **lists.begin();
  std::vector<Entry> entries;
  entries.reserve(first.size());
  int64_t chunks = 0;
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t n = first[i].numel();
    if (n == 0) continue;
    Entry e{};
    e.numel = n;
    e.first_chunk = chunks;
    e.vec_ok = 1;
    int slot = 0;
    for (const auto* list : lists) {
      if (list != nullptr) {
        const at::Tensor& t = (*list)[i];
        e.ptr[slot] = t.data_ptr();
        e.dtype[slot] = code_of(t);
        if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (kIlp * elem_size(e.dtype[slot])) != 0) e.vec_ok = 0;
      } else {
        e.ptr[slot] = nullptr;
        e.dtype[slot] = kAbsent;
      }
      ++slot;
    }
    for (; slot < 3; ++slot) e.dtype[slot] = kAbsent;
    entries.push_back(e);
    chunks += (n + kChunk - 1) / kChunk;
  }
  Table table;
  table.n_entries = static_cast<int>(entries.size());
  table.total_chunks = chunks;
  if (entries.empty()) return table;
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(Entry)) + 8;  // + counter (zero)
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memset(host.data_ptr(), 0, bytes);
  std::memcpy(host.data_ptr(), entries.data(), entries.size() * sizeof(Entry));
  // Async on the current stream; the caching host allocator keeps `host` alive until the copy ran.
  table.device_buffer = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  return table;
}

int grid_for(int64_t total_chunks) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(total_chunks, int64_t(sms) * kBlocksPerSm)));
}

at::Tensor moment_dot_cuda(at::TensorList a, at::TensorList b, std::optional<at::TensorList> precond, double eps) {
  TORCH_CHECK(!a.empty(), "moment_dot: the lists are empty");
  const at::Device device = a[0].device();
  c10::cuda::CUDAGuard guard(device);
  check_cuda_list("moment_dot", "grads_a", a, device);
  check_cuda_list("moment_dot", "grads_b", b, device);
  check_cuda_pair("moment_dot", "grads_b", a, b);
  const std::vector<at::Tensor> va(a.begin(), a.end()), vb(b.begin(), b.end());
  std::vector<at::Tensor> vv;
  bool wide = false;
  if (precond.has_value()) {
    check_cuda_list("moment_dot", "precond", *precond, device);
    check_cuda_pair("moment_dot", "precond", a, *precond);
    vv.assign(precond->begin(), precond->end());
  }
  for (size_t i = 0; i < va.size(); ++i)
    wide = wide || va[i].scalar_type() == at::kDouble || vb[i].scalar_type() == at::kDouble ||
           (!vv.empty() && vv[i].scalar_type() == at::kDouble);
  const auto opts = at::TensorOptions().device(device).dtype(wide ? at::kDouble : at::kFloat);
  const Table table = upload_table(device, {&va, &vb, precond.has_value() ? &vv : nullptr});
  if (table.total_chunks == 0) return at::zeros({}, opts);
  at::Tensor out = at::empty({}, opts);
  at::Tensor partial = at::empty({table.total_chunks}, at::TensorOptions().device(device).dtype(at::kDouble));
  const int grid = grid_for(table.total_chunks);
  moment_dot_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      table.entries(), table.n_entries, table.total_chunks, eps, partial.data_ptr<double>(), table.counter(),
      out.data_ptr(), wide ? 1 : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void preconditioned_perturb_cuda(at::TensorList params, at::TensorList grads, std::optional<at::TensorList> precond,
                                 double step, double eps) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  check_cuda_list("preconditioned_perturb_", "params", params, device);
  check_cuda_list("preconditioned_perturb_", "grads", grads, device);
  check_cuda_pair("preconditioned_perturb_", "grads", params, grads);
  const std::vector<at::Tensor> vp(params.begin(), params.end()), vg(grads.begin(), grads.end());
  std::vector<at::Tensor> vv;
  if (precond.has_value()) {
    check_cuda_list("preconditioned_perturb_", "precond", *precond, device);
    check_cuda_pair("preconditioned_perturb_", "precond", params, *precond);
    vv.assign(precond->begin(), precond->end());
  }
  const Table table = upload_table(device, {&vp, &vg, precond.has_value() ? &vv : nullptr});
  if (table.total_chunks == 0) return;
  perturb_kernel<<<grid_for(table.total_chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      table.entries(), table.n_entries, table.total_chunks, step, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void clip_parameters_cuda(at::TensorList params, double bound) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  check_cuda_list("clip_parameters_", "params", params, device);
  const std::vector<at::Tensor> vp(params.begin(), params.end());
  const Table table = upload_table(device, {&vp});
  if (table.total_chunks == 0) return;
  clip_kernel<<<grid_for(table.total_chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      table.entries(), table.n_entries, table.total_chunks, bound);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace multi_tensor
}  // namespace fastdistill

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("moment_dot", &fastdistill::multi_tensor::moment_dot_cuda);
  m.impl("preconditioned_perturb_", &fastdistill::multi_tensor::preconditioned_perturb_cuda);
  m.impl("clip_parameters_", &fastdistill::multi_tensor::clip_parameters_cuda);
}
