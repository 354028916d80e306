// One build of the float row epilogues per x86-64 level (GCC/Clang `target` attribute on the entry points,
// whose always-inline bodies from row_math.h are compiled for that level), and the choice between them.
#include "row_epilogues.h"

#include <ATen/Version.h>

#include "row_math.h"

namespace care_kernels {
namespace row_epilogues {
namespace {

struct FloatKernels {
  float (*max)(const float*, const float*, int64_t, float);
  void (*sumexp)(const float*, const float*, int64_t, float, float, bool, double*, double*);
  void (*dlogits)(float*, const float*, int64_t, float, float, float, float, float, float, int64_t);
  const char* isa;
};

// The three entry points of one build; TARGET is empty for the baseline build.
#define CK_ROW_EPILOGUE_BUILD(NS, TARGET, ISA_NAME)                                                           \
  namespace NS {                                                                                               \
  TARGET float max(const float* x, const float* b, int64_t n, float inv_t) {                                   \
    return b ? row_math::row_max<float, true>(x, b, n, inv_t) : row_math::row_max<float, false>(x, b, n, inv_t); \
  }                                                                                                            \
  TARGET void sumexp(const float* x, const float* b, int64_t n, float inv_t, float m, bool with_s1, double* s0, \
                     double* s1) {                                                                             \
    if (b) {                                                                                                   \
      with_s1 ? row_math::row_sumexp<float, true, true>(x, b, n, inv_t, m, s0, s1)                             \
              : row_math::row_sumexp<float, true, false>(x, b, n, inv_t, m, s0, s1);                           \
    } else {                                                                                                   \
      with_s1 ? row_math::row_sumexp<float, false, true>(x, b, n, inv_t, m, s0, s1)                            \
              : row_math::row_sumexp<float, false, false>(x, b, n, inv_t, m, s0, s1);                          \
    }                                                                                                          \
  }                                                                                                            \
  TARGET void dlogits(float* x, const float* b, int64_t n, float inv_t, float lse_hi, float lse_lo, float ent,  \
                      float g_lp, float g_ent, int64_t target) {                                               \
    b ? row_math::row_dlogits<float, true>(x, b, n, inv_t, lse_hi, lse_lo, ent, g_lp, g_ent, target)           \
      : row_math::row_dlogits<float, false>(x, b, n, inv_t, lse_hi, lse_lo, ent, g_lp, g_ent, target);         \
  }                                                                                                            \
  constexpr FloatKernels kKernels{&max, &sumexp, &dlogits, ISA_NAME};                                          \
  }

CK_ROW_EPILOGUE_BUILD(baseline, , "default")
// __builtin_cpu_supports("x86-64-v3"/"x86-64-v4") needs GCC >= 12 or Clang >= 18; older compilers keep the
// baseline build only (correct everywhere, slower).
#if defined(__x86_64__) && !defined(CARE_KERNELS_NO_ISA_BUILDS) && \
    ((defined(__clang__) && __clang_major__ >= 18) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12))
#define CK_HAVE_ISA_BUILDS 1
CK_ROW_EPILOGUE_BUILD(x86_64_v3, __attribute__((target("arch=x86-64-v3"))), "avx2")
CK_ROW_EPILOGUE_BUILD(x86_64_v4, __attribute__((target("arch=x86-64-v4"))), "avx512")
#endif
#undef CK_ROW_EPILOGUE_BUILD

// ATen's capability (which honours ATEN_CPU_CAPABILITY), clamped to what this CPU can run.
const FloatKernels& pick() {
#ifdef CK_HAVE_ISA_BUILDS
  const std::string aten = at::get_cpu_capability();
  __builtin_cpu_init();
  if (aten == "AVX512" && __builtin_cpu_supports("x86-64-v4")) return x86_64_v4::kKernels;
  if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("x86-64-v3")) return x86_64_v3::kKernels;
#endif
  return baseline::kKernels;
}

const FloatKernels& kernels() {
  static const FloatKernels& chosen = pick();
  return chosen;
}

}  // namespace

std::string active_isa() { return kernels().isa; }

float row_max(const float* x, const float* b, int64_t n, float inv_t) { return kernels().max(x, b, n, inv_t); }
double row_max(const double* x, const double* b, int64_t n, double inv_t) {
  return b ? row_math::row_max<double, true>(x, b, n, inv_t) : row_math::row_max<double, false>(x, b, n, inv_t);
}

void row_sumexp(const float* x, const float* b, int64_t n, float inv_t, float m, bool with_s1, double* s0,
                double* s1) {
  kernels().sumexp(x, b, n, inv_t, m, with_s1, s0, s1);
}
void row_sumexp(const double* x, const double* b, int64_t n, double inv_t, double m, bool with_s1, double* s0,
                double* s1) {
  b ? row_math::row_sumexp<double, true, true>(x, b, n, inv_t, m, s0, s1)
    : row_math::row_sumexp<double, false, true>(x, b, n, inv_t, m, s0, s1);
}

void row_dlogits(float* x, const float* b, int64_t n, float inv_t, float lse_hi, float lse_lo, float ent,
                 float g_lp, float g_ent, int64_t target) {
  kernels().dlogits(x, b, n, inv_t, lse_hi, lse_lo, ent, g_lp, g_ent, target);
}
void row_dlogits(double* x, const double* b, int64_t n, double inv_t, double lse_hi, double lse_lo, double ent,
                 double g_lp, double g_ent, int64_t target) {
  b ? row_math::row_dlogits<double, true>(x, b, n, inv_t, lse_hi, lse_lo, ent, g_lp, g_ent, target)
    : row_math::row_dlogits<double, false>(x, b, n, inv_t, lse_hi, lse_lo, ent, g_lp, g_ent, target);
}

}  // namespace row_epilogues
}  // namespace care_kernels
