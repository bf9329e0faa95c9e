"""C++ source of the MSE range search (`engine/quantize.py: mse_qparams`), compiled at first use.

Eight rows at a time, one per vector lane, so every row's sums run in its own column order: the
kernel's numbers are those of the tensor-op fallback in `quantize.py`, bit for bit, and torch's
`choose_qparams_optimized` is replayed exactly (its loss is a sequential float32 sum). Floating
point contraction is off (`-ffp-contract=off`): every product and sum is rounded as written.
"""

from __future__ import annotations

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARQ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPARQ_CLONES
#endif
// Vector helpers are always inlined: an out-of-line copy would pass its vectors in memory
// under the baseline ABI, unlike the clones that call it.
#define SPARQ_INLINE __attribute__((always_inline))

namespace sparq_mse {

constexpr int kLanes = 8;
// The fewest values a thread takes: smaller inputs run on the calling thread alone.
constexpr int64_t kParallelValues = 1 << 15;
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// Round half to even (rint in the default rounding mode, as std::nearbyint and torch.round):
// one vroundps in the AVX2 clones (a per-lane rintf in the baseline clone).
static inline v8f round_even(v8f t) {
  v8f r;
  for (int l = 0; l < kLanes; ++l) r[l] = __builtin_rintf(t[l]);
  return r;
}

static inline v8f splat(float x) { return v8f{} + x; }

static inline v8i splat_int(int32_t x) { return v8i{} + x; }

// Rounded levels q clamped to [+0.0, top], as torch's clamps give them in either order
// (min(q, top) then max(+0.0, q), or the other way), in two integer operations: compared as
// int32, a negative float or -0.0 is below +0.0 (and becomes it) and non-negative floats,
// +inf included, keep their order; the float comparisons run on the ports the error terms'
// additions need. A NaN level comes out as +0.0 or top, where the clamps give NaN or +0.0:
// each caller says why its error term is NaN then whatever the level.
SPARQ_INLINE static inline v8f clamp_levels(v8f q, float top) {
  const v8i bits = (v8i)q, zero = v8i{}, top_bits = (v8i)splat(top);
  const v8i at_least_zero = bits > zero ? bits : zero;  // vpmaxsd
  return (v8f)(at_least_zero < top_bits ? at_least_zero : top_bits);  // vpminsd
}

// float(c10::Half(x)) per lane: rounded to the nearest float16 value, ties to even; beyond
// float16's range infinite; NaN stays NaN.
SPARQ_INLINE static inline v8f round_to_float16(v8f x) {
  const v8i bits = (v8i)x;
  const v8i sign = bits & splat_int(INT32_MIN);
  const v8i magnitude = bits & splat_int(INT32_MAX);
  // normal float16 range: round the 23-bit mantissa to 10 bits (the carry may reach the exponent)
  v8i normal = (magnitude + splat_int(0xfff) + ((magnitude >> 13) & splat_int(1))) & splat_int(~0x1fff);
  normal = normal >= splat_int(0x47800000) ? splat_int(0x7f800000) : normal;  // >= 65520
  // below 2^-14: multiples of 2^-24, rounded by a float addition
  const v8f tiny = ((v8f)magnitude + splat(0.5f)) - splat(0.5f);
  v8i rounded = magnitude < splat_int(0x38800000) ? (v8i)tiny : normal;
  rounded = magnitude > splat_int(0x7f800000) ? magnitude : rounded;  // NaN
  return (v8f)(rounded | sign);
}

typedef uint32_t v8u __attribute__((vector_size(32)));

// float(c10::BFloat16(x)) per lane: rounded to the nearest bfloat16 value, ties to even (a
// carry past the largest gives infinity); NaN stays NaN.
SPARQ_INLINE static inline v8f round_to_bfloat16(v8f x) {
  const v8u bits = (v8u)x;
  const v8u rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & ~0xffffu;
  return (v8i)(bits & 0x7fffffffu) > splat_int(0x7f800000) ? x : (v8f)rounded;
}

// The next value above each lane's finite, non-negative float16 (narrow 1) or bfloat16 (2)
// value, as float32: std::nextafter towards +inf in that dtype (past the largest: infinity).
SPARQ_INLINE static inline v8f next_up(v8f x, int narrow) {
  const v8u bits = (v8u)x;
  if (narrow == 2) return (v8f)(bits + 0x10000u);
  // float16's spacing at x: 2^-24 below 2^-14 (subnormals), else 2^(exponent - 10)
  const v8i exponent = (v8i)(bits >> 23);
  const v8i spacing = exponent < splat_int(113) ? splat_int(103 << 23) : (exponent - 10) << 23;
  return round_to_float16(x + (v8f)spacing);  // exact; 65504 + 32 becomes infinity
}

// Narrow scale dtypes: 0 float32, 1 float16, 2 bfloat16.
SPARQ_INLINE static inline v8f to_narrow(v8f x, int narrow) {
  return narrow == 1 ? round_to_float16(x) : narrow == 2 ? round_to_bfloat16(x) : x;
}

// qparams_from_range(low, high, check=False, refuse_off_grid=False) of quantize.py, for eight
// rows (a search's candidates: an off-grid zero point is scored by its real error).
SPARQ_INLINE static inline void qparams(v8f low, v8f high, float quant_max, int narrow, v8f& scale,
                           v8f& zero_point) {
  v8f s = (high - low) / splat(quant_max);
  s = s > splat(std::numeric_limits<float>::epsilon()) ? s : splat(1.0f);
  if (narrow) {
    const v8f n = to_narrow(s, narrow);
    s = n < s ? next_up(n, narrow) : n;
  }
  zero_point = to_narrow((splat(-1.0f) * low) / s, narrow);
  scale = s;
}

// qparams for eight lanes held in arrays (callers outside the clones).
SPARQ_CLONES
static void lane_qparams(const float* low, const float* high, float quant_max, int narrow,
                         float* scale, float* zero_point) {
  v8f lo, hi, s, z;
  std::memcpy(&lo, low, sizeof(lo));
  std::memcpy(&hi, high, sizeof(hi));
  qparams(lo, hi, quant_max, narrow, s, z);
  std::memcpy(scale, &s, sizeof(s));
  std::memcpy(zero_point, &z, sizeof(z));
}

struct Group {
  const float* xt;    // (cols, 8): each lane's kept values in column order, then zeros
  const int32_t* kt;  // (cols, 8): -1 where xt holds a kept value, else 0; set only if masked
  int64_t cols;       // the most kept values of a lane
  bool masked;        // whether some row's lane has fewer than `cols` kept values (the lanes
                      // past the last row hold zeros, summed as if kept: their sums are unused)
  int64_t count[kLanes];  // each lane's kept values
};

// acc + term where the lane keeps the value (adding +0.0 elsewhere: the same float sum).
template <bool Masked>
static inline v8f add_kept(v8f acc, v8f term, const int32_t* keep) {
  if constexpr (Masked) {
    v8i k;
    std::memcpy(&k, keep, sizeof(k));
    return acc + (v8f)((v8i)term & k);
  } else {
    return acc + term;
  }
}

// The most candidates scored in one pass over a group's columns.
constexpr int kBatch = 6;

// Each lane's sequential float32 sum over its kept values of the squared error of the decode
// (quantize_levels, dequantize, minus the value) under each of N qparams, in one pass over the
// columns (each candidate's sum in its own accumulator, so the sums are those of N passes).
template <bool Masked, int N>
SPARQ_INLINE static inline void error_sums(const Group& g, const v8f* s, const v8f* z,
                                           const v8f* inv, float quant_max, v8f* acc) {
  for (int n = 0; n < N; ++n) acc[n] = splat(0.0f);
  for (int64_t c = 0; c < g.cols; ++c) {
    v8f x;
    std::memcpy(&x, g.xt + c * kLanes, sizeof(x));
#pragma GCC unroll 8
    for (int n = 0; n < N; ++n) {
      // With finite qparams a level is NaN only where x is, and so is d.
      const v8f q = clamp_levels(round_even(x * inv[n] + z[n]), quant_max);
      const v8f d = (q - z[n]) * s[n] - x;
      acc[n] = add_kept<Masked>(acc[n], d * d, g.kt + c * kLanes);
    }
  }
}

template <int N>
SPARQ_INLINE static inline void error_pass(const Group& g, const v8f* s, const v8f* z,
                                           const v8f* inv, float quant_max, v8f* acc) {
  if (g.masked) {
    error_sums<true, N>(g, s, z, inv, quant_max, acc);
  } else {
    error_sums<false, N>(g, s, z, inv, quant_max, acc);
  }
}

// The error sums of `count` (1 to kBatch) candidates' qparams per lane, scale[n * 8 + lane]
// and zero_point[n * 8 + lane], into out[n * 8 + lane]: +inf where the qparams are not finite
// or the sum is NaN.
SPARQ_CLONES
static void errors(const Group& g, int count, const float* scale, const float* zero_point,
                   float quant_max, float* out) {
  v8f s[kBatch], z[kBatch], inv[kBatch], acc[kBatch];
  for (int n = 0; n < count; ++n) {
    for (int l = 0; l < kLanes; ++l) {
      s[n][l] = scale[n * kLanes + l];
      z[n][l] = zero_point[n * kLanes + l];
      inv[n][l] = 1.0f / scale[n * kLanes + l];
    }
  }
  switch (count) {
    case 1: error_pass<1>(g, s, z, inv, quant_max, acc); break;
    case 2: error_pass<2>(g, s, z, inv, quant_max, acc); break;
    case 3: error_pass<3>(g, s, z, inv, quant_max, acc); break;
    case 4: error_pass<4>(g, s, z, inv, quant_max, acc); break;
    case 5: error_pass<5>(g, s, z, inv, quant_max, acc); break;
    default: error_pass<6>(g, s, z, inv, quant_max, acc); break;
  }
  for (int n = 0; n < count; ++n) {
    for (int l = 0; l < kLanes; ++l) {
      const int i = n * kLanes + l;
      const bool finite = std::isfinite(scale[i]) && std::isfinite(zero_point[i]);
      const float e = acc[n][l];
      out[i] = finite && !std::isnan(e) ? e : std::numeric_limits<float>::infinity();
    }
  }
}

// q * s + m for levels q (whole numbers up to 255) and float16 values s (or 1): the product
// needs at most 8 + 11 significant bits, so it is exact in float32 and one fused multiply-add
// rounds the sum exactly as the separate multiply and add do (a vfmadd in the AVX2 clones).
SPARQ_INLINE static inline v8f exact_product_plus(v8f q, v8f s, v8f m) {
  v8f r;
  for (int l = 0; l < kLanes; ++l) r[l] = __builtin_fmaf(q[l], s[l], m[l]);
  return r;
}

// The sums of torch's loss for N (xmin, scale, 1 / scale) per lane, in one pass.
template <bool Masked, int N>
SPARQ_INLINE static inline void torch_sums(const Group& g, float qmax, const v8f* mins,
                                           const v8f* s, const v8f* inv, v8f* acc) {
  for (int n = 0; n < N; ++n) acc[n] = splat(0.0f);
  for (int64_t col = 0; col < g.cols; ++col) {
    v8f x;
    std::memcpy(&x, g.xt + col * kLanes, sizeof(x));
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) {
      // std::max(0.0f, std::min<float>(q, qmax)). A level is NaN only where x or xmin is NaN,
      // or where an infinite x or xmin makes the range, so the scale, infinite (the inverse
      // +-0): torch's decode q * scale + xmin is then NaN (0 * inf), and with any other level
      // NaN or an infinity of x's sign, so d is NaN whatever the level.
      const v8f q = clamp_levels(round_even((x - mins[n]) * inv[n]), qmax);
      const v8f d = x - exact_product_plus(q, s[n], mins[n]);
      acc[n] = add_kept<Masked>(acc[n], d * d, g.kt + col * kLanes);
    }
  }
}

