// Input checks shared by the native ops. Every message says what was wrong and what to pass instead.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define CK_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must be a " #d "-D tensor, got shape ", (x).sizes())
#define CK_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype " #dt ", got ", (x).scalar_type())
#define CK_CHECK_FLOATING(x)                                                                       \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||             \
                  (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kDouble,              \
              #x " must be float32, bfloat16, float16 or float64, got ", (x).scalar_type())
#define CK_CHECK_SAME_DEVICE(x, y)                                                              \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
              (x).device(), " and ", (y).device())
#define CK_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define CK_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
