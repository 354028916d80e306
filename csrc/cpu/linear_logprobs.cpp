// Per-token log-probabilities (and entropy) straight from hidden states and an LM-head weight, on the CPU,
// blocked over tokens and vocabulary so that the [N, V] logits never exist.
//
//   z        = (hidden @ weight.T + bias).float() / temperature          [N, V], only ever one tile of it
//   lse      = logsumexp(z, -1)                                          [N]   (float64: see row_math.h)
//   logprobs = z.gather(-1, targets[:, None])[:, 0] - lse                 [N]   (0 where targets == ignore_index)
//   entropy  = lse - (softmax(z) * z).sum(-1)                             [N]   (0 where ignored)
//
// The vocabulary is cut into one contiguous column range per thread (VocabSplit). A range runs tile by tile
// (at most kBlockVocab columns), and for every token tile one GEMM through ATen (BLAS, single-threaded inside
// the OpenMP region) fills the range's own tile buffer, then the SIMD row epilogues (row_epilogues.h) fold the
// tile into the range's per-row online statistics (max m, s0 = sum exp(z - m), s1 = sum exp(z - m) (z - m),
// target logit); the ranges' statistics are merged in range order at the end. The dual variant scores a
// reference head in the same loop. Backward recomputes each tile, overwrites it with dlogits and feeds it to
// two more GEMMs: dW_tile += dlogits.T @ h (one writer per tile) and dH_range += dlogits @ W_tile, into a dH
// partial per range that is added to dH in range order. Every sum therefore runs in an order fixed by the
// inputs and the thread count alone: the same inputs and thread count give the same bits, whatever the
// threads' timing. Workspace: O(N) statistics and one tile per thread, plus (backward, threads > 1) one
// [rows, H] fp32 partial per extra thread: at most kPartialDhBytes in all (more rows run in several passes),
// but never fewer than kBlockRows rows each ((threads - 1) * kBlockRows * H * 4 bytes).
//
// Ops (schemas at the bottom):
//   linear_logprobs_fwd_cpu, linear_logprobs_bwd_cpu   the blocked op and its backward
//   logits_stats_cpu, logits_grad_cpu_                 the same epilogues on a caller-held fp32 logits block
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "care_kernels/checks.h"
#include "row_epilogues.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace care_kernels {
namespace linear_logprobs {

using at::Tensor;
using row_epilogues::row_dlogits;
using row_epilogues::row_max;
using row_epilogues::row_sumexp;

// Tile sizes. A single-threaded [kBlockRows, H] x [H, kBlockVocab] GEMM (and the two dlogits GEMMs of the
// same tile) runs at the per-core BLAS peak (measured ~90 GFLOP/s on AMD EPYC at H = 896, as fast as one
// unblocked [2048, 896] x [896, 151936] matmul), the 2 MiB fp32 tile stays in L2/L3 for its epilogue, and
// one tile row (4 KiB) in L1 across the epilogue's two passes.
constexpr int64_t kBlockRows = 512;
constexpr int64_t kBlockVocab = 1024;
// Column ranges start at multiples of this (cache lines, whole SIMD lanes).
constexpr int64_t kRangeAlign = 16;
// The backward's dH partials of the ranges after the first (which adds into dH itself) take at most this many
// bytes (but at least kBlockRows rows each); beyond it the rows run in several passes over the vocabulary.
// CARE_KERNELS_CPU_PARTIAL_DH_BYTES overrides it (tests force several passes with a small value).
constexpr int64_t kPartialDhBytes = int64_t(256) << 20;

int64_t partial_dh_bytes() {
  if (const char* env = std::getenv("CARE_KERNELS_CPU_PARTIAL_DH_BYTES")) {
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && value > 0) return value;
  }
  return kPartialDhBytes;
}

// ---------------------------------------------------------------------------------------------------------
// Online per-row statistics over vocabulary tiles.

template <typename T>
struct RowStats {
  T max = -std::numeric_limits<T>::infinity();
  double s0 = 0.0;  // sum exp(z - max)
  double s1 = 0.0;  // sum exp(z - max) * (z - max)
  T target = 0;     // z at the target column (0 until the tile holding it is folded)
};