// torch's loss (calculate_quant_loss) of N ranges [lows[n], highs[n]] of every lane, in one
// pass over the columns, into loss[n]. Inlined into greedy's clones (an out-of-line copy would
// be compiled without AVX).
template <int N>
SPARQ_INLINE static inline void torch_losses(const Group& g, float qmax, const v8f* lows,
                                             const v8f* highs, v8f* loss) {
  const v8f one = splat(1.0f);
  const v8f zero = splat(0.0f);
  const v8f top = splat(qmax);
  // xmin = Half(xmin); scale = range == 0 ? 1 : Half(range / qmax); inverse = 1 / scale or 1
  v8f mins[N], s[N], inv[N], acc[N];
  for (int n = 0; n < N; ++n) {
    mins[n] = round_to_float16(lows[n]);
    const v8f range = highs[n] - mins[n];
    s[n] = range == zero ? one : round_to_float16(range / top);
    inv[n] = s[n] == zero ? one : one / s[n];
  }
  if (g.masked) {
    torch_sums<true, N>(g, qmax, mins, s, inv, acc);
  } else {
    torch_sums<false, N>(g, qmax, mins, s, inv, acc);
  }
  for (int n = 0; n < N; ++n) {
    for (int l = 0; l < kLanes; ++l) loss[n][l] = std::sqrt(acc[n][l]);
  }
}

