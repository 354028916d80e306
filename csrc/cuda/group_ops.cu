// CUDA twins of the GRPO / GRPO-CARE group statistics (schemas and CPU kernels: csrc/cpu/group_ops.cpp).
// Same arithmetic as the CPU kernels and care_kernels/reference/group.py, step for step: the working dtype
// is float32 (float64 for float64 inputs), sums, the std's sqrt and the answer likelihood are in double,
// means are taken around a pivot (the largest valid value) so a group of equal values has exactly that
// value as its mean.
//
// Groups are small (G = 2..64 generations per prompt), so one thread walks one group sequentially, in the
// CPU kernel's order. The batch std (scale="batch") and the answer likelihood (one row of T tokens) are
// block reductions. Nothing here synchronizes the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "care_kernels/checks.h"

namespace care_kernels {
namespace {

constexpr int kBlock = 256;

template <typename T>
struct PivotMean {
  int64_t count = 0;
  T mean = T(0);
};

template <typename T>
__host__ __device__ __forceinline__ T neg_inf();
template <>
__host__ __device__ __forceinline__ float neg_inf<float>() {
  return -INFINITY;
}
template <>
__host__ __device__ __forceinline__ double neg_inf<double>() {
  return -static_cast<double>(INFINITY);
}

// Count and pivoted mean of value(i), i < n, over the i for which valid(i) holds (mean 0 when none is).
template <typename T, typename Value, typename Valid>
__device__ PivotMean<T> pivot_mean(int64_t n, Value value, Valid valid) {
  PivotMean<T> out;
  T pivot = neg_inf<T>();
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
__device__ T bessel_std(int64_t n, Value value, Valid valid, PivotMean<T> stats) {
  if (stats.count < 2) return T(0);
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (valid(i)) {
      const T d = value(i) - stats.mean;
      ss += static_cast<double>(static_cast<T>(d * d));
    }
  }
  return static_cast<T>(sqrt(ss / static_cast<double>(stats.count - 1)));
}

// Block-wide reduction of one value per thread (blockDim.x == kBlock); every thread gets the result.
template <typename V, typename Op>
__device__ V block_reduce(V v, Op op, V* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  const V result = shared[0];
  __syncthreads();
  return result;
}

struct MaxOp {
  template <typename V>
  __device__ V operator()(V a, V b) const {
    return a > b ? a : b;
  }
};
struct SumOp {
  template <typename V>
  __device__ V operator()(V a, V b) const {
    return a + b;
  }
};

template <typename T>
__device__ __forceinline__ bool is_finite(T x) {
  return isfinite(x);
}

// ---------------------------------------------------------------------------------------------------------------
// group_advantages

enum class Scale : int { kGroup, kBatch, kNone };

Scale parse_scale(c10::string_view scale) {
  if (scale == "group") return Scale::kGroup;
  if (scale == "batch") return Scale::kBatch;
  if (scale == "none") return Scale::kNone;
  TORCH_CHECK(false, "scale must be one of 'group', 'batch', 'none', got '", std::string(scale), "'");
}

// One block: the Bessel std of the finite entries of r[0..n) around their pivoted mean, into *out.
template <typename T>
__global__ void batch_std_kernel(const T* __restrict__ r, int64_t n, T* __restrict__ out) {
  __shared__ double shared_d[kBlock];
  __shared__ T shared_t[kBlock];
  __shared__ long long shared_i[kBlock];
  T local_max = neg_inf<T>();
  long long local_count = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) {
    if (is_finite(r[i])) {
      local_max = r[i] > local_max ? r[i] : local_max;
      ++local_count;
    }
  }
  const T pivot = block_reduce(local_max, MaxOp(), shared_t);
  const long long count = block_reduce(local_count, SumOp(), shared_i);
  if (count < 2) {
    if (threadIdx.x == 0) *out = T(0);
    return;
  }
  double local_shift = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) {
    if (is_finite(r[i])) local_shift += static_cast<double>(static_cast<T>(r[i] - pivot));
  }
  const double shift = block_reduce(local_shift, SumOp(), shared_d);
  const T mean = pivot + static_cast<T>(shift / static_cast<double>(count));
  double local_ss = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) {
    if (is_finite(r[i])) {
      const T d = r[i] - mean;
      local_ss += static_cast<double>(static_cast<T>(d * d));
    }
  }
  const double ss = block_reduce(local_ss, SumOp(), shared_d);
  if (threadIdx.x == 0) *out = static_cast<T>(sqrt(ss / static_cast<double>(count - 1)));
}