// Combines the statistics of two disjoint column sets of one row.
template <typename T>
inline void merge_stats(RowStats<T>& into, const RowStats<T>& other) {
  into.target += other.target;
  if (other.s0 == 0.0) return;  // (a NaN sum is not empty: it propagates)
  if (into.s0 == 0.0) {
    into.max = other.max, into.s0 = other.s0, into.s1 = other.s1;
    return;
  }
  // Shift both to the common max m: exp(z - m) = exp(z - max) * exp(max - m), z - m = (z - max) + (max - m).
  const T m = std::max(into.max, other.max);
  const double da = double(into.max) - double(m), db = double(other.max) - double(m);
  const double ea = std::exp(da), eb = std::exp(db);
  into.s1 = ea * (into.s1 + into.s0 * da) + eb * (other.s1 + other.s0 * db);
  into.s0 = ea * into.s0 + eb * other.s0;
  into.max = m;
}

// Folds one tile row (columns [c0, c0 + n)) into st.
template <typename T>
inline void fold_row(RowStats<T>& st, const T* x, const T* b, int64_t n, T inv_t, int64_t c0, int64_t target,
                     bool with_s1) {
  RowStats<T> tile;
  tile.max = row_max(x, b, n, inv_t);
  row_sumexp(x, b, n, inv_t, tile.max, with_s1, &tile.s0, &tile.s1);
  const int64_t local = target - c0;
  if (local >= 0 && local < n) tile.target = (b ? x[local] + b[local] : x[local]) * inv_t;
  merge_stats(st, tile);
}

template <typename T>
struct RowResult {
  T logprob, entropy;
  double lse;
};

template <typename T>
inline RowResult<T> finish_row(const RowStats<T>& st, bool valid, bool with_entropy, double log_v) {
  const double log_s0 = std::log(st.s0);
  const double lse = double(st.max) + log_s0;
  RowResult<T> r{T(0), T(0), lse};
  if (!valid) return r;
  r.logprob = T(std::min(double(st.target) - lse, 0.0));
  // entropy = lse - E_p[z] = log s0 - s1 / s0, cancellation-free since s1 is taken relative to the max;
  // clamped to its true range [0, log V].
  if (with_entropy) r.entropy = T(std::min(std::max(log_s0 - st.s1 / st.s0, 0.0), log_v));
  return r;
}

// The float pair (hi, lo) with hi + lo = lse to ~2^-48 relative, for row_dlogits.
template <typename T>
struct SplitLse {
  T hi, lo;
  explicit SplitLse(double lse) : hi(T(lse)), lo(T(lse - double(T(lse)))) {}
};

// Rows of a [rows, cols] tile go to the OpenMP threads; small tiles stay on one thread.
template <typename F>
inline void for_each_row(int64_t rows, int64_t cols, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Input checks and row selection.

// which = "" for the policy head, "ref_" for the reference head (prefixes every argument name).
void check_head(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                const char* which) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), which, "hidden and ", which,
              "weight must be CPU tensors, got ", hidden.device(), " and ", weight.device());
  TORCH_CHECK(hidden.dim() == 2, which, "hidden must be a 2-D tensor [N, H], got shape ", hidden.sizes(),
              " (flatten the leading dimensions)");
  TORCH_CHECK(weight.dim() == 2, which, "weight must be a 2-D tensor [V, H], got shape ", weight.sizes());
  const at::ScalarType dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, which,
              "hidden must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, which, "weight must have the dtype of ", which, "hidden (", dt,
              "), got ", weight.scalar_type(), "; cast one of them");
  TORCH_CHECK(weight.size(1) == hidden.size(1), which, "weight must be [V, H] with H = ", which,
              "hidden.size(1) = ", hidden.size(1), ", got shape ", weight.sizes(),
              " (pass the LM-head weight as stored by nn.Linear: [vocab, hidden])");
  TORCH_CHECK(weight.size(0) >= 1, which, "weight must have at least one vocabulary row, got shape ",
              weight.sizes());
  if (bias.has_value()) {
    const Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), which, "bias must be a CPU tensor, got ", b.device());
    TORCH_CHECK(b.is_floating_point(), which, "bias must be a floating-point tensor, got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), which, "bias must be a 1-D tensor of size V = ",
                weight.size(0), ", got shape ", b.sizes());
  }
}

