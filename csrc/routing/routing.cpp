// Routing ops for one-to-many distillation (O2MKD): a batch whose samples carry per-sample
// timesteps is split among K students, each owning a contiguous timestep range
// [boundaries[k], boundaries[k+1]).
//
//   segment_route       bucketise + stable counting sort -> (segment_ids, permutation, inverse, offsets)
//   segment_permute     out_i[j] = tensors_i[index[j]] for any number of batch-major tensors
//   segment_mse_forward per-segment sums of weighted per-sample MSE (fp32 / fp64 accumulation)
//   segment_mse_backward its gradient with respect to pred
//
// This file holds the schemas and the C++ CPU kernels (the `cpp` backend); routing_cuda.cu holds the
// CUDA kernels. Fake kernels and autograd are registered in Python (fastdistill/ops/routing.py).
//
// Out-of-range timesteps (t < boundaries[0], t >= boundaries[K], NaN) are not an error here:
// they go to an extra bucket K placed after every segment, so offsets[K] counts the in-range
// samples. Python compares offsets[K] with B when the offsets reach the host (one copy per step)
// and raises there; a device-side check would cost a sync per call.
#include "routing/routing.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace fastdistill {
namespace routing {

void check_route_inputs(const at::Tensor& timesteps, const at::Tensor& boundaries) {
  TORCH_CHECK(timesteps.dim() == 1, "segment_route: timesteps must be 1-D, got shape ", timesteps.sizes());
  TORCH_CHECK(boundaries.dim() == 1 && boundaries.size(0) >= 2,
              "segment_route: boundaries must be 1-D with K+1 >= 2 entries, got shape ", boundaries.sizes());
  TORCH_CHECK(boundaries.size(0) - 1 <= kMaxSegments, "segment_route: at most ", kMaxSegments,
              " segments are supported, got ", boundaries.size(0) - 1);
  TORCH_CHECK(boundaries.scalar_type() == at::kLong, "segment_route: boundaries must be int64, got ",
              boundaries.scalar_type());
  TORCH_CHECK(timesteps.device() == boundaries.device(), "segment_route: timesteps on ", timesteps.device(),
              " but boundaries on ", boundaries.device());
  const auto st = timesteps.scalar_type();
  TORCH_CHECK(st == at::kLong || st == at::kInt || st == at::kFloat || st == at::kDouble,
              "segment_route: timesteps must be int64, int32, float32 or float64, got ", st);
}

void check_permute_inputs(const std::vector<at::Tensor>& tensors, const at::Tensor& index) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "segment_permute: index must be a 1-D int64 tensor");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.dim() >= 1 && t.size(0) == index.size(0), "segment_permute: tensors[", i,
                "] must be batch-major with ", index.size(0), " rows, got shape ", t.sizes());
    TORCH_CHECK(t.device() == index.device(), "segment_permute: tensors[", i, "] on ", t.device(),
                " but index on ", index.device());
  }
}

void check_mse_inputs(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                      const at::Tensor& segment_ids) {
  TORCH_CHECK(pred.dim() >= 1, "segment_mse: pred must be batch-major");
  TORCH_CHECK(pred.sizes() == target.sizes(), "segment_mse: pred ", pred.sizes(), " and target ",
              target.sizes(), " differ in shape");
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "segment_mse: pred and target dtypes differ");
  const int64_t B = pred.size(0);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == B, "segment_mse: weight must have shape (", B, ",)");
  const auto acc = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight.scalar_type() == acc, "segment_mse: weight must be ", acc, " for ", pred.scalar_type(),
              " inputs");
  TORCH_CHECK(segment_ids.dim() == 1 && segment_ids.size(0) == B && segment_ids.scalar_type() == at::kLong,
              "segment_mse: segment_ids must be int64 of shape (", B, ",)");
}