template <typename T>
__global__ void group_advantages_kernel(const T* __restrict__ r, int64_t groups, int64_t group_size, Scale scale,
                                        T eps, const T* __restrict__ batch_std, float* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= groups) return;
  const T* x = r + b * group_size;
  auto value = [x](int64_t i) { return x[i]; };
  auto valid = [x](int64_t i) { return is_finite(x[i]); };
  const PivotMean<T> stats = pivot_mean<T>(group_size, value, valid);
  T denom = T(1);
  if (scale == Scale::kGroup) denom = bessel_std<T>(group_size, value, valid, stats) + eps;
  if (scale == Scale::kBatch) denom = *batch_std + eps;
  if (!(denom > T(0))) denom = T(1);  // eps == 0 and std == 0: every deviation is 0
  for (int64_t g = 0; g < group_size; ++g) {
    const T dev = valid(g) ? x[g] - stats.mean : T(0);
    out[b * group_size + g] = static_cast<float>(scale == Scale::kNone ? dev : dev / denom);
  }
}

void check_float_1d_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 1, name, " must be a 1-D tensor [B * G], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64 (cast with .float()), got ", x.scalar_type());
  CK_CHECK_CUDA(x);
}

void check_groups(const at::Tensor& x, int64_t group_size, const char* name) {
  TORCH_CHECK(group_size >= 1, "group_size must be a positive integer (the number of generations per prompt), got ",
              group_size);
  TORCH_CHECK(x.numel() % group_size == 0, name, " has ", x.numel(),
              " elements, which is not a multiple of group_size=", group_size,
              "; pass rewards laid out group by group, [B * group_size]");
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kBlock - 1) / kBlock); }