static inline bool any_lane(v8i mask) {
  bool any = false;
  for (int l = 0; l < kLanes; ++l) any = any || mask[l] != 0;
  return any;
}

// For each lane, whether no range the walk can still visit from [cur_min, cur_max] has a loss
// below `best`, so the walk cannot record another range. Every later range [a, b] has
// a >= cur_min and b <= cur_max, so its decoded values lie in [L, T]: L = float16(cur_min)
// (rounding is monotone), T = cur_max plus float16's and float32's rounding of the top level
// (its scale is float16(range / qmax), at most 2^-11 of the range or 2^-25 above exact, times
// qmax). A kept value below L (above T) then has a float32 error of at least fl(L - x)
// (fl(x - T)), and its square at least that one's square; summed in the same column order,
// torch's sequential float32 sum of its non-negative terms is at least the sum of these tail
// terms, and so is its square root. `bounded` lanes keep the range wide against float16's
// rounding of its ends (the scale stays positive) and every value below 2^14.
SPARQ_CLONES
static void nothing_better_ahead(const Group& g, const float* cur_min, const float* cur_max,
                                 const float* best, const bool* bounded, bool* done) {
  v8f low_in, high;
  std::memcpy(&low_in, cur_min, sizeof(v8f));
  const v8f low = round_to_float16(low_in);
  for (int l = 0; l < kLanes; ++l) {
    const double top = static_cast<double>(cur_max[l]) +
                       (static_cast<double>(cur_max[l]) - low[l]) * (1.0 / 512) +
                       (std::fabs(static_cast<double>(cur_max[l])) + std::fabs(low[l])) *
                           (1.0 / 1048576) +
                       1.0 / 65536;
    float t = static_cast<float>(top);
    high[l] = t < top ? std::nextafter(t, std::numeric_limits<float>::infinity()) : t;
  }
  const v8f zero = splat(0.0f);
  v8f acc = zero;
  for (int64_t c = 0; c < g.cols; ++c) {
    v8f x;
    std::memcpy(&x, g.xt + c * kLanes, sizeof(x));
    const v8f below = x < low ? low - x : zero;
    const v8f above = x > high ? x - high : zero;
    const v8f d = below + above;  // one of them is +0.0
    acc = g.masked ? add_kept<true>(acc, d * d, g.kt + c * kLanes) : acc + d * d;
  }
  for (int l = 0; l < kLanes; ++l) {
    done[l] = bounded[l] && std::isfinite(best[l]) && std::sqrt(acc[l]) >= best[l];
  }
}

