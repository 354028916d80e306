// GRPO / GRPO-CARE group statistics on CPU (schemas + CPU kernels); the CUDA twins live in
// csrc/cuda/group_ops.cu. Each op mirrors care_kernels/reference/group.py step for step, in the same
// working dtype (float32, or float64 for float64 inputs), with sums, the std's sqrt and the whole answer
// likelihood in double, so kernels and reference agree bit for bit (up to the order of double additions).
//
// Layout: element b * G + g is member g of group b. Means are taken around a pivot (the largest valid
// value of the group), mean = pivot + sum(x - pivot) / n, so that a group of equal values has exactly
// that value as its mean (see the reference module for why).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "care_kernels/checks.h"

namespace care_kernels {
namespace {

// Elements one thread should at least handle: below this, waking a thread pool costs more than the work.
constexpr int64_t kMinElementsPerThread = 1 << 15;

int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, elements_per_item));
}

template <typename T>
struct PivotMean {
  int64_t count = 0;
  T mean = T(0);
};

// Count and pivoted mean of value(i), i < n, over the i for which valid(i) holds (mean 0 when none is).
template <typename T, typename Value, typename Valid>
PivotMean<T> pivot_mean(int64_t n, Value value, Valid valid) {
  PivotMean<T> out;
  T pivot = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (valid(i)) {
      ++out.count;
      const T v = value(i);
      pivot = v > pivot ? v : pivot;
    }
  }
  if (out.count == 0) return out;
  double shifted = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (valid(i)) shifted += static_cast<double>(static_cast<T>(value(i) - pivot));
  }
  out.mean = pivot + static_cast<T>(shifted / static_cast<double>(out.count));
  return out;
}

// sqrt(sum((value - mean)^2) / (n - 1)) over the valid entries, 0 when fewer than two.
template <typename T, typename Value, typename Valid>
T bessel_std(int64_t n, Value value, Valid valid, PivotMean<T> stats) {
  if (stats.count < 2) return T(0);
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (valid(i)) {
      const T d = value(i) - stats.mean;
      ss += static_cast<double>(static_cast<T>(d * d));
    }
  }
  return static_cast<T>(std::sqrt(ss / static_cast<double>(stats.count - 1)));
}

void check_groups(const at::Tensor& x, int64_t group_size, const char* name) {
  TORCH_CHECK(group_size >= 1, "group_size must be a positive integer (the number of generations per prompt), got ",
              group_size);
  TORCH_CHECK(x.numel() % group_size == 0, name, " has ", x.numel(),
              " elements, which is not a multiple of group_size=", group_size,
              "; pass rewards laid out group by group, [B * group_size]");
}

void check_float_1d(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 1, name, " must be a 1-D tensor [B * G], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64 (cast with .float()), got ", x.scalar_type());
  CK_CHECK_CPU(x);
}

// ---------------------------------------------------------------------------------------------------------------
// group_advantages

enum class Scale { kGroup, kBatch, kNone };

Scale parse_scale(c10::string_view scale) {
  if (scale == "group") return Scale::kGroup;
  if (scale == "batch") return Scale::kBatch;
  if (scale == "none") return Scale::kNone;
  TORCH_CHECK(false, "scale must be one of 'group', 'batch', 'none', got '", std::string(scale), "'");
}