at::Tensor group_advantages_cuda(const at::Tensor& rewards_in, int64_t group_size, c10::string_view scale_name,
                                 double eps) {
  check_float_1d_cuda(rewards_in, "rewards");
  check_groups(rewards_in, group_size, "rewards");
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0 (1e-4 as in TRL), got ", eps);
  const Scale scale = parse_scale(scale_name);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor rewards = rewards_in.contiguous();
  at::Tensor out = at::empty(rewards.sizes(), rewards.options().dtype(at::kFloat));
  const int64_t n = rewards.numel();
  const int64_t groups = n / group_size;
  if (groups == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "group_advantages_cuda", [&] {
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    at::Tensor batch_std;
    const scalar_t* batch_std_ptr = nullptr;
    if (scale == Scale::kBatch) {
      batch_std = at::empty({1}, rewards.options());
      batch_std_kernel<scalar_t><<<1, kBlock, 0, stream>>>(r, n, batch_std.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      batch_std_ptr = batch_std.data_ptr<scalar_t>();
    }
    group_advantages_kernel<scalar_t><<<blocks_for(groups), kBlock, 0, stream>>>(
        r, groups, group_size, scale, static_cast<scalar_t>(eps), batch_std_ptr, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// answer_likelihood: one block per row

template <typename T>
__global__ void answer_likelihood_kernel(const T* __restrict__ lp, const bool* __restrict__ mask, int64_t cols,
                                         float* __restrict__ out) {
  __shared__ double shared_d[kBlock];
  const int64_t row = blockIdx.x;
  const T* x = lp + row * cols;
  const bool* m = mask + row * cols;
  double total = 0.0;
  double count = 0.0;
  for (int64_t t = threadIdx.x; t < cols; t += kBlock) {
    if (m[t]) {
      total += static_cast<double>(x[t]);
      count += 1.0;
    }
  }
  total = block_reduce(total, SumOp(), shared_d);
  count = block_reduce(count, SumOp(), shared_d);
  if (threadIdx.x == 0) out[row] = static_cast<float>(exp(total / (count + 1e-6)));
}

at::Tensor answer_likelihood_cuda(const at::Tensor& ref_logprobs_in, const at::Tensor& answer_mask_in) {
  TORCH_CHECK(ref_logprobs_in.dim() == 2, "ref_logprobs must be a 2-D tensor [B, T], got shape ",
              ref_logprobs_in.sizes());
  TORCH_CHECK(ref_logprobs_in.scalar_type() == at::kFloat || ref_logprobs_in.scalar_type() == at::kDouble,
              "ref_logprobs must be float32 or float64 (cast with .float()), got ", ref_logprobs_in.scalar_type());
  TORCH_CHECK(answer_mask_in.scalar_type() == at::kBool, "answer_mask must be a bool tensor (pass mask.bool()), got ",
              answer_mask_in.scalar_type());
  TORCH_CHECK(answer_mask_in.sizes() == ref_logprobs_in.sizes(), "answer_mask must have ref_logprobs' shape ",
              ref_logprobs_in.sizes(), ", got ", answer_mask_in.sizes());
  CK_CHECK_CUDA(ref_logprobs_in);
  CK_CHECK_SAME_DEVICE(ref_logprobs_in, answer_mask_in);
  const c10::cuda::CUDAGuard guard(ref_logprobs_in.device());
  const at::Tensor lp = ref_logprobs_in.contiguous();
  const at::Tensor mask = answer_mask_in.contiguous();
  const int64_t rows = lp.size(0);
  at::Tensor out = at::empty({rows}, lp.options().dtype(at::kFloat));
  if (rows == 0) return out;
  TORCH_CHECK(rows <= 2147483647LL, "ref_logprobs has ", rows, " rows; pass at most 2^31 - 1 per call");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "answer_likelihood_cuda", [&] {
    answer_likelihood_kernel<scalar_t><<<static_cast<unsigned int>(rows), kBlock, 0, stream>>>(
        lp.data_ptr<scalar_t>(), mask.data_ptr<bool>(), lp.size(1), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// care_bonus: one thread per group

template <typename T>
__global__ void care_bonus_kernel(const T* __restrict__ acc_all, const T* __restrict__ lik_all, int64_t groups,
                                  int64_t group_size, T coef, T cap, T floor_v, T margin, float* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= groups) return;
  const T* acc = acc_all + b * group_size;
  const T* lik = lik_all + b * group_size;
  auto present = [acc, lik](int64_t i) { return is_finite(acc[i]) && !isnan(lik[i]); };
  auto accuracy_of = [acc](int64_t i) { return acc[i]; };
  const T mean_acc = pivot_mean<T>(group_size, accuracy_of, present).mean;
  auto high = [&](int64_t i) { return present(i) && acc[i] > floor_v && acc[i] >= mean_acc; };
  auto capped = [lik, cap](int64_t i) { return lik[i] > cap ? cap : lik[i]; };
  const PivotMean<T> base = pivot_mean<T>(group_size, capped, high);
  const T threshold = base.mean - margin;
  for (int64_t g = 0; g < group_size; ++g) {
    const bool bonus = base.count > 0 && high(g) && capped(g) >= threshold;
    out[b * group_size + g] = static_cast<float>(bonus ? coef * acc[g] : T(0));
  }
}

at::Tensor care_bonus_cuda(const at::Tensor& accuracy_in, const at::Tensor& likelihood_in, int64_t group_size,
                           double coef, double likelihood_cap, double accuracy_floor, double margin) {
  check_float_1d_cuda(accuracy_in, "accuracy");
  check_float_1d_cuda(likelihood_in, "likelihood");
  CK_CHECK_SAME_DEVICE(accuracy_in, likelihood_in);
  TORCH_CHECK(likelihood_in.scalar_type() == accuracy_in.scalar_type(),
              "accuracy and likelihood must have the same dtype, got ", accuracy_in.scalar_type(), " and ",
              likelihood_in.scalar_type());
  TORCH_CHECK(likelihood_in.numel() == accuracy_in.numel(), "likelihood must have accuracy's shape [",
              accuracy_in.numel(), "], got ", likelihood_in.sizes());
  check_groups(accuracy_in, group_size, "accuracy");
  const c10::cuda::CUDAGuard guard(accuracy_in.device());
  const at::Tensor accuracy = accuracy_in.contiguous();
  const at::Tensor likelihood = likelihood_in.contiguous();
  at::Tensor out = at::empty(accuracy.sizes(), accuracy.options().dtype(at::kFloat));
  const int64_t groups = accuracy.numel() / group_size;
  if (groups == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(accuracy.scalar_type(), "care_bonus_cuda", [&] {
    care_bonus_kernel<scalar_t><<<blocks_for(groups), kBlock, 0, stream>>>(
        accuracy.data_ptr<scalar_t>(), likelihood.data_ptr<scalar_t>(), groups, group_size,
        static_cast<scalar_t>(coef), static_cast<scalar_t>(likelihood_cap), static_cast<scalar_t>(accuracy_floor),
        static_cast<scalar_t>(margin), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace care_kernels

TORCH_LIBRARY_IMPL(care_kernels, CUDA, m) {
  m.impl("group_advantages", &care_kernels::group_advantages_cuda);
  m.impl("answer_likelihood", &care_kernels::answer_likelihood_cuda);
  m.impl("care_bonus", &care_kernels::care_bonus_cuda);
}