void check_targets(const Tensor& targets, int64_t n) {
  CK_CHECK_CPU(targets);
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must have dtype int64 (torch.long), got ",
              targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n, "targets must be a 1-D tensor of size N = ", n,
              " (one target per hidden row), got shape ", targets.sizes());
}

void check_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "temperature must be a finite number > 0, got ", temperature);
}

void check_row_vector(const Tensor& x, int64_t n, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, name, " must be a 1-D tensor of size N = ", n, ", got shape ",
              x.sizes());
  TORCH_CHECK(x.is_floating_point(), name, " must be a floating-point tensor, got ", x.scalar_type());
}

// Rows whose target is not ignore_index; checks every target is in [0, V) or ignore_index.
struct Rows {
  bool all = true;      // every row is scored: use the inputs as they are
  Tensor index;         // int64 [count] of the scored rows when !all
  int64_t count = 0;
};

Rows scored_rows(const Tensor& targets_any, int64_t ignore_index, int64_t vocab) {
  const Tensor targets = targets_any.contiguous();
  const int64_t n = targets.size(0);
  const int64_t* y = targets.data_ptr<int64_t>();
  std::vector<int64_t> keep;
  keep.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK(y[i] >= 0 && y[i] < vocab, "targets[", i, "] = ", y[i],
                " is out of range: every target must be in [0, V = ", vocab, ") or equal to ignore_index = ",
                ignore_index);
    keep.push_back(i);
  }
  Rows rows;
  rows.count = int64_t(keep.size());
  rows.all = rows.count == n;
  if (!rows.all) {
    rows.index = at::empty({rows.count}, targets.options());
    if (rows.count > 0) std::memcpy(rows.index.data_ptr<int64_t>(), keep.data(), keep.size() * sizeof(int64_t));
  }
  return rows;
}

Tensor take_rows(const Tensor& x, const Rows& rows) { return rows.all ? x : x.index_select(0, rows.index); }

// Scatters the per-scored-row values back to N rows (zeros elsewhere).
Tensor put_rows(const Tensor& x, const Rows& rows, int64_t n) {
  if (rows.all) return x;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n;
  return at::zeros(shape, x.options()).index_copy_(0, rows.index, x);
}
// ---------------------------------------------------------------------------------------------------------
// Work distribution: one contiguous range of vocabulary columns per thread, of equal width. The thread that
// holds a range runs every GEMM and epilogue of its tiles by itself (BLAS is single-threaded inside the
// parallel region), so no thread waits on another between a GEMM and its epilogue, the tile stays in that
// core's cache, dW[tile] has a single writer, and each range sums its tiles in column order. Ranges are fixed
// by V and the thread count, never by which thread gets there first: that is what makes results reproducible.
// (The price: a core shared with other work slows its whole range; BLAS's own threading has the same trait.)

int64_t vocab_tiles(int64_t vocab) { return (vocab + kBlockVocab - 1) / kBlockVocab; }

struct VocabSplit {
  std::vector<int64_t> begin;  // range r holds columns [begin[r], begin[r + 1])

  explicit VocabSplit(int64_t vocab) {
#ifdef _OPENMP
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), vocab_tiles(vocab)));
#else
    const int64_t n = 1;
#endif
    begin.resize(n + 1);
    for (int64_t r = 0; r < n; ++r) begin[r] = (vocab * r / n) / kRangeAlign * kRangeAlign;
    begin[n] = vocab;
  }
  int64_t ranges() const { return int64_t(begin.size()) - 1; }

  // body(c0, v) for the tiles of range r, in column order.
  template <typename Body>
  void for_each_tile(int64_t r, const Body& body) const {
    for (int64_t c0 = begin[r]; c0 < begin[r + 1]; c0 += kBlockVocab) body(c0, std::min(kBlockVocab, begin[r + 1] - c0));
  }
};