// torch.choose_qparams_optimized(kept values, n, 200, 0.16, bits) for every lane, replayed with
// its own float32 operations: the loss (xmin rounded to float16, the scale through float16, a
// sequential sum, its square root) and the greedy walk, one lane per row (masks and blends in
// place of torch's branches). Lanes without kept values are skipped; a lane whose walk stops
// moving (where torch would loop forever) ends there.
SPARQ_CLONES
static void greedy(const Group& g, const float* row_min, const float* row_max,
                   const bool* any_kept, int bits, float* out_low, float* out_high) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t n_bins = 200;
  const int min_bins = static_cast<int>(n_bins * (1.0 - static_cast<float>(0.16)));
  v8f cur_min, cur_max;
  std::memcpy(&cur_min, row_min, sizeof(v8f));
  std::memcpy(&cur_max, row_max, sizeof(v8f));
  const v8f step = (cur_max - cur_min) / splat(static_cast<float>(n_bins));
  const v8f thr = splat(static_cast<float>(min_bins)) * step;
  v8f best_low = cur_min, best_high = cur_max;
  // Lanes whose walk may stop early (see nothing_better_ahead): finite rows whose range is wide
  // against float16's rounding of their ends. Checked from 6 bits up, where the walk soon
  // clamps more than the whole error of the best range; below, it rarely ends early.
  v8i walking, bounded;
  for (int l = 0; l < kLanes; ++l) {
    const float lo = std::fabs(row_min[l]), hi = std::fabs(row_max[l]);
    const float range = row_max[l] - row_min[l];
    walking[l] = any_kept[l] ? -1 : 0;
    bounded[l] = bits >= 6 && any_kept[l] && lo < 16384.0f && hi < 16384.0f &&
                         range > (lo + hi) * 0.00390625f
                     ? -1
                     : 0;
  }
  v8f cur_loss = splat(0.0f), best_loss = cur_loss;  // set by the first move's pass
  bool first = true;
  for (;;) {
    const v8i active = walking & (cur_min + thr < cur_max);
    if (!any_lane(active)) break;
    const v8f left_min = cur_min + step;
    const v8f right_max = cur_max - step;
    v8f loss1, loss2;
    if (first) {  // the start's loss too, in the same pass
      const v8f lows[3] = {left_min, cur_min, cur_min}, highs[3] = {cur_max, right_max, cur_max};
      v8f losses[3];
      torch_losses<3>(g, qmax, lows, highs, losses);
      loss1 = losses[0], loss2 = losses[1], cur_loss = losses[2], best_loss = cur_loss;
      first = false;
    } else {
      const v8f lows[2] = {left_min, cur_min}, highs[2] = {cur_max, right_max};
      v8f losses[2];
      torch_losses<2>(g, qmax, lows, highs, losses);
      loss1 = losses[0], loss2 = losses[1];
    }
    // A local minimum below the best so far is recorded.
    const v8i better = active & (cur_loss < loss1) & (cur_loss < loss2) & (cur_loss < best_loss);
    best_loss = better ? cur_loss : best_loss;
    best_low = better ? cur_min : best_low;
    best_high = better ? cur_max : best_high;
    // Then the walk moves to the cheaper side: the left end when loss1 < loss2, else the right.
    const v8i left = active & (loss1 < loss2);
    const v8i right = active & ~(loss1 < loss2);
    // A move that leaves its end where it was (the step below half a float spacing there)
    // repeats forever: torch never returns for such a row. Its answer cannot change any more
    // (the same range, the same loss, nothing below it to record), so the lane stops here.
    walking &= ~((left & (left_min == cur_min)) | (right & (right_max == cur_max)));
    cur_min = left ? left_min : cur_min;
    cur_max = right ? right_max : cur_max;
    cur_loss = left ? loss1 : right ? loss2 : cur_loss;
    // Only when some lane's walk has risen to its best loss (the bound is at most that loss).
    if (any_lane(active & bounded & (cur_loss >= best_loss))) {
      float lows[kLanes], highs[kLanes], bests[kLanes];
      bool bound[kLanes], done[kLanes];
      std::memcpy(lows, &cur_min, sizeof(lows));
      std::memcpy(highs, &cur_max, sizeof(highs));
      std::memcpy(bests, &best_loss, sizeof(bests));
      for (int l = 0; l < kLanes; ++l) bound[l] = bounded[l] != 0;
      nothing_better_ahead(g, lows, highs, bests, bound, done);
      for (int l = 0; l < kLanes; ++l) {
        if (done[l]) walking[l] = 0;  // the walk can no longer change this lane's answer
      }
    }
  }
  std::memcpy(out_low, &best_low, sizeof(v8f));
  std::memcpy(out_high, &best_high, sizeof(v8f));
}