at::Tensor group_advantages_cpu(const at::Tensor& rewards_in, int64_t group_size, c10::string_view scale_name,
                                double eps) {
  check_float_1d(rewards_in, "rewards");
  check_groups(rewards_in, group_size, "rewards");
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0 (1e-4 as in TRL), got ", eps);
  const Scale scale = parse_scale(scale_name);
  const at::Tensor rewards = rewards_in.contiguous();
  at::Tensor out = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  const int64_t n = rewards.numel();
  const int64_t groups = n / group_size;
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "group_advantages_cpu", [&] {
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    float* o = out.data_ptr<float>();
    scalar_t batch_std = scalar_t(0);
    if (scale == Scale::kBatch) {
      auto value = [r](int64_t i) { return r[i]; };
      auto valid = [r](int64_t i) { return std::isfinite(r[i]); };
      batch_std = bessel_std<scalar_t>(n, value, valid, pivot_mean<scalar_t>(n, value, valid));
    }
    const scalar_t eps_t = static_cast<scalar_t>(eps);
    at::parallel_for(0, groups, grain(group_size), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* x = r + b * group_size;
        auto value = [x](int64_t i) { return x[i]; };
        auto valid = [x](int64_t i) { return std::isfinite(x[i]); };
        const auto stats = pivot_mean<scalar_t>(group_size, value, valid);
        scalar_t denom = scalar_t(1);
        if (scale == Scale::kGroup) denom = bessel_std<scalar_t>(group_size, value, valid, stats) + eps_t;
        if (scale == Scale::kBatch) denom = batch_std + eps_t;
        if (!(denom > scalar_t(0))) denom = scalar_t(1);  // eps == 0 and std == 0: every deviation is 0
        for (int64_t g = 0; g < group_size; ++g) {
          const scalar_t dev = valid(g) ? x[g] - stats.mean : scalar_t(0);
          o[b * group_size + g] = static_cast<float>(scale == Scale::kNone ? dev : dev / denom);
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// answer_likelihood

at::Tensor answer_likelihood_cpu(const at::Tensor& ref_logprobs_in, const at::Tensor& answer_mask_in) {
  TORCH_CHECK(ref_logprobs_in.dim() == 2, "ref_logprobs must be a 2-D tensor [B, T], got shape ",
              ref_logprobs_in.sizes());
  TORCH_CHECK(ref_logprobs_in.scalar_type() == at::kFloat || ref_logprobs_in.scalar_type() == at::kDouble,
              "ref_logprobs must be float32 or float64 (cast with .float()), got ", ref_logprobs_in.scalar_type());
  TORCH_CHECK(answer_mask_in.scalar_type() == at::kBool, "answer_mask must be a bool tensor (pass mask.bool()), got ",
              answer_mask_in.scalar_type());
  TORCH_CHECK(answer_mask_in.sizes() == ref_logprobs_in.sizes(), "answer_mask must have ref_logprobs' shape ",
              ref_logprobs_in.sizes(), ", got ", answer_mask_in.sizes());
  CK_CHECK_CPU(ref_logprobs_in);
  CK_CHECK_CPU(answer_mask_in);
  const at::Tensor lp = ref_logprobs_in.contiguous();
  const at::Tensor mask = answer_mask_in.contiguous();
  const int64_t rows = lp.size(0);
  const int64_t cols = lp.size(1);
  at::Tensor out = at::empty({rows}, lp.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "answer_likelihood_cpu", [&] {
    const scalar_t* x = lp.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double total = 0.0;
        int64_t count = 0;
        for (int64_t t = 0; t < cols; ++t) {
          if (m[b * cols + t]) {
            total += static_cast<double>(x[b * cols + t]);
            ++count;
          }
        }
        o[b] = static_cast<float>(std::exp(total / (static_cast<double>(count) + 1e-6)));
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// care_bonus

at::Tensor care_bonus_cpu(const at::Tensor& accuracy_in, const at::Tensor& likelihood_in, int64_t group_size,
                          double coef, double likelihood_cap, double accuracy_floor, double margin) {
  check_float_1d(accuracy_in, "accuracy");
  check_float_1d(likelihood_in, "likelihood");
  TORCH_CHECK(likelihood_in.scalar_type() == accuracy_in.scalar_type(),
              "accuracy and likelihood must have the same dtype, got ", accuracy_in.scalar_type(), " and ",
              likelihood_in.scalar_type());
  TORCH_CHECK(likelihood_in.numel() == accuracy_in.numel(), "likelihood must have accuracy's shape [",
              accuracy_in.numel(), "], got ", likelihood_in.sizes());
  check_groups(accuracy_in, group_size, "accuracy");
  const at::Tensor accuracy = accuracy_in.contiguous();
  const at::Tensor likelihood = likelihood_in.contiguous();
  at::Tensor out = at::empty(accuracy.sizes(), accuracy.options().dtype(at::kFloat));
  const int64_t groups = accuracy.numel() / group_size;
  AT_DISPATCH_FLOATING_TYPES(accuracy.scalar_type(), "care_bonus_cpu", [&] {
    const scalar_t* acc_all = accuracy.data_ptr<scalar_t>();
    const scalar_t* lik_all = likelihood.data_ptr<scalar_t>();
    float* o = out.data_ptr<float>();
    const scalar_t cap = static_cast<scalar_t>(likelihood_cap);
    const scalar_t floor_t = static_cast<scalar_t>(accuracy_floor);
    const scalar_t margin_t = static_cast<scalar_t>(margin);
    const scalar_t coef_t = static_cast<scalar_t>(coef);
    at::parallel_for(0, groups, grain(group_size), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* acc = acc_all + b * group_size;
        const scalar_t* lik = lik_all + b * group_size;
        auto present = [acc, lik](int64_t i) { return std::isfinite(acc[i]) && !std::isnan(lik[i]); };
        auto accuracy_of = [acc](int64_t i) { return acc[i]; };
        const scalar_t mean_acc = pivot_mean<scalar_t>(group_size, accuracy_of, present).mean;
        auto high = [&](int64_t i) { return present(i) && acc[i] > floor_t && acc[i] >= mean_acc; };
        auto capped = [lik, cap](int64_t i) { return lik[i] > cap ? cap : lik[i]; };
        const auto base = pivot_mean<scalar_t>(group_size, capped, high);
        const scalar_t threshold = base.mean - margin_t;
        for (int64_t g = 0; g < group_size; ++g) {
          const bool bonus = base.count > 0 && high(g) && capped(g) >= threshold;
          o[b * group_size + g] = static_cast<float>(bonus ? coef_t * acc[g] : scalar_t(0));
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace care_kernels

TORCH_LIBRARY_FRAGMENT(care_kernels, m) {
  m.def("group_advantages(Tensor rewards, int group_size, str scale, float eps) -> Tensor");
  m.def("answer_likelihood(Tensor ref_logprobs, Tensor answer_mask) -> Tensor");
  m.def(
      "care_bonus(Tensor accuracy, Tensor likelihood, int group_size, float coef, float likelihood_cap, "
      "float accuracy_floor, float margin) -> Tensor");
}

TORCH_LIBRARY_IMPL(care_kernels, CPU, m) {
  m.impl("group_advantages", &care_kernels::group_advantages_cpu);
  m.impl("answer_likelihood", &care_kernels::answer_likelihood_cpu);
  m.impl("care_bonus", &care_kernels::care_bonus_cpu);
}
