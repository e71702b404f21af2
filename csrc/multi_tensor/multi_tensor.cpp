// Multi-tensor parameter ops: schemas and the C++ CPU kernels (the `cpp` backend). The CUDA kernels
// are in multi_tensor_cuda.cu; fake kernels, autograd and input validation in
// fastdistill/ops/multi_tensor.py. Element formulas: multi_tensor.h.
//
// Lists may mix dtypes freely (bf16 / fp16 / fp32 / fp64 per tensor, e.g. bf16 parameters with
// fp32 optimizer state). Arithmetic is fp32, or fp64 for any triple holding an fp64 tensor.
// moment_dot sums each chunk in fp64 and then the chunk partials in chunk order: the result does
// not depend on the thread count.
#include "multi_tensor/multi_tensor.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace fastdistill {
namespace multi_tensor {
namespace {

constexpr int64_t kSpan = 1024;  // elements converted to the compute type at a time (stack buffers)

struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t count;
};

void check_list(const char* op, const char* name, at::TensorList list) {
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
                "[", i, "] must be float32, float16, bfloat16 or float64, got ", st);
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", name, "[", i,
                "] must be non-overlapping and dense (e.g. contiguous)");
  }
}

void check_pair(const char* op, const char* name, at::TensorList ref, at::TensorList other) {
  TORCH_CHECK(ref.size() == other.size(), op, ": ", name, " has ", other.size(), " tensors but the first list has ",
              ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    TORCH_CHECK(ref[i].sizes() == other[i].sizes() && ref[i].strides() == other[i].strides(), op, ": ", name, "[",
                i, "] has shape ", other[i].sizes(), " strides ", other[i].strides(), " but the first list has shape ",
                ref[i].sizes(), " strides ", ref[i].strides());
    TORCH_CHECK(ref[i].device() == other[i].device(), op, ": ", name, "[", i, "] is on ", other[i].device(),
                " but the first list's tensor is on ", ref[i].device());
  }
}

std::vector<Chunk> make_chunks(at::TensorList list) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < list.size(); ++i) {
    const int64_t n = list[i].numel();
    for (int64_t s = 0; s < n; s += kChunk) chunks.push_back({static_cast<int64_t>(i), s, std::min(kChunk, n - s)});
  }
  return chunks;
}

bool any_double(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t != nullptr && t->scalar_type() == at::kDouble) return true;
  return false;
}

// Converts elements [off, off + n) of t's flat span to T.
template <typename T>
void load(const at::Tensor& t, int64_t off, int64_t n, T* out) {
  const void* base = t.data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: {
      const float* p = static_cast<const float*>(base) + off;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(p[i]);
      break;
    }
    case at::kHalf: {
      const c10::Half* p = static_cast<const c10::Half*>(base) + off;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(p[i]));
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(base) + off;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<float>(p[i]));
      break;
    }
    default: {
      const double* p = static_cast<const double*>(base) + off;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(p[i]);
      break;
    }
  }
}

// Writes n values of T into elements [off, off + n) of t, rounding to t's dtype (fp64 -> fp32 -> 16 bit
// for half types, the same path as the CUDA kernel).
template <typename T>
void store(const at::Tensor& t, int64_t off, int64_t n, const T* in) {
  void* base = t.data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: {
      float* p = static_cast<float*>(base) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(in[i]);
      break;
    }
    case at::kHalf: {
      c10::Half* p = static_cast<c10::Half*>(base) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::Half(static_cast<float>(in[i]));
      break;
    }
    case at::kBFloat16: {
      c10::BFloat16* p = static_cast<c10::BFloat16*>(base) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(static_cast<float>(in[i]));
      break;
    }
    default: {
      double* p = static_cast<double*>(base) + off;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<double>(in[i]);
      break;
    }
  }
}

template <typename T>
double dot_chunk(const at::Tensor& a, const at::Tensor& b, const at::Tensor* v, const Chunk& c, double eps) {
  T ba[kSpan], bb[kSpan], bv[kSpan];
  const T e = static_cast<T>(eps);
  double acc = 0.0;
  for (int64_t off = c.start; off < c.start + c.count; off += kSpan) {
    const int64_t n = std::min(kSpan, c.start + c.count - off);
    load<T>(a, off, n, ba);
    load<T>(b, off, n, bb);
    if (v != nullptr) load<T>(*v, off, n, bv);
    for (int64_t i = 0; i < n; ++i)
      acc += static_cast<double>(dot_term<T>(ba[i], bb[i], v != nullptr ? bv[i] : T(0), v != nullptr, e));
  }
  return acc;
}