// Rows r0 .. r0 + lanes - 1 of values (and keep) into g: each lane's kept values in column
// order, then zeros (missing lanes: nothing kept); each lane's kept min and max, the first of
// equal ones in column order as std::min_element and std::max_element pick them; any: whether
// the lane keeps a value. The ends are taken lane-wise over the transposed columns, in column
// order with the scalar rule (`v < min`), so ties, signed zeros and NaNs come out as one row at
// a time would give them.
SPARQ_CLONES
static void transpose(const float* xv, const bool* kv, int64_t r0, int lanes, int64_t cols,
                      Group& g, float* xt, int32_t* kt, float* row_min, float* row_max,
                      bool* any) {
  int64_t most = 0;
  for (int l = 0; l < kLanes; ++l) {
    int64_t n = 0;
    if (l < lanes) {
      const float* x = xv + (r0 + l) * cols;
      if (kv) {
        // Each value goes to the next free place, which only a kept one then takes. The mask
        // is read as bytes, any non-zero one kept (a bool tensor made by a view may hold 2).
        const uint8_t* k = reinterpret_cast<const uint8_t*>(kv) + (r0 + l) * cols;
        for (int64_t c = 0; c < cols; ++c) {
          xt[n * kLanes + l] = x[c];
          n += k[c] != 0;
        }
      } else {
        for (int64_t c = 0; c < cols; ++c) xt[c * kLanes + l] = x[c];
        n = cols;
      }
    }
    g.count[l] = n;
    any[l] = n > 0;
    most = std::max(most, n);
  }
  bool masked = false;
  for (int l = 0; l < kLanes; ++l) {
    for (int64_t j = g.count[l]; j < most; ++j) xt[j * kLanes + l] = 0.0f;
    masked = masked || (l < lanes && g.count[l] < most);
  }
  if (masked) {
    for (int64_t j = 0; j < most; ++j) {
      for (int l = 0; l < kLanes; ++l) kt[j * kLanes + l] = j < g.count[l] ? -1 : 0;
    }
  }
  g.cols = most;
  g.masked = masked;
  v8f low = splat(0.0f);
  if (most > 0) std::memcpy(&low, xt, sizeof(low));  // each lane's first kept value, or 0
  v8f high = low;
  for (int64_t j = 1; j < most; ++j) {
    v8f x;
    std::memcpy(&x, xt + j * kLanes, sizeof(x));
    v8i below = x < low, above = high < x;
    if (masked) {
      v8i k;
      std::memcpy(&k, kt + j * kLanes, sizeof(k));
      below &= k, above &= k;
    }
    low = below ? x : low;
    high = above ? x : high;
  }
  std::memcpy(row_min, &low, sizeof(low));
  std::memcpy(row_max, &high, sizeof(high));
}