// body(r) for every range r of the split, each on its own OpenMP thread (one range: on this thread, with
// BLAS free to use its own threads). Every thread dispatches its tile GEMMs below autograd: grad mode is
// thread-local, so OpenMP workers would otherwise see inputs that require grad and refuse the out= GEMMs.
template <typename Body>
void for_each_range(const VocabSplit& split, const Body& body) {
  const int64_t n = split.ranges();
  if (n <= 1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    body(0);
    return;
  }
#ifdef _OPENMP
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(int(n))
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // static, 1: range r on thread r; should OpenMP grant fewer threads, a thread takes several ranges, each
    // still summed on its own, so the bits do not change.
#pragma omp for schedule(static, 1)
    for (int64_t r = 0; r < n; ++r) {
      if (failed.load(std::memory_order_relaxed)) continue;
      try {
        body(r);
      } catch (...) {
#pragma omp critical(care_kernels_linear_logprobs_error)
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  }
  if (error) std::rethrow_exception(error);
#endif
}

// ---------------------------------------------------------------------------------------------------------
// One LM head (policy or reference) and the per-thread buffer its logits tiles are computed into.

struct Head {
  Tensor hidden;     // [n, H] scored rows, contiguous, GEMM dtype
  Tensor weight;     // [V, H] contiguous, GEMM dtype
  Tensor bias;       // [V] in the accumulation dtype, added by the row epilogues; or undefined
  Tensor tile_bias;  // [V] in the GEMM dtype when that is 16-bit, added to the tile before it is widened

  // A 16-bit head rounds as the same-dtype torch computation does, (hidden @ weight.T) rounded, then + bias
  // rounded again, so the bias goes into the tile in that dtype; an fp32 or fp64 head adds it in the epilogue.
  Head(const Tensor& h, const Tensor& w, const std::optional<Tensor>& b, at::ScalarType acc)
      : hidden(h.contiguous()), weight(w.contiguous()) {
    if (!b.has_value()) return;
    if (weight.scalar_type() == acc) {
      bias = b->to(acc).contiguous();
    } else {
      tile_bias = b->to(weight.scalar_type()).contiguous();
    }
  }
};

struct TileBuffer {
  Tensor raw;  // flat, GEMM dtype
  Tensor acc;  // flat, accumulation dtype (the same tensor when the dtypes agree)

  TileBuffer(const Head& head, at::ScalarType acc_dtype, int64_t numel)
      : raw(at::empty({numel}, head.weight.options())),
        acc(head.weight.scalar_type() == acc_dtype ? raw
                                                   : at::empty({numel}, head.weight.options().dtype(acc_dtype))) {}

  // logits[r0:r0+n, c0:c0+v] = hidden[r0:r0+n] @ weight[c0:c0+v].T (+ the tile bias) in the GEMM dtype (rounded
  // exactly as the same-dtype naive computation rounds), returned as a contiguous [n, v] in the accumulation dtype.
  Tensor logits(const Head& head, int64_t r0, int64_t n, int64_t c0, int64_t v) {
    Tensor out = raw.narrow(0, 0, n * v).view({n, v});
    at::mm_out(out, head.hidden.narrow(0, r0, n), head.weight.narrow(0, c0, v).t());
    if (head.tile_bias.defined()) out.add_(head.tile_bias.narrow(0, c0, v));
    if (acc.is_same(raw)) return out;
    return acc.narrow(0, 0, n * v).view({n, v}).copy_(out);
  }
};

template <typename T>
const T* bias_ptr(const Head& head, int64_t c0) {
  return head.bias.defined() ? head.bias.template data_ptr<T>() + c0 : nullptr;
}

int64_t tile_numel(int64_t n_rows, int64_t vocab) {
  return std::min(kBlockRows, std::max<int64_t>(n_rows, 1)) * std::min(kBlockVocab, vocab);
}


// One range's share of the forward: its tile buffers and the statistics of its columns for every row.
template <typename T>
struct ForwardRange {
  TileBuffer tile, ref_tile;
  std::vector<RowStats<T>> stats, ref_stats;
};

template <typename T>
void forward_blocked(const Head& policy, const Head* ref, const int64_t* y, double temperature, bool with_entropy,
                     T* logprobs, T* entropy, double* lse, T* ref_logprobs) {
  const int64_t n_rows = policy.hidden.size(0);
  const int64_t vocab = policy.weight.size(0);
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const T inv_t = T(1.0 / temperature);
  const int64_t numel = tile_numel(n_rows, vocab);
  const VocabSplit split(vocab);
  std::vector<std::optional<ForwardRange<T>>> ranges(split.ranges());

  for_each_range(split, [&](int64_t r) {
    std::optional<ForwardRange<T>>& st = ranges[r];
    st.emplace(ForwardRange<T>{TileBuffer(policy, acc, numel), TileBuffer(ref ? *ref : policy, acc, ref ? numel : 0),
                               std::vector<RowStats<T>>(n_rows), std::vector<RowStats<T>>(ref ? n_rows : 0)});
    split.for_each_tile(r, [&](int64_t c0, int64_t v) {
      for (int64_t r0 = 0; r0 < n_rows; r0 += kBlockRows) {
        const int64_t n = std::min(kBlockRows, n_rows - r0);
        const T* x = st->tile.logits(policy, r0, n, c0, v).template data_ptr<T>();
        const T* b = bias_ptr<T>(policy, c0);
        for (int64_t i = 0; i < n; ++i) {
          fold_row(st->stats[r0 + i], x + i * v, b, v, inv_t, c0, y[r0 + i], with_entropy);
        }
        if (ref) {
          const T* rx = st->ref_tile.logits(*ref, r0, n, c0, v).template data_ptr<T>();
          const T* rb = bias_ptr<T>(*ref, c0);
          for (int64_t i = 0; i < n; ++i) {
            fold_row(st->ref_stats[r0 + i], rx + i * v, rb, v, inv_t, c0, y[r0 + i], false);
          }
        }
      }
    });
  });

  const double log_v = std::log(double(vocab));
  at::parallel_for(0, n_rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      RowStats<T> row, ref_row;
      for (const auto& st : ranges) {  // in range order
        merge_stats(row, st->stats[i]);
        if (ref) merge_stats(ref_row, st->ref_stats[i]);
      }
      const RowResult<T> res = finish_row(row, true, with_entropy, log_v);
      logprobs[i] = res.logprob;
      entropy[i] = res.entropy;
      lse[i] = res.lse;
      if (ref) ref_logprobs[i] = finish_row(ref_row, true, false, log_v).logprob;
    }
  });
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------------------
// Ops.

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_logprobs_fwd_cpu(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& targets,
    const std::optional<Tensor>& ref_hidden, const std::optional<Tensor>& ref_weight,
    const std::optional<Tensor>& ref_bias, double temperature, int64_t ignore_index, bool with_entropy) {
  check_head(hidden, weight, bias, "");
  const int64_t n_rows = hidden.size(0);
  const int64_t vocab = weight.size(0);
  check_targets(targets, n_rows);
  check_temperature(temperature);
  const bool dual = ref_hidden.has_value() || ref_weight.has_value();
  TORCH_CHECK(ref_hidden.has_value() == ref_weight.has_value(),
              "ref_hidden and ref_weight go together: pass both (dual scoring) or neither");
  TORCH_CHECK(dual || !ref_bias.has_value(), "ref_bias was given without ref_hidden/ref_weight; pass those too");
  if (dual) {
    check_head(*ref_hidden, *ref_weight, ref_bias, "ref_");
    TORCH_CHECK(ref_hidden->size(0) == n_rows, "ref_hidden must have N = ", n_rows,
                " rows (the same tokens as hidden), got shape ", ref_hidden->sizes());
    TORCH_CHECK(ref_weight->size(0) == vocab, "ref_weight must have V = ", vocab,
                " rows (the same vocabulary as weight), got shape ", ref_weight->sizes());
  }

  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  const auto out_opts = hidden.options().dtype(acc);
  const Rows rows = scored_rows(targets, ignore_index, vocab);
  Tensor logprobs = at::empty({rows.count}, out_opts);
  Tensor entropy = at::empty({rows.count}, out_opts);
  Tensor lse = at::empty({rows.count}, out_opts.dtype(at::kDouble));
  Tensor ref_logprobs = at::empty({dual ? rows.count : 0}, out_opts);
  if (rows.count > 0) {
    const Tensor y = take_rows(targets, rows).contiguous();
    const Head policy(take_rows(hidden, rows), weight, bias, acc);
    std::optional<Head> ref;
    if (dual) ref.emplace(take_rows(*ref_hidden, rows), *ref_weight, ref_bias, acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprobs_fwd_cpu", [&] {
      forward_blocked<scalar_t>(policy, ref ? &*ref : nullptr, y.data_ptr<int64_t>(), temperature, with_entropy,
                                logprobs.data_ptr<scalar_t>(), entropy.data_ptr<scalar_t>(),
                                lse.data_ptr<double>(), dual ? ref_logprobs.data_ptr<scalar_t>() : nullptr);
    });
  }
  return {put_rows(logprobs, rows, n_rows), put_rows(entropy, rows, n_rows), put_rows(lse, rows, n_rows),
          dual ? put_rows(ref_logprobs, rows, n_rows) : ref_logprobs};
}