namespace {

// ---------------------------------------------------------------------------------------------
// segment_route (CPU): bucketise by binary search, then one stable counting sort.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> segment_route_cpu(const at::Tensor& timesteps_in,
                                                                             const at::Tensor& boundaries_in) {
  check_route_inputs(timesteps_in, boundaries_in);
  const auto timesteps = timesteps_in.contiguous();
  const auto boundaries = boundaries_in.contiguous();
  const int64_t B = timesteps.size(0);
  const int64_t K = boundaries.size(0) - 1;
  auto opts = timesteps.options().dtype(at::kLong);
  auto segment_ids = at::empty({B}, opts);
  auto permutation = at::empty({B}, opts);
  auto inverse = at::empty({B}, opts);
  auto offsets = at::empty({K + 1}, opts);
  const int64_t* bnd = boundaries.data_ptr<int64_t>();
  int64_t* seg = segment_ids.data_ptr<int64_t>();

  AT_DISPATCH_SWITCH(timesteps.scalar_type(), "segment_route_cpu",
      AT_DISPATCH_CASE(at::kLong, [&] {
        const auto* t = timesteps.data_ptr<scalar_t>();
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t v = t[b];
          if (!(v >= static_cast<scalar_t>(bnd[0]) && v < static_cast<scalar_t>(bnd[K]))) {
            seg[b] = K;  // out of range (or NaN): the overflow bucket
            continue;
          }
          // Last k with bnd[k] <= v: upper_bound over the K+1 boundaries, minus one.
          seg[b] = static_cast<int64_t>(std::upper_bound(bnd, bnd + K + 1, v,
              [](scalar_t x, int64_t e) { return x < static_cast<scalar_t>(e); }) - bnd) - 1;
        }
      })
      AT_DISPATCH_CASE(at::kInt, [&] {
        const auto* t = timesteps.data_ptr<scalar_t>();
        for (int64_t b = 0; b < B; ++b) {
          const int64_t v = t[b];
          if (!(v >= bnd[0] && v < bnd[K])) { seg[b] = K; continue; }
          seg[b] = static_cast<int64_t>(std::upper_bound(bnd, bnd + K + 1, v) - bnd) - 1;
        }
      })
      AT_DISPATCH_CASE(at::kFloat, [&] {
        const auto* t = timesteps.data_ptr<scalar_t>();
        for (int64_t b = 0; b < B; ++b) {
          const double v = t[b];
          if (!(v >= static_cast<double>(bnd[0]) && v < static_cast<double>(bnd[K]))) { seg[b] = K; continue; }
          seg[b] = static_cast<int64_t>(std::upper_bound(bnd, bnd + K + 1, v,
              [](double x, int64_t e) { return x < static_cast<double>(e); }) - bnd) - 1;
        }
      })
      AT_DISPATCH_CASE(at::kDouble, [&] {
        const auto* t = timesteps.data_ptr<scalar_t>();
        for (int64_t b = 0; b < B; ++b) {
          const double v = t[b];
          if (!(v >= static_cast<double>(bnd[0]) && v < static_cast<double>(bnd[K]))) { seg[b] = K; continue; }
          seg[b] = static_cast<int64_t>(std::upper_bound(bnd, bnd + K + 1, v,
              [](double x, int64_t e) { return x < static_cast<double>(e); }) - bnd) - 1;
        }
      }));

  // Stable counting sort over K+1 buckets (the last one holds out-of-range samples).
  std::vector<int64_t> cursor(K + 2, 0);
  for (int64_t b = 0; b < B; ++b) cursor[seg[b] + 1]++;
  for (int64_t k = 0; k <= K; ++k) cursor[k + 1] += cursor[k];
  int64_t* off = offsets.data_ptr<int64_t>();
  // cursor[k] is now the start of bucket k; offsets[K] (the start of the overflow bucket) is the
  // number of in-range samples.
  for (int64_t k = 0; k <= K; ++k) off[k] = cursor[k];
  int64_t* perm = permutation.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pos = cursor[seg[b]]++;
    perm[pos] = b;
    inv[b] = pos;
  }
  return {segment_ids, permutation, inverse, offsets};
}

// ---------------------------------------------------------------------------------------------
// segment_permute (CPU): row gather of raw bytes, so one kernel serves every dtype.
std::vector<at::Tensor> segment_permute_cpu(at::TensorList tensors_in, const at::Tensor& index_in,
                                            const at::Tensor& /*inverse: used by the backward only*/) {
  std::vector<at::Tensor> tensors(tensors_in.begin(), tensors_in.end());
  check_permute_inputs(tensors, index_in);
  const auto index = index_in.contiguous();
  const int64_t B = index.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t j = 0; j < B; ++j) {
    TORCH_CHECK(idx[j] >= 0 && idx[j] < B, "segment_permute: index[", j, "] = ", idx[j], " is out of range");
  }
  std::vector<at::Tensor> outs;
  outs.reserve(tensors.size());
  for (const auto& t_in : tensors) {
    const auto t = t_in.contiguous();
    auto out = at::empty_like(t, at::MemoryFormat::Contiguous);
    const int64_t row_bytes = B == 0 ? 0 : t.numel() / B * static_cast<int64_t>(t.element_size());
    const char* src = static_cast<const char*>(t.data_ptr());
    char* dst = static_cast<char*>(out.data_ptr());
    at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) std::memcpy(dst + j * row_bytes, src + idx[j] * row_bytes, row_bytes);
    });
    outs.push_back(out);
  }
  return outs;
}

