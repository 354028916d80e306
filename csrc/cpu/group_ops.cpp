// GRPO / GRPO-CARE group statistics on CPU (schemas + CPU kernels); the CUDA twins live in
// csrc/cuda/group_ops.cu. The per-group math is shared with them (care_kernels/group_math.h) and mirrors
// care_kernels/reference/group.py step for step; here each at::parallel_for item is a range of groups.
//
// Layout: element b * G + g is member g of group b.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "care_kernels/checks.h"
#include "care_kernels/group_checks.h"
#include "care_kernels/group_math.h"

namespace care_kernels {
namespace {

using group_math::Scale;

// Elements one thread should at least handle: below this, waking a thread pool costs more than the work.
constexpr int64_t kMinElementsPerThread = 1 << 15;

int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, elements_per_item));
}

at::Tensor group_advantages_cpu(const at::Tensor& rewards_in, int64_t group_size, c10::string_view scale_name,
                                double eps) {
  group_checks::check_group_advantages_args(rewards_in, group_size, eps);
  CK_CHECK_CPU(rewards_in);
  const Scale scale = group_checks::parse_scale(scale_name);
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
      auto valid = [r](int64_t i) { return group_math::is_finite(r[i]); };
      batch_std = group_math::bessel_std<scalar_t>(n, value, valid, group_math::pivot_mean<scalar_t>(n, value, valid));
    }
    const scalar_t eps_t = static_cast<scalar_t>(eps);
    at::parallel_for(0, groups, grain(group_size), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        group_math::group_advantages_of_group<scalar_t>(r + b * group_size, group_size, scale, eps_t, batch_std,
                                                        o + b * group_size);
      }
    });
  });
  return out;
}

// exp(mean of the masked log-probs of each row), the mean as sum / (count + 1e-6), in double.
at::Tensor answer_likelihood_cpu(const at::Tensor& ref_logprobs_in, const at::Tensor& answer_mask_in) {
  group_checks::check_answer_likelihood_args(ref_logprobs_in, answer_mask_in);
  CK_CHECK_CPU(ref_logprobs_in);
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

at::Tensor care_bonus_cpu(const at::Tensor& accuracy_in, const at::Tensor& likelihood_in, int64_t group_size,
                          double coef, double likelihood_cap, double accuracy_floor, double margin) {
  group_checks::check_care_bonus_args(accuracy_in, likelihood_in, group_size);
  CK_CHECK_CPU(accuracy_in);
  const at::Tensor accuracy = accuracy_in.contiguous();
  const at::Tensor likelihood = likelihood_in.contiguous();
  at::Tensor out = at::empty(accuracy.sizes(), accuracy.options().dtype(at::kFloat));
  const int64_t groups = accuracy.numel() / group_size;
  AT_DISPATCH_FLOATING_TYPES(accuracy.scalar_type(), "care_bonus_cpu", [&] {
    const scalar_t* acc = accuracy.data_ptr<scalar_t>();
    const scalar_t* lik = likelihood.data_ptr<scalar_t>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, groups, grain(group_size), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * group_size;
        group_math::care_bonus_of_group<scalar_t>(
            acc + first, lik + first, group_size, static_cast<scalar_t>(coef), static_cast<scalar_t>(likelihood_cap),
            static_cast<scalar_t>(accuracy_floor), static_cast<scalar_t>(margin), o + first);
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