// One range's share of the backward: its tile buffer, its weight tile in the accumulation dtype (16-bit heads
// only), and its dH partial (ranges after the first; range 0 adds into dH itself).
struct BackwardRange {
  TileBuffer tile;
  Tensor weight_tile;  // [min(kBlockVocab, V), H] or undefined
  Tensor partial_dh;   // [rows of a pass, H] or undefined
};

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_bwd_cpu(
    const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy, const Tensor& hidden,
    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& targets, const Tensor& lse,
    const Tensor& entropy, double temperature, int64_t ignore_index, bool bias_requires_grad) {
  check_head(hidden, weight, bias, "");
  const int64_t n_rows = hidden.size(0);
  const int64_t vocab = weight.size(0);
  const int64_t h = weight.size(1);
  check_targets(targets, n_rows);
  check_temperature(temperature);
  check_row_vector(grad_logprobs, n_rows, "grad_logprobs");
  if (grad_entropy.has_value()) check_row_vector(*grad_entropy, n_rows, "grad_entropy");
  check_row_vector(lse, n_rows, "lse");
  check_row_vector(entropy, n_rows, "entropy");
  TORCH_CHECK(!bias_requires_grad || bias.has_value(), "bias_requires_grad=True needs the bias; pass it");

  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  const auto acc_opts = weight.options().dtype(acc);
  const bool same = hidden.scalar_type() == acc;
  const Rows rows = scored_rows(targets, ignore_index, vocab);
  // fp32 (fp64) accumulators; for fp32/fp64 inputs they are the returned gradients themselves.
  Tensor grad_weight = at::zeros({vocab, h}, acc_opts);
  Tensor grad_bias = bias_requires_grad ? at::zeros({vocab}, acc_opts) : at::empty({0}, weight.options());
  Tensor grad_hidden_rows = at::zeros({rows.count, h}, hidden.options().dtype(acc));

  if (rows.count > 0) {
    const Head policy(take_rows(hidden, rows), weight, bias, acc);
    const Tensor y = take_rows(targets, rows).contiguous();
    const Tensor g_lp = take_rows(grad_logprobs, rows).to(acc).contiguous();
    const Tensor g_ent = grad_entropy.has_value() ? take_rows(*grad_entropy, rows).to(acc).contiguous()
                                                  : at::zeros({rows.count}, hidden.options().dtype(acc));
    const Tensor row_lse = take_rows(lse, rows).to(at::kDouble).contiguous();
    const Tensor row_ent = take_rows(entropy, rows).to(acc).contiguous();
    // The dlogits GEMMs run in the accumulation dtype: dz stays fp32 and so does every sum.
    const Tensor hidden_acc = same ? policy.hidden : policy.hidden.to(acc);
    const int64_t numel = tile_numel(rows.count, vocab);
    const VocabSplit split(vocab);
    const int64_t n_ranges = split.ranges();
    int64_t pass_rows = rows.count;
    if (n_ranges > 1) {
      const int64_t row_bytes = (n_ranges - 1) * std::max<int64_t>(h, 1) * int64_t(c10::elementSize(acc));
      const int64_t fit = partial_dh_bytes() / row_bytes;
      pass_rows = std::min(rows.count, std::max(kBlockRows, fit / kBlockRows * kBlockRows));
    }
    std::vector<std::optional<BackwardRange>> ranges(n_ranges);

    AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprobs_bwd_cpu", [&] {
      const scalar_t inv_t = scalar_t(1.0 / temperature);
      const int64_t* yp = y.data_ptr<int64_t>();
      const scalar_t* glp = g_lp.data_ptr<scalar_t>();
      const scalar_t* gent = g_ent.data_ptr<scalar_t>();
      const double* lsep = row_lse.data_ptr<double>();
      const scalar_t* entp = row_ent.data_ptr<scalar_t>();
      for (int64_t p0 = 0; p0 < rows.count; p0 += pass_rows) {
        const int64_t p1 = std::min(rows.count, p0 + pass_rows);
        for_each_range(split, [&](int64_t r) {
          std::optional<BackwardRange>& st = ranges[r];
          if (!st) {
            st.emplace(BackwardRange{TileBuffer(policy, acc, numel),
                                     same ? Tensor() : at::empty({std::min(kBlockVocab, vocab), h}, acc_opts),
                                     r == 0 ? Tensor() : at::empty({pass_rows, h}, acc_opts)});
          }
          Tensor dh = r == 0 ? grad_hidden_rows.narrow(0, p0, p1 - p0)
                             : st->partial_dh.narrow(0, 0, p1 - p0).zero_();
          split.for_each_tile(r, [&](int64_t c0, int64_t v) {
            Tensor w_acc = policy.weight.narrow(0, c0, v);
            if (!same) w_acc = st->weight_tile.narrow(0, 0, v).copy_(w_acc);
            Tensor dw = grad_weight.narrow(0, c0, v);
            const scalar_t* b = bias_ptr<scalar_t>(policy, c0);
            for (int64_t r0 = p0; r0 < p1; r0 += kBlockRows) {
              const int64_t n = std::min(kBlockRows, p1 - r0);
              Tensor tile = st->tile.logits(policy, r0, n, c0, v);
              scalar_t* x = tile.data_ptr<scalar_t>();
              for (int64_t i = 0; i < n; ++i) {
                const int64_t row = r0 + i;
                const SplitLse<scalar_t> l(lsep[row]);
                row_dlogits(x + i * v, b, v, inv_t, l.hi, l.lo, entp[row], glp[row], gent[row], yp[row] - c0);
              }
              dw.addmm_(tile.t(), hidden_acc.narrow(0, r0, n));
              if (bias_requires_grad) grad_bias.narrow(0, c0, v).add_(tile.sum(0));
              dh.narrow(0, r0 - p0, n).addmm_(tile, w_acc);
            }
          });
        });
        Tensor dh_pass = grad_hidden_rows.narrow(0, p0, p1 - p0);
        for (int64_t r = 1; r < n_ranges; ++r) dh_pass.add_(ranges[r]->partial_dh.narrow(0, 0, p1 - p0));
      }
    });
  }
  Tensor grad_hidden = put_rows(grad_hidden_rows, rows, n_rows);
  return {grad_hidden.to(hidden.scalar_type()), grad_weight.to(weight.scalar_type()),
          bias_requires_grad ? grad_bias.to(bias->scalar_type()) : grad_bias};
}

