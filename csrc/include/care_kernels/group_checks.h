// Argument checks of the group ops, shared by the CPU kernels and the CUDA twins (each adds its device check).
// Every message says what was wrong and what to pass instead.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "care_kernels/group_math.h"

namespace care_kernels {
namespace group_checks {

inline group_math::Scale parse_scale(c10::string_view scale) {
  if (scale == "group") return group_math::Scale::kGroup;
  if (scale == "batch") return group_math::Scale::kBatch;
  if (scale == "none") return group_math::Scale::kNone;
  TORCH_CHECK(false, "scale must be one of 'group', 'batch', 'none', got '", std::string(scale), "'");
}

inline void check_groups(const at::Tensor& x, int64_t group_size, const char* name) {
  TORCH_CHECK(group_size >= 1, "group_size must be a positive integer (the number of generations per prompt), got ",
              group_size);
  TORCH_CHECK(x.numel() % group_size == 0, name, " has ", x.numel(),
              " elements, which is not a multiple of group_size=", group_size,
              "; pass rewards laid out group by group, [B * group_size]");
}

inline void check_float_1d(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 1, name, " must be a 1-D tensor [B * G], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64 (cast with .float()), got ", x.scalar_type());
}

inline void check_group_advantages_args(const at::Tensor& rewards, int64_t group_size, double eps) {
  check_float_1d(rewards, "rewards");
  check_groups(rewards, group_size, "rewards");
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0 (1e-4 as in TRL), got ", eps);
}

inline void check_answer_likelihood_args(const at::Tensor& ref_logprobs, const at::Tensor& answer_mask) {
  TORCH_CHECK(ref_logprobs.dim() == 2, "ref_logprobs must be a 2-D tensor [B, T], got shape ", ref_logprobs.sizes());
  TORCH_CHECK(ref_logprobs.scalar_type() == at::kFloat || ref_logprobs.scalar_type() == at::kDouble,
              "ref_logprobs must be float32 or float64 (cast with .float()), got ", ref_logprobs.scalar_type());
  TORCH_CHECK(answer_mask.scalar_type() == at::kBool, "answer_mask must be a bool tensor (pass mask.bool()), got ",
              answer_mask.scalar_type());
  TORCH_CHECK(answer_mask.sizes() == ref_logprobs.sizes(), "answer_mask must have ref_logprobs' shape ",
              ref_logprobs.sizes(), ", got ", answer_mask.sizes());
  TORCH_CHECK(answer_mask.device() == ref_logprobs.device(), "ref_logprobs and answer_mask must be on the same device, "
              "got ", ref_logprobs.device(), " and ", answer_mask.device());
}

inline void check_care_bonus_args(const at::Tensor& accuracy, const at::Tensor& likelihood, int64_t group_size) {
  check_float_1d(accuracy, "accuracy");
  check_float_1d(likelihood, "likelihood");
  TORCH_CHECK(likelihood.scalar_type() == accuracy.scalar_type(),
              "accuracy and likelihood must have the same dtype, got ", accuracy.scalar_type(), " and ",
              likelihood.scalar_type());
  TORCH_CHECK(likelihood.numel() == accuracy.numel(), "likelihood must have accuracy's shape [", accuracy.numel(),
              "], got ", likelihood.sizes());
  TORCH_CHECK(likelihood.device() == accuracy.device(), "accuracy and likelihood must be on the same device, got ",
              accuracy.device(), " and ", likelihood.device());
  check_groups(accuracy, group_size, "accuracy");
}

}  // namespace group_checks
}  // namespace care_kernels
