// CUDA twins of the GRPO / GRPO-CARE group statistics (schemas and CPU kernels: csrc/cpu/group_ops.cpp).
// The per-group math is the CPU kernels' own (care_kernels/group_math.h), so both follow
// care_kernels/reference/group.py step for step.
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
#include <limits>

#include "care_kernels/checks.h"
#include "care_kernels/group_checks.h"
#include "care_kernels/group_math.h"

namespace care_kernels {
namespace {

constexpr int kBlock = 256;

using group_math::is_finite;
using group_math::Scale;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
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

// ---------------------------------------------------------------------------------------------------------------
// group_advantages

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
  group_math::group_advantages_of_group<T>(r + b * group_size, group_size, scale, eps,
                                           batch_std == nullptr ? T(0) : *batch_std, out + b * group_size);
}

unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kBlock - 1) / kBlock); }

at::Tensor group_advantages_cuda(const at::Tensor& rewards_in, int64_t group_size, c10::string_view scale_name,
                                 double eps) {
  group_checks::check_group_advantages_args(rewards_in, group_size, eps);
  CK_CHECK_CUDA(rewards_in);
  const Scale scale = group_checks::parse_scale(scale_name);
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
  group_checks::check_answer_likelihood_args(ref_logprobs_in, answer_mask_in);
  CK_CHECK_CUDA(ref_logprobs_in);
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
  group_math::care_bonus_of_group<T>(acc_all + b * group_size, lik_all + b * group_size, group_size, coef, cap,
                                     floor_v, margin, out + b * group_size);
}

at::Tensor care_bonus_cuda(const at::Tensor& accuracy_in, const at::Tensor& likelihood_in, int64_t group_size,
                           double coef, double likelihood_cap, double accuracy_floor, double margin) {
  group_checks::check_care_bonus_args(accuracy_in, likelihood_in, group_size);
  CK_CHECK_CUDA(accuracy_in);
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