// ---------------------------------------------------------------------------------------------
// segment_mse (CPU). Per-sample sums are formed first, then added into their segments in batch
// order, so the result is deterministic.
at::Tensor segment_mse_forward_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& weight_in,
                                   const at::Tensor& segment_ids_in, int64_t num_segments) {
  check_mse_inputs(pred_in, target_in, weight_in, segment_ids_in);
  const auto pred = pred_in.contiguous();
  const auto target = target_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto seg = segment_ids_in.contiguous();
  const int64_t B = pred.size(0);
  const int64_t D = B == 0 ? 0 : pred.numel() / B;
  const auto acc_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({num_segments}, pred.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "segment_mse_forward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // float for half/bf16/float, double for double
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    const acc_t* w = weight.data_ptr<acc_t>();
    const int64_t* s = seg.data_ptr<int64_t>();
    std::vector<acc_t> per_sample(B, acc_t(0));
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        acc_t sum = 0;
        const scalar_t* pb = p + b * D;
        const scalar_t* tb = t + b * D;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t diff = static_cast<acc_t>(pb[d]) - static_cast<acc_t>(tb[d]);
          sum += diff * diff;
        }
        per_sample[b] = D == 0 ? acc_t(0) : sum * w[b] / static_cast<acc_t>(D);
      }
    });
    acc_t* o = out.data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      if (s[b] >= 0 && s[b] < num_segments) o[s[b]] += per_sample[b];
    }
  });
  return out;
}

at::Tensor segment_mse_backward_cpu(const at::Tensor& grad_in, const at::Tensor& pred_in, const at::Tensor& target_in,
                                    const at::Tensor& weight_in, const at::Tensor& segment_ids_in) {
  check_mse_inputs(pred_in, target_in, weight_in, segment_ids_in);
  const auto pred = pred_in.contiguous();
  const auto target = target_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto seg = segment_ids_in.contiguous();
  const auto acc_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto grad = grad_in.to(acc_dtype).contiguous();
  const int64_t K = grad.size(0);
  const int64_t B = pred.size(0);
  const int64_t D = B == 0 ? 0 : pred.numel() / B;
  auto out = at::empty_like(pred, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "segment_mse_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    const acc_t* w = weight.data_ptr<acc_t>();
    const acc_t* g = grad.data_ptr<acc_t>();
    const int64_t* s = seg.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        // d/dp of w * mean((p - t)^2) = 2 w (p - t) / D, times the segment's upstream gradient.
        const acc_t coef = (s[b] >= 0 && s[b] < K) ? g[s[b]] * w[b] * acc_t(2) / static_cast<acc_t>(D) : acc_t(0);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t i = b * D + d;
          o[i] = static_cast<scalar_t>(coef * (static_cast<acc_t>(p[i]) - static_cast<acc_t>(t[i])));
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace routing
}  // namespace fastdistill

TORCH_LIBRARY_FRAGMENT(fastdistill, m) {
  m.def("segment_route(Tensor timesteps, Tensor boundaries) -> (Tensor segment_ids, Tensor permutation, "
        "Tensor inverse, Tensor offsets)");
  m.def("segment_permute(Tensor[] tensors, Tensor index, Tensor inverse) -> Tensor[]");
  m.def("segment_mse_forward(Tensor pred, Tensor target, Tensor weight, Tensor segment_ids, int num_segments) "
        "-> Tensor");
  m.def("segment_mse_backward(Tensor grad_segment_sums, Tensor pred, Tensor target, Tensor weight, "
        "Tensor segment_ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("segment_route", &fastdistill::routing::segment_route_cpu);
  m.impl("segment_permute", &fastdistill::routing::segment_permute_cpu);
  m.impl("segment_mse_forward", &fastdistill::routing::segment_mse_forward_cpu);
  m.impl("segment_mse_backward", &fastdistill::routing::segment_mse_backward_cpu);
}

// The CUDA kernels register themselves in routing_cuda.cu.