typedef double v4d __attribute__((vector_size(32)));

// The most start ranges `start_ranges` gives (with the kept ends); one pass scores them with
// min/max's candidate and torch's pick.
constexpr int kMaxStarts = 4;
static_assert(1 + kMaxStarts + 1 <= kBatch, "min/max, the starts and torch's pick: one pass");

// The start ranges of a search after min/max's (quantize.py: _start_ranges, the same float64
// operations) for each lane of g, into lows[j * 8 + lane] and highs[j * 8 + lane]; returns how
// many. `kept_ends`: whether the kept values' own min and max are one of them (when a keep mask
// is given). Each lane's sum and sum of squares run in float64 over its kept values in column
// order (the zeros after them add nothing).
SPARQ_CLONES
static int start_ranges(const Group& g, const float* low, const float* high, bool kept_ends,
                        double half_width, float* lows, float* highs) {
  v4d total[2] = {}, squares[2] = {};
  for (int64_t c = 0; c < g.cols; ++c) {
    for (int half = 0; half < 2; ++half) {
      v4d x;
      for (int i = 0; i < 4; ++i) x[i] = g.xt[c * kLanes + half * 4 + i];
      total[half] += x;
      squares[half] += x * x;
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    const double sum = total[l / 4][l % 4], sum_squares = squares[l / 4][l % 4];
    const double count = std::max(static_cast<double>(g.count[l]), 1.0);
    const double others = std::max(static_cast<double>(g.count[l]) - 1.0, 1.0);
    const double mean = sum / count;
    // sum(x^2)/n - mean^2: cancels for rows far from zero, which then start poorly (no worse).
    const double variance = sum_squares / count - mean * mean;
    const double width = half_width * std::sqrt(std::max(variance, 0.0));
    int j = 0;
    auto add = [&](double a, double b) {
      lows[j * kLanes + l] = static_cast<float>(a);
      highs[j * kLanes + l] = static_cast<float>(b);
      ++j;
    };
    if (kept_ends) add(low[l], high[l]);
    add(mean - width, mean + width);
    add(low[l], (sum - low[l]) / others);
    add((sum - high[l]) / others, high[l]);
  }
  return kept_ends ? kMaxStarts : kMaxStarts - 1;
}

// Calls f(r0, lanes, group, row_min, row_max, any) for each group of up to 8 rows from r0, on
// torch's intra-op threads (one where the caller runs torch with one thread, as the engine's
// chunk workers do). Groups are independent and f writes only its own rows, so the results are
// the same for any thread count.
template <class F>
static void for_groups(const float* xv, const bool* kv, int64_t rows, int64_t cols, F&& f) {
  const int64_t groups = (rows + kLanes - 1) / kLanes;
  const int64_t grain = std::max<int64_t>(1, kParallelValues / std::max<int64_t>(1, cols * kLanes));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xt(cols * kLanes);
    std::vector<int32_t> kt(cols * kLanes);
    Group g{xt.data(), kt.data(), cols, false};
    for (int64_t group = begin; group < end; ++group) {
      const int64_t r0 = group * kLanes;
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, rows - r0));
      float row_min[kLanes], row_max[kLanes];
      bool any[kLanes];
      transpose(xv, kv, r0, lanes, cols, g, xt.data(), kt.data(), row_min, row_max, any);
      f(r0, lanes, g, row_min, row_max, any);
    }
  });
}

// Checks the (values, keep) arguments of the functions below; returns whether keep is given.
static bool check_rows(const at::Tensor& values, const at::Tensor& keep) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "sparq mse kernel: values must be a contiguous float32 matrix");
  const bool masked = keep.numel() > 0;
  TORCH_CHECK(!masked || (keep.scalar_type() == at::kBool && keep.is_contiguous() &&
                          keep.sizes() == values.sizes()),
              "sparq mse kernel: keep must be a contiguous bool matrix like values");
  return masked;
}

}  // namespace sparq_mse

