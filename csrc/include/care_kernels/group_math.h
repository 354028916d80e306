// Per-group GRPO / GRPO-CARE statistics, written once for the CPU kernels (csrc/cpu/group_ops.cpp, one
// at::parallel_for item per group) and the CUDA twins (csrc/cuda/group_ops.cu, one thread per group).
// They follow care_kernels/reference/group.py step for step, in the working dtype T (float32, or float64 for
// float64 inputs), with sums and the std's sqrt in double, so CPU, CUDA and the reference agree bit for bit
// up to the order of double additions.
//
// Means are taken around a pivot (the largest valid value), mean = pivot + sum(x - pivot) / n, so that a
// group of equal values has exactly that value as its mean (the reference module says why).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace care_kernels {
namespace group_math {

template <typename T>
C10_HOST_DEVICE inline bool is_finite(T x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

template <typename T>
C10_HOST_DEVICE inline bool is_nan(T x) {
  return x != x;
}

C10_HOST_DEVICE inline double sqrt_d(double x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

template <typename T>
struct PivotMean {
  int64_t count = 0;
  T mean = T(0);
};

// Count and pivoted mean of value(i), i < n, over the i for which valid(i) holds (mean 0 when none is).
template <typename T, typename Value, typename Valid>
C10_HOST_DEVICE PivotMean<T> pivot_mean(int64_t n, Value value, Valid valid) {
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
  if constexpr (std::is_same_v<T, float>) {
    // float values sum exactly in double (unless their magnitudes span more than 2^29), so this is torch's
    // float32 mean(), correctly rounded: a member equal to the mean ties with it, as in the authors' code.
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (valid(i)) sum += static_cast<double>(value(i));
    }
    out.mean = static_cast<T>(sum / static_cast<double>(out.count));
    return out;
  }
  double shifted = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (valid(i)) shifted += static_cast<double>(static_cast<T>(value(i) - pivot));
  }
  out.mean = pivot + static_cast<T>(shifted / static_cast<double>(out.count));
  return out;
}

// sqrt(sum((value - mean)^2) / (n - 1)) over the valid entries, 0 when fewer than two.
template <typename T, typename Value, typename Valid>
C10_HOST_DEVICE T bessel_std(int64_t n, Value value, Valid valid, PivotMean<T> stats) {
  if (stats.count < 2) return T(0);
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (valid(i)) {
      const T d = value(i) - stats.mean;
      ss += static_cast<double>(static_cast<T>(d * d));
    }
  }
  return static_cast<T>(sqrt_d(ss / static_cast<double>(stats.count - 1)));
}

enum class Scale : int { kGroup, kBatch, kNone };

// One group's advantages: (x - mean) / (std + eps) for scale "group", / (batch_std + eps) for "batch",
// x - mean for "none"; non-finite rewards get 0 and are left out of the statistics.
// torch: (x - x.nanmean()) / (x.std() + eps) on the finite entries of the group.
template <typename T>
C10_HOST_DEVICE void group_advantages_of_group(const T* x, int64_t group_size, Scale scale, T eps, T batch_std,
                                               float* out) {
  auto value = [x](int64_t i) { return x[i]; };
  auto valid = [x](int64_t i) { return is_finite(x[i]); };
  const PivotMean<T> stats = pivot_mean<T>(group_size, value, valid);
  T denom = T(1);
  if (scale == Scale::kGroup) denom = bessel_std<T>(group_size, value, valid, stats) + eps;
  if (scale == Scale::kBatch) denom = batch_std + eps;
  if (!(denom > T(0))) denom = T(1);  // eps == 0 and std == 0: every deviation is 0
  for (int64_t g = 0; g < group_size; ++g) {
    const T dev = valid(g) ? x[g] - stats.mean : T(0);
    out[g] = static_cast<float>(scale == Scale::kNone ? dev : dev / denom);
  }
}

// One group's CARE bonus (grpo_care.md section 5): the high-accuracy members (accuracy strictly above the
// floor and at least the group mean) whose capped likelihood reaches their mean capped likelihood minus the
// margin get coef * accuracy; everyone else 0. A member with non-finite accuracy takes no part; one with a NaN
// likelihood still counts in the mean accuracy (its likelihood is never read unless it is high-accuracy), but not
// in the baseline, and gets no bonus.
template <typename T>
C10_HOST_DEVICE void care_bonus_of_group(const T* acc, const T* lik, int64_t group_size, T coef, T cap, T floor_v,
                                         T margin, float* out) {
  auto scored = [acc](int64_t i) { return is_finite(acc[i]); };
  auto accuracy_of = [acc](int64_t i) { return acc[i]; };
  const T mean_acc = pivot_mean<T>(group_size, accuracy_of, scored).mean;
  auto high = [&](int64_t i) { return scored(i) && !is_nan(lik[i]) && acc[i] > floor_v && acc[i] >= mean_acc; };
  auto capped = [lik, cap](int64_t i) { return lik[i] > cap ? cap : lik[i]; };
  const PivotMean<T> base = pivot_mean<T>(group_size, capped, high);
  const T threshold = base.mean - margin;
  for (int64_t g = 0; g < group_size; ++g) {
    const bool bonus = base.count > 0 && high(g) && capped(g) >= threshold;
    out[g] = static_cast<float>(bonus ? coef * acc[g] : T(0));
  }
}

}  // namespace group_math
}  // namespace care_kernels
