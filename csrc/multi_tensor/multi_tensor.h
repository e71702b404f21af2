// Multi-tensor parameter ops shared by the C++ CPU kernels (multi_tensor.cpp) and the CUDA kernels
// (multi_tensor_cuda.cu):
//
//   moment_dot               sum_i a_i * b_i / (sqrt(v_i) + eps) over lists of tensors (v absent: a_i * b_i)
//   preconditioned_perturb_  theta_i -= step * g_i / (sqrt(v_i) + eps) in place (v absent: step * g_i)
//   clip_parameters_         theta_i = clamp(theta_i, -bound, bound) in place
//
// Every tensor is walked as a flat span of numel elements in memory order (the Python layer makes
// sure each is non-overlapping and dense and that paired tensors have equal strides), cut into
// chunks of kChunk elements. The element formulas below are the single definition both backends use,
// written so that no fused multiply-add changes the rounding and every operation is correctly rounded
// (IEEE): the CPU and CUDA kernels agree bit for bit (and with numpy fp32).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdistill {
namespace multi_tensor {

// Elements per chunk: the unit of work of one CUDA block iteration and of one CPU task; the
// per-chunk partial sums of moment_dot are combined in chunk order, so results do not depend on
// the number of threads or blocks.
constexpr int64_t kChunk = 65536;

// Dtype codes stored in the CUDA tensor table (0 = tensor absent).
enum DtypeCode : int32_t { kAbsent = 0, kF32 = 1, kF16 = 2, kBF16 = 3, kF64 = 4 };

template <typename T>
FD_HD T fd_mul(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fmul_rn(a, b); else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename T>
FD_HD T fd_sub(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fsub_rn(a, b); else return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

template <typename T>
FD_HD T fd_add(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fadd_rn(a, b); else return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

template <typename T>
FD_HD T fd_div(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fdiv_rn(a, b); else return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

template <typename T>
FD_HD T fd_sqrt(T a) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fsqrt_rn(a); else return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// g / (sqrt(v) + eps), or g when there is no preconditioner.
template <typename T>
FD_HD T precondition(T g, T v, bool has_v, T eps) {
  return has_v ? fd_div(g, fd_add(fd_sqrt(v), eps)) : g;
}

// theta - step * (g / (sqrt(v) + eps)): the rounding order of the reference
// `theta - (g / (v.sqrt() + eps)) * step`.
template <typename T>
FD_HD T perturb(T theta, T g, T v, bool has_v, T step, T eps) {
  return fd_sub(theta, fd_mul(precondition(g, v, has_v, eps), step));
}

// (a * b) / (sqrt(v) + eps), or a * b.
template <typename T>
FD_HD T dot_term(T a, T b, T v, bool has_v, T eps) {
  const T ab = fd_mul(a, b);
  return has_v ? fd_div(ab, fd_add(fd_sqrt(v), eps)) : ab;
}

// torch.clamp semantics: NaN stays NaN (comparisons with NaN are false).
template <typename T>
FD_HD T clip(T x, T bound) {
  return x < -bound ? -bound : (x > bound ? bound : x);
}

}  // namespace multi_tensor
}  // namespace fastdistill