void check_logits_block(const Tensor& logits, const Tensor& targets, double temperature) {
  CK_CHECK_CPU(logits);
  CK_CHECK_DIM(logits, 2);
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "logits must be float32 (the fp32 logits buffer), got ", logits.scalar_type());
  TORCH_CHECK(logits.is_contiguous(), "logits must be contiguous; pass logits.contiguous()");
  TORCH_CHECK(logits.size(1) >= 1, "logits must have at least one vocabulary column, got shape ", logits.sizes());
  check_targets(targets, logits.size(0));
  check_temperature(temperature);
}


std::tuple<Tensor, Tensor, Tensor> logits_stats_cpu(const Tensor& logits, const Tensor& targets,
                                                    double temperature, int64_t ignore_index, bool with_entropy) {
  check_logits_block(logits, targets, temperature);
  const int64_t n_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  scored_rows(targets, ignore_index, vocab);  // range check only
  Tensor logprobs = at::empty({n_rows}, logits.options());
  Tensor entropy = at::empty({n_rows}, logits.options());
  Tensor lse = at::empty({n_rows}, logits.options().dtype(at::kDouble));
  const double log_v = std::log(double(vocab));
  const Tensor targets_c = targets.contiguous();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "logits_stats_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = targets_c.data_ptr<int64_t>();
    scalar_t* lp = logprobs.data_ptr<scalar_t>();
    scalar_t* ent = entropy.data_ptr<scalar_t>();
    double* ls = lse.data_ptr<double>();
    const scalar_t inv_t = scalar_t(1.0 / temperature);
    for_each_row(n_rows, vocab, [&](int64_t i) {
      const bool valid = y[i] != ignore_index;
      RowStats<scalar_t> st;
      fold_row(st, x + i * vocab, static_cast<const scalar_t*>(nullptr), vocab, inv_t, 0, valid ? y[i] : -1,
               with_entropy && valid);
      const RowResult<scalar_t> r = finish_row(st, valid, with_entropy, log_v);
      lp[i] = r.logprob;
      ent[i] = r.entropy;
      ls[i] = r.lse;
    });
  });
  return {logprobs, entropy, lse};
}

