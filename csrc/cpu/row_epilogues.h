// The row epilogues of the log-prob kernels (row_math.h), compiled once per x86-64 instruction-set level and
// picked once per process, the way ATen picks its own CPU kernels:
//
//   ATEN_CPU_CAPABILITY / torch.backends.cpu.get_cpu_capability()   AVX512   AVX2     DEFAULT
//   build used (clamped to what the CPU supports)                    x86-64-v4 x86-64-v3 x86-64
//
// All three return the same bits (row_math.h says why); the choice only changes the speed. Following ATen's
// setting means `ATEN_CPU_CAPABILITY=avx2` emulates an AVX2 machine for ATen and for these kernels at once.
#pragma once

#include <cstdint>
#include <string>

namespace care_kernels {
namespace row_epilogues {

// "avx512", "avx2" or "default": the build in use.
std::string active_isa();

float row_max(const float* x, const float* b, int64_t n, float inv_t);
double row_max(const double* x, const double* b, int64_t n, double inv_t);

// s0 = sum exp(z - m), s1 = sum exp(z - m) (z - m) (left 0 unless with_s1).
void row_sumexp(const float* x, const float* b, int64_t n, float inv_t, float m, bool with_s1, double* s0,
                double* s1);
void row_sumexp(const double* x, const double* b, int64_t n, double inv_t, double m, bool with_s1, double* s0,
                double* s1);

// Overwrites the row with dlogits (row_math::row_dlogits); lse = lse_hi + lse_lo.
void row_dlogits(float* x, const float* b, int64_t n, float inv_t, float lse_hi, float lse_lo, float ent,
                 float g_lp, float g_ent, int64_t target);
void row_dlogits(double* x, const double* b, int64_t n, double inv_t, double lse_hi, double lse_lo, double ent,
                 double g_lp, double g_ent, int64_t target);

}  // namespace row_epilogues
}  // namespace care_kernels
