// The per-row math of the log-prob epilogues, as inline templates over the element type T (float for the
// kernels, double for the gradcheck path). x is one row of raw logits (bias not yet added), b the matching
// bias slice or nullptr, z_j = (x_j + b_j) * inv_t with inv_t = 1 / temperature.
//
// Written so that GCC vectorizes the loops, and so that the result does not depend on the vector width:
// every sum accumulates into kLanes fixed lanes (lane = column mod kLanes, 16 floats = one AVX-512 register
// or two AVX2 ones) that are folded in one fixed order, and the build never contracts a*b+c into an FMA
// (-ffp-contract=off). The scalar, AVX2 and AVX-512 builds of these loops (row_epilogues.cpp) therefore return
// the same bits, and a machine's instruction set cannot change a result.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__)
#define CK_INLINE __attribute__((always_inline)) inline
#else
#define CK_INLINE inline
#endif

namespace care_kernels {
namespace row_math {

// Lanes of every SIMD sum; a multiple of every vector width in use.
constexpr int64_t kLanes = 16;
// The float lane sums of one reduction cover at most this many columns before they are folded into a double,
// so a whole 151936-wide row sums without fp32 drift. A multiple of kLanes.
constexpr int64_t kSumChunk = 1024;

CK_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
CK_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) in fp32 to ~1 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n from bits).
// Branch-free so the loops vectorize; exp(x) = 0 for x < -87.3 (the normal range ends there).
CK_INLINE float exp_fast(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float t = xc * 1.44269504088896341f + 12582912.f;  // + 1.5 * 2^23 rounds to the nearest integer
  const float n = t - 12582912.f;
  const int32_t ni = float_to_bits(t) - 0x4B400000;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float scale = bits_to_float((ni + 127) << 23);
  return x < -87.3f ? 0.0f : y * scale;
}
CK_INLINE double exp_fast(double x) { return std::exp(x); }

template <typename T, bool kBias>
CK_INLINE T tempered(const T* x, const T* b, int64_t i, T inv_t) {
  return (kBias ? x[i] + b[i] : x[i]) * inv_t;
}

// max_j z_j. A max is exact whatever the order, so the compiler may reduce it any way it likes.
template <typename T, bool kBias>
CK_INLINE T row_max(const T* x, const T* b, int64_t n, T inv_t) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, tempered<T, kBias>(x, b, i, inv_t));
  return m;
}

// The lanes folded in a fixed order, in double.
template <typename T>
CK_INLINE double fold_lanes(const T (&lanes)[kLanes]) {
  double s = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) s += double(lanes[l]);
  return s;
}

// s0 = sum_j exp(z_j - m), s1 = sum_j exp(z_j - m) * (z_j - m) (s1 only when kS1).
template <typename T, bool kBias, bool kS1>
CK_INLINE void row_sumexp(const T* x, const T* b, int64_t n, T inv_t, T m, double* s0, double* s1) {
  double d0 = 0.0, d1 = 0.0;
  for (int64_t c = 0; c < n; c += kSumChunk) {
    const int64_t e = std::min(n, c + kSumChunk);
    T a0[kLanes] = {}, a1[kLanes] = {};
    int64_t i = c;
    for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const T d = tempered<T, kBias>(x, b, i + l, inv_t) - m;
        const T p = exp_fast(d);
        a0[l] += p;
        if (kS1) a1[l] += p * d;
      }
    }
    for (int64_t l = 0; i < e; ++i, ++l) {
      const T d = tempered<T, kBias>(x, b, i, inv_t) - m;
      const T p = exp_fast(d);
      a0[l] += p;
      if (kS1) a1[l] += p * d;
    }
    d0 += fold_lanes(a0);
    if (kS1) d1 += fold_lanes(a1);
  }
  *s0 = d0;
  *s1 = d1;
}

// x <- dz / temperature, with p_j = exp(z_j - lse) and
// dz_j = g_lp * (1[j == y] - p_j) - g_ent * p_j * (z_j - lse + entropy).
// lse = lse_hi + lse_lo (lse_lo = the part of the double logsumexp a float cannot hold): z_j - lse_hi is exact
// for the columns that carry the probability mass, so every p_j is rounded on its own, and the row's p_j still
// sum to 1 to the precision of the sums. Rounding lse to one float instead would scale a whole row's p_j by
// the same exp(error), an error that the gradient's sums over the vocabulary do not average out.
template <typename T, bool kBias>
CK_INLINE void row_dlogits(T* x, const T* b, int64_t n, T inv_t, T lse_hi, T lse_lo, T ent, T g_lp, T g_ent,
                           int64_t target) {
  const T a = g_lp * inv_t, c = g_ent * inv_t;
  T zt = 0;
  if (target >= 0 && target < n) zt = tempered<T, kBias>(x, b, target, inv_t);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T d = (tempered<T, kBias>(x, b, i, inv_t) - lse_hi) - lse_lo;
    const T p = exp_fast(d);
    x[i] = -p * (a + c * (d + ent));
  }
  if (target >= 0 && target < n) {
    // The one-hot term joins before the scaling, as in the reference (no cancellation against -p * g_lp).
    const T d = (zt - lse_hi) - lse_lo;
    const T p = exp_fast(d);
    x[target] = (g_lp * (T(1) - p) - g_ent * p * (d + ent)) * inv_t;
  }
}

}  // namespace row_math
}  // namespace care_kernels