void logits_grad_cpu_(Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& entropy,
                      const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy, double temperature,
                      int64_t ignore_index) {
  check_logits_block(logits, targets, temperature);
  const int64_t n_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  check_row_vector(lse, n_rows, "lse");
  check_row_vector(entropy, n_rows, "entropy");
  check_row_vector(grad_logprobs, n_rows, "grad_logprobs");
  if (grad_entropy.has_value()) check_row_vector(*grad_entropy, n_rows, "grad_entropy");
  scored_rows(targets, ignore_index, vocab);  // range check only
  const at::ScalarType acc = logits.scalar_type();
  const Tensor ls = lse.to(at::kDouble).contiguous(), en = entropy.to(acc).contiguous();
  const Tensor glp = grad_logprobs.to(acc).contiguous();
  const Tensor gent = grad_entropy.has_value() ? grad_entropy->to(acc).contiguous() : Tensor();
  const Tensor targets_c = targets.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "logits_grad_cpu_", [&] {
    scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = targets_c.data_ptr<int64_t>();
    const double* lsp = ls.data_ptr<double>();
    const scalar_t* enp = en.data_ptr<scalar_t>();
    const scalar_t* glpp = glp.data_ptr<scalar_t>();
    const scalar_t* gentp = gent.defined() ? gent.data_ptr<scalar_t>() : nullptr;
    const scalar_t inv_t = scalar_t(1.0 / temperature);
    for_each_row(n_rows, vocab, [&](int64_t i) {
      scalar_t* row = x + i * vocab;
      if (y[i] == ignore_index) {
        std::fill(row, row + vocab, scalar_t(0));
        return;
      }
      const SplitLse<scalar_t> l(lsp[i]);
      row_dlogits(row, static_cast<const scalar_t*>(nullptr), vocab, inv_t, l.hi, l.lo, enp[i], glpp[i],
                  gentp ? gentp[i] : scalar_t(0), y[i]);
    });
  });
}

}  // namespace linear_logprobs
}  // namespace care_kernels

TORCH_LIBRARY_FRAGMENT(care_kernels, m) {
  m.def(
      "linear_logprobs_fwd_cpu(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? ref_hidden, "
      "Tensor? ref_weight, Tensor? ref_bias, float temperature, int ignore_index, bool with_entropy) -> "
      "(Tensor logprobs, Tensor entropy, Tensor lse, Tensor ref_logprobs)");
  m.def(
      "linear_logprobs_bwd_cpu(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index, "
      "bool bias_requires_grad) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "logits_stats_cpu(Tensor logits, Tensor targets, float temperature, int ignore_index, bool with_entropy) "
      "-> (Tensor logprobs, Tensor entropy, Tensor lse)");
  m.def(
      "logits_grad_cpu_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor entropy, Tensor grad_logprobs, "
      "Tensor? grad_entropy, float temperature, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(care_kernels, CPU, m) {
  using namespace care_kernels::linear_logprobs;
  m.impl("linear_logprobs_fwd_cpu", &linear_logprobs_fwd_cpu);
  m.impl("linear_logprobs_bwd_cpu", &linear_logprobs_bwd_cpu);
  m.impl("logits_stats_cpu", &logits_stats_cpu);
  m.impl("logits_grad_cpu_", &logits_grad_cpu_);
}