// See quantize.py: mse_qparams. values (rows, cols) float32; keep (rows, cols) bool or empty;
// minmax_low, minmax_high, minmax_scale and minmax_zero_point (rows,): the first candidate, as
// a range and as qparams; bits; narrow (0 float32, 1 float16, 2 bfloat16); steps: the pattern
// fractions; half_width: the Gaussian-optimal half-width in standard deviations. Returns
// (scale, zero_point).
std::vector<at::Tensor> mse_search(at::Tensor values, at::Tensor keep, at::Tensor minmax_low,
                                   at::Tensor minmax_high, at::Tensor minmax_scale,
                                   at::Tensor minmax_zero_point, int64_t bits, int64_t narrow,
                                   std::vector<double> steps, double half_width) {
  using namespace sparq_mse;
  const bool masked = check_rows(values, keep);
  const int64_t rows = values.size(0), cols = values.size(1);
  for (const at::Tensor* t : {&minmax_low, &minmax_high, &minmax_scale, &minmax_zero_point}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows,
                "mse_search: the min/max candidate must be one value per row");
  }
  TORCH_CHECK(bits >= 1 && bits <= 8 && narrow >= 0 && narrow <= 2, "mse_search: bad settings");
  at::Tensor scale = minmax_scale.to(at::kFloat).contiguous().clone();
  at::Tensor zero_point = minmax_zero_point.to(at::kFloat).contiguous().clone();
  const at::Tensor ends_low = minmax_low.to(at::kFloat).contiguous();
  const at::Tensor ends_high = minmax_high.to(at::kFloat).contiguous();
  const float* xv = values.data_ptr<float>();
  const bool* kv = masked ? keep.data_ptr<bool>() : nullptr;
  const float* minmax_lo = ends_low.data_ptr<float>();
  const float* minmax_hi = ends_high.data_ptr<float>();
  float* out_s = scale.data_ptr<float>();
  float* out_z = zero_point.data_ptr<float>();
  const float quant_max = static_cast<float>((1 << bits) - 1);
  {
    pybind11::gil_scoped_release release;
    for_groups(xv, kv, rows, cols, [&](int64_t r0, int lanes, const Group& g,
                                       const float* row_min, const float* row_max,
                                       const bool* any) {
      float best_s[kLanes], best_z[kLanes], best_lo[kLanes], best_hi[kLanes], best_e[kLanes];
      // Up to kBatch candidates, [n * 8 + lane], scored in one pass; each lane then takes them
      // in order, keeping the smallest error (the earliest on ties), as one at a time would.
      float cand_s[kBatch * kLanes], cand_z[kBatch * kLanes], e[kBatch * kLanes];
      float cand_lo[kBatch * kLanes], cand_hi[kBatch * kLanes];
      // Scores candidates 0 .. count - 1, those from `first` on made from their ranges.
      auto score = [&](int first, int count) {
        for (int i = first * kLanes; i < count * kLanes; ++i) {
          cand_hi[i] = cand_hi[i] < cand_lo[i] ? cand_lo[i] : cand_hi[i];  // torch.maximum
          if (std::isnan(cand_lo[i])) cand_hi[i] = cand_lo[i];
        }
        for (int n = first; n < count; ++n) {
          lane_qparams(cand_lo + n * kLanes, cand_hi + n * kLanes, quant_max,
                       static_cast<int>(narrow), cand_s + n * kLanes, cand_z + n * kLanes);
        }
        errors(g, count, cand_s, cand_z, quant_max, e);
      };
      auto take = [&](int first, int count) {
        for (int n = first; n < count; ++n) {
          for (int l = 0; l < kLanes; ++l) {
            const int i = n * kLanes + l;
            if (e[i] < best_e[l]) {
              best_e[l] = e[i], best_s[l] = cand_s[i], best_z[l] = cand_z[i];
              best_lo[l] = cand_lo[i], best_hi[l] = cand_hi[i];
            }
          }
        }
      };
      // One pass scores the min/max qparams (as given), the other start ranges and the range
      // torch's greedy search picks: none depends on another's score.
      for (int l = 0; l < kLanes; ++l) {
        const int64_t r = l < lanes ? r0 + l : r0;
        cand_lo[l] = minmax_lo[r], cand_hi[l] = minmax_hi[r];
        cand_s[l] = out_s[r], cand_z[l] = out_z[r];
      }
      const int k_starts = 1 + start_ranges(g, row_min, row_max, masked, half_width,
                                             cand_lo + kLanes, cand_hi + kLanes);
      const int count = k_starts + 1;
      greedy(g, row_min, row_max, any, static_cast<int>(bits), cand_lo + k_starts * kLanes,
             cand_hi + k_starts * kLanes);
      score(1, count);
      for (int l = 0; l < kLanes; ++l) {
        best_e[l] = e[l], best_s[l] = cand_s[l], best_z[l] = cand_z[l];
        best_lo[l] = cand_lo[l], best_hi[l] = cand_hi[l];
      }
      take(1, count);
      // The pattern moves of one step size all start from the best range before them.
      for (double fraction : steps) {
        const float f = static_cast<float>(fraction / quant_max);
        for (int l = 0; l < kLanes; ++l) {
          const float lo = best_lo[l], hi = best_hi[l], move = (hi - lo) * f;
          for (int m = 0; m < 4; ++m) {
            cand_lo[m * kLanes + l] = m == 0 ? lo - move : m == 1 ? lo + move : lo;
            cand_hi[m * kLanes + l] = m == 2 ? hi - move : m == 3 ? hi + move : hi;
          }
        }
        score(0, 4);
        take(0, 4);
      }
      for (int l = 0; l < lanes; ++l) {
        out_s[r0 + l] = best_s[l], out_z[r0 + l] = best_z[l];
      }
    });
  }
  return {scale, zero_point};
}