at::Tensor moment_dot_cpu(at::TensorList a, at::TensorList b, std::optional<at::TensorList> precond, double eps) {
  check_list("moment_dot", "grads_a", a);
  check_list("moment_dot", "grads_b", b);
  check_pair("moment_dot", "grads_b", a, b);
  if (precond.has_value()) {
    check_list("moment_dot", "precond", *precond);
    check_pair("moment_dot", "precond", a, *precond);
  }
  bool wide = false;
  for (size_t i = 0; i < a.size(); ++i)
    wide = wide || any_double({&a[i], &b[i], precond.has_value() ? &(*precond)[i] : nullptr});
  const auto out_dtype = wide ? at::kDouble : at::kFloat;
  const auto chunks = make_chunks(a);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& c = chunks[k];
      const at::Tensor* v = precond.has_value() ? &(*precond)[c.tensor] : nullptr;
      const bool dbl = any_double({&a[c.tensor], &b[c.tensor], v});
      partial[k] = dbl ? dot_chunk<double>(a[c.tensor], b[c.tensor], v, c, eps)
                       : dot_chunk<float>(a[c.tensor], b[c.tensor], v, c, eps);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;  // chunk order: deterministic
  return at::scalar_tensor(total, at::TensorOptions().dtype(out_dtype));
}

template <typename T>
void perturb_chunk(const at::Tensor& p, const at::Tensor& g, const at::Tensor* v, const Chunk& c, double step,
                   double eps) {
  T bp[kSpan], bg[kSpan], bv[kSpan];
  const T s = static_cast<T>(step), e = static_cast<T>(eps);
  for (int64_t off = c.start; off < c.start + c.count; off += kSpan) {
    const int64_t n = std::min(kSpan, c.start + c.count - off);
    load<T>(p, off, n, bp);
    load<T>(g, off, n, bg);
    if (v != nullptr) load<T>(*v, off, n, bv);
    for (int64_t i = 0; i < n; ++i) bp[i] = perturb<T>(bp[i], bg[i], v != nullptr ? bv[i] : T(0), v != nullptr, s, e);
    store<T>(p, off, n, bp);
  }
}

void preconditioned_perturb_cpu(at::TensorList params, at::TensorList grads, std::optional<at::TensorList> precond,
                                double step, double eps) {
  check_list("preconditioned_perturb_", "params", params);
  check_list("preconditioned_perturb_", "grads", grads);
  check_pair("preconditioned_perturb_", "grads", params, grads);
  if (precond.has_value()) {
    check_list("preconditioned_perturb_", "precond", *precond);
    check_pair("preconditioned_perturb_", "precond", params, *precond);
  }
  const auto chunks = make_chunks(params);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& c = chunks[k];
      const at::Tensor* v = precond.has_value() ? &(*precond)[c.tensor] : nullptr;
      if (any_double({&params[c.tensor], &grads[c.tensor], v}))
        perturb_chunk<double>(params[c.tensor], grads[c.tensor], v, c, step, eps);
      else
        perturb_chunk<float>(params[c.tensor], grads[c.tensor], v, c, step, eps);
    }
  });
}

template <typename T>
void clip_chunk(const at::Tensor& p, const Chunk& c, double bound) {
  T bp[kSpan];
  const T b = static_cast<T>(bound);
  for (int64_t off = c.start; off < c.start + c.count; off += kSpan) {
    const int64_t n = std::min(kSpan, c.start + c.count - off);
    load<T>(p, off, n, bp);
    for (int64_t i = 0; i < n; ++i) bp[i] = clip<T>(bp[i], b);
    store<T>(p, off, n, bp);
  }
}

void clip_parameters_cpu(at::TensorList params, double bound) {
  check_list("clip_parameters_", "params", params);
  const auto chunks = make_chunks(params);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& c = chunks[k];
      if (params[c.tensor].scalar_type() == at::kDouble)
        clip_chunk<double>(params[c.tensor], c, bound);
      else
        clip_chunk<float>(params[c.tensor], c, bound);
    }
  });
}

}  // namespace
}  // namespace multi_tensor
}  // namespace fastdistill

TORCH_LIBRARY_FRAGMENT(fastdistill, m) {
  m.def("moment_dot(Tensor[] grads_a, Tensor[] grads_b, Tensor[]? precond, float eps) -> Tensor");
  m.def("preconditioned_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor[]? precond, float step, float eps) -> ()");
  m.def("clip_parameters_(Tensor(a!)[] params, float bound) -> ()");
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("moment_dot", &fastdistill::multi_tensor::moment_dot_cpu);
  m.impl("preconditioned_perturb_", &fastdistill::multi_tensor::preconditioned_perturb_cpu);
  m.impl("clip_parameters_", &fastdistill::multi_tensor::clip_parameters_cpu);
}

// The CUDA kernels register themselves in multi_tensor_cuda.cu.