// torch.choose_qparams_optimized on each row's kept values, replayed: (low, high) per row, and
// (0, 0) for rows without kept values. For tests of the replay.
std::vector<at::Tensor> greedy_ranges(at::Tensor values, at::Tensor keep, int64_t bits) {
  using namespace sparq_mse;
  const bool masked = check_rows(values, keep);
  TORCH_CHECK(bits >= 1 && bits <= 8, "greedy_ranges: bits must be 1 to 8");
  const int64_t rows = values.size(0), cols = values.size(1);
  at::Tensor low = at::zeros({rows}, at::kFloat);
  at::Tensor high = at::zeros({rows}, at::kFloat);
  float* out_lo = low.data_ptr<float>();
  float* out_hi = high.data_ptr<float>();
  const float* xv = values.data_ptr<float>();
  const bool* kv = masked ? keep.data_ptr<bool>() : nullptr;
  pybind11::gil_scoped_release release;
  for_groups(xv, kv, rows, cols, [&](int64_t r0, int lanes, const Group& g,
                                     const float* row_min, const float* row_max,
                                     const bool* any) {
    float lo[kLanes], hi[kLanes];
    greedy(g, row_min, row_max, any, static_cast<int>(bits), lo, hi);
    for (int l = 0; l < lanes; ++l) {
      out_lo[r0 + l] = any[l] ? lo[l] : 0.0f;
      out_hi[r0 + l] = any[l] ? hi[l] : 0.0f;
    }
  });
  return {low, high};
}

// float(c10::Half(x)) for every value of a float32 tensor, through round_to_float16 (for tests).
at::Tensor round_to_float16_values(at::Tensor values) {
  using namespace sparq_mse;
  at::Tensor x = values.to(at::kFloat).contiguous().reshape({-1});
  const int64_t n = x.numel();
  at::Tensor padded = at::zeros({(n + kLanes - 1) / kLanes * kLanes}, at::kFloat);
  padded.narrow(0, 0, n).copy_(x);
  float* p = padded.data_ptr<float>();
  for (int64_t i = 0; i < padded.numel(); i += kLanes) {
    v8f v;
    std::memcpy(&v, p + i, sizeof(v));
    v = round_to_float16(v);
    std::memcpy(p + i, &v, sizeof(v));
  }
  return padded.narrow(0, 0, n).reshape(values.sizes());
}

// qparams_from_range(low, high, check=False, refuse_off_grid=False) for every row, through the
// kernel's qparams (for tests): low and high float32 (rows,), returns (scale, zero_point).
std::vector<at::Tensor> range_qparams(at::Tensor low, at::Tensor high, int64_t bits,
                                      int64_t narrow) {
  using namespace sparq_mse;
  const int64_t n = low.numel();
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  at::Tensor lows = at::zeros({padded}, at::kFloat), highs = at::zeros({padded}, at::kFloat);
  lows.narrow(0, 0, n).copy_(low.to(at::kFloat).reshape({-1}));
  highs.narrow(0, 0, n).copy_(high.to(at::kFloat).reshape({-1}));
  at::Tensor scale = at::empty({padded}, at::kFloat), zero_point = at::empty({padded}, at::kFloat);
  const float quant_max = static_cast<float>((1 << bits) - 1);
  for (int64_t i = 0; i < padded; i += kLanes) {
    lane_qparams(lows.data_ptr<float>() + i, highs.data_ptr<float>() + i, quant_max,
                 static_cast<int>(narrow), scale.data_ptr<float>() + i,
                 zero_point.data_ptr<float>() + i);
  }
  return {scale.narrow(0, 0, n), zero_point.narrow(0, 0, n)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("range_qparams", &range_qparams);
  m.def("round_to_float16", &round_to_float16_values);
  m.def("mse_search", &mse_search);
  m.def("greedy_ranges", &greedy_ranges);
}
"""
