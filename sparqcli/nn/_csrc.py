"""C++ source of the fused gather-decode-reduce lookup kernel (compiled at first use through _kernel.py).

The kernel reads the compressed storage exactly as the file holds it: codes bit-packed
continuously LSB-first at any width 1..8, one scale and zero point per row (float32 or float16),
the keep-mask bit-packed LSB-first over its grid (blocks or values), and a group index of row
offsets (one int64 per `group` mask units). A row's first code is found from the index plus a
popcount of the mask bits between its group's start and the row; the row is then decoded run by
run (a run: consecutive kept columns, hence consecutive codes) and reduced into the output.

Hot functions are compiled twice through GCC's `target_clones` (x86-64-v3 and the baseline), so
the cached build is valid on any x86-64 machine and uses AVX2 where the CPU has it; the bag path
of 8-bit (1, 4)-block float32 tables (`bag_chunk_b8w4`) is AVX2 code chosen at run time. Floating
point contraction is off (`-ffp-contract=off`): a value decodes to `(float(q) - z) * s`, rounded
exactly as the engine's `dequantize` does.
"""

from __future__ import annotations

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARQ_AVX2_PATH 1
#define SPARQ_AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt")))
#else
#define SPARQ_AVX2_PATH 0
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARQ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPARQ_CLONES
#endif
#define SPARQ_INLINE inline __attribute__((always_inline))

namespace sparq_nn {

using i64 = int64_t;
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef uint8_t v4u8 __attribute__((vector_size(4)));

// Geometry of one compressed table, as passed from Python (see _storage.py: geometry).
struct Table {
  const uint8_t* codes;
  const float* scale32;
  const c10::Half* scale16;
  const float* zp32;
  const c10::Half* zp16;
  const uint8_t* mask;
  i64 mask_bytes;
  const i64* base;
  i64 rows, cols, bits, masked, bh, bw, unit_bits, wlast, group, round;
  int group_shift;
  int bh_shift;  // log2(bh) when bh is a power of two, else -1

  // The mask unit of row r; a shift for power-of-two block heights (a 64-bit division costs
  // more than the rest of the offset arithmetic).
  SPARQ_INLINE i64 unit_of(i64 r) const { return bh_shift >= 0 ? r >> bh_shift : r / bh; }

  i64 qstride;  // elements between two rows' scales (2: scales and zero points interleaved)

  SPARQ_INLINE float scale(i64 r) const {
    return scale32 ? scale32[r * qstride] : static_cast<float>(scale16[r * qstride]);
  }
  SPARQ_INLINE float zero_point(i64 r) const {
    return zp32 ? zp32[r * qstride] : static_cast<float>(zp16[r * qstride]);
  }
};

struct BagJob {
  Table t;
  const i64* idx;
  const i64* offs;
  i64 n_idx;
  i64 n_offs;
  const float* psw;
  int64_t mode;  // 0 sum, 1 mean, 2 max
  i64 pad;       // -1: none
  float* out;
};

struct RowJob {
  Table t;
  const i64* idx;
  float* out;
};

// The bits of `p` from bit `pos` upward (at least 57 valid bits; zeros past the end).
SPARQ_INLINE uint64_t load_bits(const uint8_t* p, i64 nbytes, i64 pos) {
  i64 byte = pos >> 3;
  uint64_t w = 0;
  if (byte + 8 <= nbytes) {
    std::memcpy(&w, p + byte, 8);
  } else {
    for (i64 i = 0; i < 8 && byte + i < nbytes; ++i) w |= uint64_t(p[byte + i]) << (8 * i);
  }
  return w >> (pos & 7);
}

SPARQ_INLINE i64 popcount_bits(const uint8_t* p, i64 nbytes, i64 pos, i64 n) {
  i64 total = 0;
  while (n > 0) {
    i64 take = n < 56 ? n : 56;
    uint64_t w = load_bits(p, nbytes, pos) & ((uint64_t(1) << take) - 1);
    total += __builtin_popcountll(w);
    pos += take;
    n -= take;
  }
  return total;
}

// Kept values in each row of mask unit (block row, or row for a value mask) `u`.
SPARQ_INLINE i64 unit_kept(const Table& t, i64 u) {
  i64 pos = u * t.unit_bits;
  i64 kept = popcount_bits(t.mask, t.mask_bytes, pos, t.unit_bits) * t.bw;
  if (t.wlast != t.bw && (load_bits(t.mask, t.mask_bytes, pos + t.unit_bits - 1) & 1)) {
    kept -= t.bw - t.wlast;
  }
  return kept;
}

// Code number of row r's first code.
SPARQ_INLINE i64 row_offset(const Table& t, i64 r) {
  if (!t.masked) return r * t.cols;
  i64 u = t.unit_of(r);
  i64 g = u >> t.group_shift;
  i64 u0 = g << t.group_shift;
  i64 off = t.base[g];
  const i64 before = (u - u0) * t.unit_bits;
  if (t.group * t.unit_bits <= 128 && t.unit_bits >= 16) {
    // At most 112 bits between the group's start and the unit: two masked words, no branches.
    const i64 pos = u0 * t.unit_bits;
    const i64 n1 = std::min<i64>(before, 56);
    const uint64_t w0 = load_bits(t.mask, t.mask_bytes, pos) & ((uint64_t(1) << n1) - 1);
    const uint64_t w1 = load_bits(t.mask, t.mask_bytes, pos + 56) & ((uint64_t(1) << (before - n1)) - 1);
    i64 kept = (__builtin_popcountll(w0) + __builtin_popcountll(w1)) * t.bw;
    if (t.wlast != t.bw) {
      for (i64 v = u0; v < u; ++v) {
        if (load_bits(t.mask, t.mask_bytes, v * t.unit_bits + t.unit_bits - 1) & 1) {
          kept -= t.bw - t.wlast;
        }
      }
    }
    off += t.bh * kept;
  } else if (u > u0) {
    i64 kept = popcount_bits(t.mask, t.mask_bytes, u0 * t.unit_bits, before) * t.bw;
    if (t.wlast != t.bw) {
      for (i64 v = u0; v < u; ++v) {
        if (load_bits(t.mask, t.mask_bytes, v * t.unit_bits + t.unit_bits - 1) & 1) {
          kept -= t.bw - t.wlast;
        }
      }
    }
    off += t.bh * kept;
  }
  if (r > u * t.bh) off += (r - u * t.bh) * unit_kept(t, u);
  return off;
}

// Calls f(c0, n, k) for each run of kept columns [c0, c0 + n) of row r, whose codes are code
// numbers k .. k + n - 1.
template <class F>
SPARQ_INLINE void for_runs(const Table& t, i64 r, i64 k, F&& f) {
  if (!t.masked) {
    f(i64(0), t.cols, k);
    return;
  }
  i64 pos0 = t.unit_of(r) * t.unit_bits;
  for (i64 j = 0; j < t.unit_bits; j += 56) {
    i64 take = std::min<i64>(56, t.unit_bits - j);
    uint64_t w = load_bits(t.mask, t.mask_bytes, pos0 + j) & ((uint64_t(1) << take) - 1);
    while (w) {
      int tz = __builtin_ctzll(w);
      uint64_t rest = w >> tz;
      int m = __builtin_ctzll(~rest);
      i64 b0 = j + tz;
      i64 c0 = b0 * t.bw;
      i64 c1 = std::min<i64>((b0 + m) * t.bw, t.cols);
      f(c0, c1 - c0, k);
      k += c1 - c0;
      w &= ~(((uint64_t(1) << m) - 1) << tz);
    }
  }
}

// Unpacks n codes of B bits from code number k into q[0, n) (one byte each).
template <int B>
SPARQ_INLINE void unpack_codes(const uint8_t* codes, i64 k, i64 n, uint8_t* q) {
  constexpr unsigned M = (1u << B) - 1u;
  if constexpr (B == 8) {
    std::memcpy(q, codes + k, n);
    return;
  }
  i64 i = 0;
  i64 bit = k * B;
  auto one = [&](i64 at) __attribute__((always_inline)) {
    i64 byte = at >> 3;
    unsigned v = codes[byte];
    if ((at & 7) + B > 8) v |= unsigned(codes[byte + 1]) << 8;
    return uint8_t((v >> (at & 7)) & M);
  };
  if constexpr (8 % B == 0) {
    constexpr int P = 8 / B;
    for (; i < n && (bit & 7); ++i, bit += B) q[i] = one(bit);
    const uint8_t* p = codes + (bit >> 3);
    i64 nb = (n - i) / P;
    i64 b = 0;
#if defined(__x86_64__) && defined(__SSE2__)
    if constexpr (B == 4) {
      const __m128i low = _mm_set1_epi8(0x0F);
      for (; b + 8 <= nb; b += 8) {
        __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + b));
        __m128i lo = _mm_and_si128(x, low);
        __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), low);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i + 2 * b), _mm_unpacklo_epi8(lo, hi));
      }
    }
#endif
    for (; b < nb; ++b) {
      unsigned byte = p[b];
      for (int s = 0; s < P; ++s) q[i + b * P + s] = uint8_t((byte >> (s * B)) & M);
    }
    i += nb * P;
    bit += nb * 8;
  }
  for (; i < n; ++i, bit += B) q[i] = one(bit);
}

constexpr i64 kChunk = 256;  // codes unpacked at a time

// Calls emit(i0, q, m): q[0, m) are the codes number k + i0 .. k + i0 + m - 1 (one byte each).
template <int B, class E>
SPARQ_INLINE void decode_codes(const uint8_t* codes, i64 k, i64 n, E&& emit) {
  if constexpr (B == 8) {
    emit(i64(0), codes + k, n);
  } else {
    uint8_t q[kChunk];
    for (i64 i0 = 0; i0 < n; i0 += kChunk) {
      i64 m = std::min(kChunk, n - i0);
      unpack_codes<B>(codes, k + i0, m, q);
      emit(i0, static_cast<const uint8_t*>(q), m);
    }
  }
}

SPARQ_INLINE void round_row(float* v, i64 n, i64 round) {
  if (round == 1) {
    for (i64 c = 0; c < n; ++c) v[c] = static_cast<float>(static_cast<c10::Half>(v[c]));
  } else if (round == 2) {
    for (i64 c = 0; c < n; ++c) v[c] = static_cast<float>(static_cast<c10::BFloat16>(v[c]));
  }
}

// Row r decoded densely into dst[0, cols): pruned values 0.0, then rounded to the table's dtype.
template <int B>
SPARQ_INLINE void decode_dense(const Table& t, i64 r, i64 k0, float* dst) {
  const float s = t.scale(r);
  const float z = t.zero_point(r);
  if (t.masked) std::fill(dst, dst + t.cols, 0.0f);
  for_runs(t, r, k0, [&](i64 c0, i64 n, i64 k) __attribute__((always_inline)) {
    decode_codes<B>(t.codes, k, n, [&](i64 i0, const uint8_t* q, i64 m) __attribute__((always_inline)) {
      float* __restrict__ d = dst + c0 + i0;
      const uint8_t* __restrict__ qq = q;
      for (i64 i = 0; i < m; ++i) d[i] = (static_cast<float>(qq[i]) - z) * s;
    });
  });
  round_row(dst, t.cols, t.round);
}

// Calls f(j, k) for each kept block column j of row r (whole blocks of 4 columns, 8-bit codes,
// code number k of its first column): the common recommender layout, one 4-wide step each.
template <class F>
SPARQ_INLINE void for_blocks4(const Table& t, i64 r, i64 k, F&& f) {
  i64 pos0 = t.unit_of(r) * t.unit_bits;
  for (i64 j0 = 0; j0 < t.unit_bits; j0 += 56) {
    i64 take = std::min<i64>(56, t.unit_bits - j0);
    uint64_t w = load_bits(t.mask, t.mask_bytes, pos0 + j0) & ((uint64_t(1) << take) - 1);
    while (w) {
      f(j0 + __builtin_ctzll(w), k);
      k += 4;
      w &= w - 1;
    }
  }
}

// acc[c] += w * value for the kept values of row r (a float32 table: no rounding step).
// (W false: no per-sample weights; the multiplication by 1.0 is skipped, which is exact.)
template <int B, bool W>
SPARQ_INLINE void accumulate(const Table& t, i64 r, i64 k0, float w, float* acc) {
  const float s = t.scale(r);
  const float z = t.zero_point(r);
  if constexpr (B == 8) {
    if (t.masked && t.bw == 4 && t.wlast == 4) {
      // All four codes are read before the accumulator is written (uint8_t may alias float),
      // then one 4-wide vector step: the same float operations, element by element.
      const v4f zv = {z, z, z, z};
      const v4f sv = {s, s, s, s};
      const v4f wv = {w, w, w, w};
      for_blocks4(t, r, k0, [&](i64 j, i64 k) __attribute__((always_inline)) {
        v4u8 q8;
        std::memcpy(&q8, t.codes + k, sizeof(q8));
        const v4f qv = __builtin_convertvector(__builtin_convertvector(q8, v4i), v4f);
        float* a = acc + 4 * j;
        v4f av;
        std::memcpy(&av, a, sizeof(av));
        if constexpr (W) {
          av += wv * ((qv - zv) * sv);
        } else {
          av += (qv - zv) * sv;
        }
        std::memcpy(a, &av, sizeof(av));
      });
      return;
    }
  }
  for_runs(t, r, k0, [&](i64 c0, i64 n, i64 k) __attribute__((always_inline)) {
    decode_codes<B>(t.codes, k, n, [&](i64 i0, const uint8_t* q, i64 m) __attribute__((always_inline)) {
      float* __restrict__ a = acc + c0 + i0;
      const uint8_t* __restrict__ qq = q;
      if constexpr (W) {
        for (i64 i = 0; i < m; ++i) a[i] += w * ((static_cast<float>(qq[i]) - z) * s);
      } else {
        for (i64 i = 0; i < m; ++i) a[i] += (static_cast<float>(qq[i]) - z) * s;
      }
    });
  });
}

SPARQ_INLINE void prefetch_row(const Table& t, i64 r) {
  __builtin_prefetch(t.scale32 ? static_cast<const void*>(t.scale32 + r * t.qstride)
                               : static_cast<const void*>(t.scale16 + r * t.qstride));
  __builtin_prefetch(t.zp32 ? static_cast<const void*>(t.zp32 + r * t.qstride)
                            : static_cast<const void*>(t.zp16 + r * t.qstride));
  if (t.masked) {
    i64 u = t.unit_of(r);
    __builtin_prefetch(t.base + (u >> t.group_shift));
    __builtin_prefetch(t.mask + ((u * t.unit_bits) >> 3));
  } else {
    const uint8_t* p = t.codes + ((r * t.cols * t.bits) >> 3);
    i64 n = (t.cols * t.bits + 7) >> 3;
    for (i64 o = 0; o < n; o += 64) __builtin_prefetch(p + o);
  }
}

constexpr i64 kAhead = 8;   // lookups between prefetching a row's index, mask and qparams ...
constexpr i64 kRing = 16;   // ... and its codes (power of two, > kAhead)

template <int B>
SPARQ_INLINE void bag_chunk(const BagJob& job, i64 b0, i64 b1) {
  const Table& t = job.t;
  const i64 cols = t.cols;
  const bool dense = job.mode == 2 || t.round != 0;
  std::vector<float> tmp(dense ? cols : 0);
  const i64 n_bags_total = job.n_offs;  // bag b ends at offs[b + 1] if that exists, else n_idx
  const i64 first = job.offs[b0];
  const i64 last = b1 < n_bags_total ? job.offs[b1] : job.n_idx;
  // Prefetch pipeline over the flat index range of this chunk: at position i, the index data of
  // lookup i + 2 * kAhead and the codes of lookup i + kAhead (whose offset is then cached).
  i64 ring_row[kRing];
  i64 ring_off[kRing];
  for (i64 i = 0; i < kRing; ++i) ring_row[i] = -1;
  auto stage = [&](i64 i) __attribute__((always_inline)) {
    if (i + 2 * kAhead < last) {
      i64 r = job.idx[i + 2 * kAhead];
      if (r != job.pad) prefetch_row(t, r);
    }
    if (t.masked && i + kAhead < last) {
      i64 r = job.idx[i + kAhead];
      if (r != job.pad) {
        i64 off = row_offset(t, r);
        ring_row[(i + kAhead) & (kRing - 1)] = r;
        ring_off[(i + kAhead) & (kRing - 1)] = off;
        __builtin_prefetch(t.codes + ((off * t.bits) >> 3));
        __builtin_prefetch(t.codes + ((off * t.bits) >> 3) + 64);
      }
    }
  };
  for (i64 i = first; i < std::min(first + 2 * kAhead, last); ++i) {
    i64 r = job.idx[i];
    if (r != job.pad) prefetch_row(t, r);
  }
  for (i64 b = b0; b < b1; ++b) {
    const i64 s = job.offs[b];
    const i64 e = b + 1 < n_bags_total ? job.offs[b + 1] : job.n_idx;
    float* acc = job.out + b * cols;
    i64 count = 0;
    std::fill(acc, acc + cols, job.mode == 2 ? -std::numeric_limits<float>::infinity() : 0.0f);
    for (i64 i = s; i < e; ++i) {
      stage(i);
      const i64 r = job.idx[i];
      if (r == job.pad) continue;
      ++count;
      const i64 slot = i & (kRing - 1);
      const i64 k0 = !t.masked ? r * cols : ring_row[slot] == r ? ring_off[slot] : row_offset(t, r);
      if (job.mode == 2) {
        decode_dense<B>(t, r, k0, tmp.data());
        for (i64 c = 0; c < cols; ++c) acc[c] = std::max(acc[c], tmp[c]);
      } else {
        const float w = job.psw ? job.psw[i] : 1.0f;
        if (dense) {
          decode_dense<B>(t, r, k0, tmp.data());
          for (i64 c = 0; c < cols; ++c) acc[c] += w * tmp[c];
        } else {
          if (job.psw) {
            accumulate<B, true>(t, r, k0, w, acc);
          } else {
            accumulate<B, false>(t, r, k0, w, acc);
          }
        }
      }
    }
    if (count == 0) {
      std::fill(acc, acc + cols, 0.0f);
    } else if (job.mode == 1) {
      const float n = static_cast<float>(count);
      for (i64 c = 0; c < cols; ++c) acc[c] /= n;
    }
  }
}

template <int B>
SPARQ_INLINE void row_chunk(const RowJob& job, i64 i0, i64 i1) {
  const Table& t = job.t;
  for (i64 i = i0; i < i1; ++i) {
    if (i + kAhead < i1) prefetch_row(t, job.idx[i + kAhead]);
    const i64 r = job.idx[i];
    decode_dense<B>(t, r, row_offset(t, r), job.out + i * t.cols);
  }
}


#if SPARQ_AVX2_PATH
// Prefetch distances of the fast path (lookups ahead): the index entry, mask word and qparams
// kFastAhead1 ahead, the code offset and codes kFastAhead2 ahead (measured on a 1M-row table:
// 24/12 2-5 % faster than 16/8, 12/6 and 32/12 no better).
constexpr i64 kFastAhead1 = 24;
constexpr i64 kFastAhead2 = 12;
constexpr i64 kFastRing = 16;  // power of two, > kFastAhead2

// acc[0, 4) += the block whose codes start at q.
template <bool W>
SPARQ_AVX2 SPARQ_INLINE void block_step(const uint8_t* q, __m128 z4, __m128 s4, __m128 w4, float* a) {
  int32_t q4;
  std::memcpy(&q4, q, 4);
  __m128 v = _mm_mul_ps(_mm_sub_ps(_mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(q4))), z4), s4);
  if constexpr (W) v = _mm_mul_ps(w4, v);
  _mm_storeu_ps(a, _mm_add_ps(_mm_loadu_ps(a), v));
}

// acc[c0, c0 + 4) and acc[c1, c1 + 4) += two blocks whose 8 codes start at q: one 8-wide decode.
template <bool W>
SPARQ_AVX2 SPARQ_INLINE void pair_step(const uint8_t* q, __m256 zv, __m256 sv, __m256 wv, float* a0,
                                       float* a1) {
  __m256 v = _mm256_mul_ps(
      _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)))),
                    zv),
      sv);
  if constexpr (W) v = _mm256_mul_ps(wv, v);
  _mm_storeu_ps(a0, _mm_add_ps(_mm_loadu_ps(a0), _mm256_castps256_ps128(v)));
  _mm_storeu_ps(a1, _mm_add_ps(_mm_loadu_ps(a1), _mm256_extractf128_ps(v, 1)));
}

// The bag path of the common recommender layout on AVX2: 8-bit codes, a (1, 4) block mask over
// whole blocks (columns a multiple of 4), at most 56 blocks per row (224 columns), float32 scales
// and zero points, a float32 table, sum or mean. Everything is specialised and hoisted into
// locals (an accumulator store could otherwise alias the table's fields and force reloads); a
// row's first code comes from the group index plus two unchecked 64-bit mask words (rows near the
// end of the mask take the checked path), and its kept blocks are decoded two at a time, one
// 8-wide convert-subtract-multiply per pair of kept blocks, each half added to its block's
// columns: the same float operations, in the same order per column, as the scalar code.
template <bool W>
SPARQ_AVX2 __attribute__((noinline)) void bag_chunk_b8w4(const BagJob& job, i64 b0, i64 b1) {
  // Everything the loop reads, in locals: stores to the accumulator cannot alias them.
  const Table t = job.t;
  const uint8_t* const codes = t.codes;
  const uint8_t* const mask = t.mask;
  const i64 mask_bytes = t.mask_bytes;
  const i64* const base = t.base;
  const float* const qp = t.scale32;  // scale at qp[r * qs], zero point at zp[r * qs]
  const float* const zp = t.zp32;
  const i64 qs = t.qstride;
  const i64 cols = t.cols;
  const i64 ub = t.unit_bits;
  const uint64_t word_mask = (uint64_t(1) << ub) - 1;
  const int gs = t.group_shift;
  const i64 gmask = ~((i64(1) << gs) - 1);
  // Rows whose group's mask bits and own mask word can be read without a bounds check.
  i64 safe_rows = t.rows;
  while (safe_rows > 0 && (((safe_rows - 1) * ub) >> 3) + 16 > mask_bytes) --safe_rows;
  const i64* const idx = job.idx;
  const i64 pad = job.pad;
  const float* const psw = job.psw;
  const i64 n_bags_total = job.n_offs;
  const i64 first = job.offs[b0];
  const i64 last = b1 < n_bags_total ? job.offs[b1] : job.n_idx;
  constexpr i64 R = kFastRing;
  constexpr i64 d1 = kFastAhead1;
  constexpr i64 d2 = kFastAhead2;
  i64 ring_row[R];
  i64 ring_off[R];
  uint64_t ring_bits[R];
  for (i64 i = 0; i < R; ++i) ring_row[i] = -1;
  auto word = [&](i64 pos) __attribute__((always_inline)) {
    uint64_t w;
    std::memcpy(&w, mask + (pos >> 3), 8);
    return w >> (pos & 7);
  };
  // Row r's first code number and mask bits.
  auto locate = [&](i64 r, uint64_t& bits) __attribute__((always_inline)) {
    if (__builtin_expect(r < safe_rows, 1)) {
      const i64 g0 = r & gmask;
      const i64 pos = g0 * ub;
      const i64 before = (r - g0) * ub;  // <= 128 - ub
      const i64 n1 = std::min<i64>(before, 56);
      const i64 n2 = std::min<i64>(before - n1, 56);
      const uint64_t w0 = word(pos) & ((uint64_t(1) << n1) - 1);
      const uint64_t w1 = word(pos + 56) & ((uint64_t(1) << n2) - 1);
      // Past 112 bits (narrow rows: up to 127 bits before the row) a third word, read only
      // then: it starts before the row's own word, so it is in bounds too.
      const i64 n3 = before - n1 - n2;
      const uint64_t w2 = n3 > 0 ? word(pos + 112) & ((uint64_t(1) << n3) - 1) : 0;
      bits = word(r * ub) & word_mask;
      return base[r >> gs] + 4 * i64(__builtin_popcountll(w0) + __builtin_popcountll(w1) +
                                     __builtin_popcountll(w2));
    }
    bits = load_bits(mask, mask_bytes, r * ub) & word_mask;
    return row_offset(t, r);
  };
  auto prefetch = [&](i64 r) __attribute__((always_inline)) {
    __builtin_prefetch(qp + r * qs);
    __builtin_prefetch(base + (r >> gs));
    __builtin_prefetch(mask + ((r * ub) >> 3));
  };
  for (i64 i = first; i < std::min(first + d1, last); ++i) {
    const i64 r = idx[i];
    if (r != pad) prefetch(r);
  }
  for (i64 b = b0; b < b1; ++b) {
    const i64 s0 = job.offs[b];
    const i64 e = b + 1 < n_bags_total ? job.offs[b + 1] : job.n_idx;
    float* const acc = job.out + b * cols;
    i64 count = 0;
    std::fill(acc, acc + cols, 0.0f);
    for (i64 i = s0; i < e; ++i) {
      if (i + d1 < last) {
        const i64 r = idx[i + d1];
        if (r != pad) prefetch(r);
      }
      if (i + d2 < last) {
        const i64 r = idx[i + d2];
        if (r != pad) {
          uint64_t bits;
          const i64 off = locate(r, bits);
          const i64 sl = (i + d2) & (R - 1);
          ring_row[sl] = r;
          ring_off[sl] = off;
          ring_bits[sl] = bits;
          const uint8_t* p = codes + off;
          __builtin_prefetch(p);
          // The row's first and last code: its second cache line only where it has one (a
          // branch on that was slower, mispredicted; a fixed second line was wasted on most rows).
          __builtin_prefetch(p + 4 * __builtin_popcountll(bits) - 1);
        }
      }
      const i64 r = idx[i];
      if (r == pad) continue;
      ++count;
      const i64 slot = i & (R - 1);
      uint64_t bits;
      i64 k;
      if (ring_row[slot] == r) {
        k = ring_off[slot];
        bits = ring_bits[slot];
      } else {
        k = locate(r, bits);
      }
      const __m256 zv = _mm256_set1_ps(zp[r * qs]);
      const __m256 sv = _mm256_set1_ps(qp[r * qs]);
      const __m256 wv = _mm256_set1_ps(W ? psw[i] : 1.0f);
      const __m128 z4 = _mm256_castps256_ps128(zv);
      const __m128 s4 = _mm256_castps256_ps128(sv);
      const __m128 w4 = _mm256_castps256_ps128(wv);
      const int n = __builtin_popcountll(bits);
      for (int p = 0; p + 1 < n; p += 2) {
        const i64 c0 = 4 * __builtin_ctzll(bits);
        bits &= bits - 1;
        const i64 c1 = 4 * __builtin_ctzll(bits);
        bits &= bits - 1;
        pair_step<W>(codes + k, zv, sv, wv, acc + c0, acc + c1);
        k += 8;
      }
      if (bits) block_step<W>(codes + k, z4, s4, w4, acc + 4 * __builtin_ctzll(bits));
    }
    if (count == 0) {
      std::fill(acc, acc + cols, 0.0f);
    } else if (job.mode == 1) {
      const float n = static_cast<float>(count);
      for (i64 c = 0; c < cols; ++c) acc[c] /= n;
    }
  }
}
#endif

}  // namespace sparq_nn

#define SPARQ_DEFINE(B)                                                                         \
  SPARQ_CLONES void sparq_bag_chunk_##B(const sparq_nn::BagJob& job, int64_t b0, int64_t b1) { \
    sparq_nn::bag_chunk<B>(job, b0, b1);                                                        \
  }                                                                                             \
  SPARQ_CLONES void sparq_row_chunk_##B(const sparq_nn::RowJob& job, int64_t i0, int64_t i1) { \
    sparq_nn::row_chunk<B>(job, i0, i1);                                                        \
  }
SPARQ_DEFINE(1)
SPARQ_DEFINE(2)
SPARQ_DEFINE(3)
SPARQ_DEFINE(4)
SPARQ_DEFINE(5)
SPARQ_DEFINE(6)
SPARQ_DEFINE(7)
SPARQ_DEFINE(8)

namespace sparq_nn {

using BagFn = void (*)(const BagJob&, int64_t, int64_t);
using RowFn = void (*)(const RowJob&, int64_t, int64_t);
static const BagFn kBag[8] = {sparq_bag_chunk_1, sparq_bag_chunk_2, sparq_bag_chunk_3,
                              sparq_bag_chunk_4, sparq_bag_chunk_5, sparq_bag_chunk_6,
                              sparq_bag_chunk_7, sparq_bag_chunk_8};
static const RowFn kRow[8] = {sparq_row_chunk_1, sparq_row_chunk_2, sparq_row_chunk_3,
                              sparq_row_chunk_4, sparq_row_chunk_5, sparq_row_chunk_6,
                              sparq_row_chunk_7, sparq_row_chunk_8};

static const uint8_t* bytes_of(const at::Tensor& x) {
  return x.numel() ? x.data_ptr<uint8_t>() : nullptr;
}

// geometry: rows, cols, bits, masked, bh, bw, unit_bits, wlast, group, round
static Table make_table(const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& zero_point, const at::Tensor& mask,
                        const at::Tensor& base, const std::vector<int64_t>& g) {
  TORCH_CHECK(g.size() == 10, "sparq kernel: bad geometry");
  TORCH_CHECK(codes.device().is_cpu() && scale.device().is_cpu() && zero_point.device().is_cpu() &&
                  mask.device().is_cpu() && base.device().is_cpu(),
              "sparq kernel: the table must be on the CPU");
  TORCH_CHECK(codes.is_contiguous() && mask.is_contiguous() && base.is_contiguous(),
              "sparq kernel: storage must be contiguous");
  TORCH_CHECK(scale.dim() == 1 && zero_point.dim() == 1 && scale.stride(0) == zero_point.stride(0) &&
                  scale.scalar_type() == zero_point.scalar_type() &&
                  (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
              "sparq kernel: scale and zero point must be float32 or float16 vectors of one stride");
  Table t;
  t.codes = bytes_of(codes);
  const bool half = scale.scalar_type() == at::kHalf;
  t.scale32 = half ? nullptr : scale.data_ptr<float>();
  t.scale16 = half ? scale.data_ptr<at::Half>() : nullptr;
  t.zp32 = half ? nullptr : zero_point.data_ptr<float>();
  t.zp16 = half ? zero_point.data_ptr<at::Half>() : nullptr;
  t.qstride = scale.stride(0);
  t.mask = bytes_of(mask);
  t.mask_bytes = mask.numel();
  t.base = base.numel() ? base.data_ptr<int64_t>() : nullptr;
  t.rows = g[0];
  t.cols = g[1];
  t.bits = g[2];
  t.masked = g[3];
  t.bh = g[4];
  t.bw = g[5];
  t.unit_bits = g[6];
  t.wlast = g[7];
  t.group = g[8];
  t.bh_shift = -1;
  for (int b = 0; b < 62; ++b) {
    if ((i64(1) << b) == t.bh) t.bh_shift = b;
  }
  t.group_shift = 0;
  while ((i64(1) << t.group_shift) < t.group) ++t.group_shift;
  TORCH_CHECK((i64(1) << t.group_shift) == t.group, "sparq kernel: group must be a power of two");
  t.round = g[9];
  TORCH_CHECK(t.bits >= 1 && t.bits <= 8, "sparq kernel: bits must be 1..8");
  return t;
}

static void check_indices(const int64_t* idx, int64_t n, int64_t rows) {
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, idx[i]);
    hi = std::max(hi, idx[i]);
  }
  if (n == 0 || (lo >= 0 && hi < rows)) return;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < rows, "index ", idx[i], " at position ", i,
                      " is out of range for a table of ", rows, " rows");
  }
}

}  // namespace sparq_nn

at::Tensor embedding_bag_forward(at::Tensor codes, at::Tensor scale, at::Tensor zero_point,
                                 at::Tensor mask, at::Tensor base, std::vector<int64_t> geometry,
                                 at::Tensor indices, at::Tensor offsets,
                                 at::Tensor per_sample_weights, int64_t mode,
                                 int64_t padding_idx, bool include_last_offset) {
  using namespace sparq_nn;
  Table t = make_table(codes, scale, zero_point, mask, base, geometry);
  TORCH_CHECK(indices.device().is_cpu() && offsets.device().is_cpu() &&
                  per_sample_weights.device().is_cpu(),
              "sparq kernel: indices, offsets and weights must be CPU tensors");
  at::Tensor idx = indices.to(at::kLong).contiguous();
  at::Tensor offs = offsets.to(at::kLong).contiguous();
  const int64_t n_idx = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* op = offs.data_ptr<int64_t>();
  int64_t n_offs = offs.numel();
  int64_t n_bags = include_last_offset ? std::max<int64_t>(n_offs - 1, 0) : n_offs;
  for (int64_t b = 0; b < n_offs; ++b) {
    TORCH_CHECK(b > 0 || op[0] == 0, "offsets[0] has to be 0, i.e., the first sequence in the "
                "mini-batch has to start from position 0. However, got ", op[0]);
    TORCH_CHECK(b == 0 || op[b] >= op[b - 1], "offsets must be non-decreasing, but offsets[",
                b, "] = ", op[b], " < offsets[", b - 1, "] = ", op[b - 1]);
    TORCH_CHECK(op[b] <= n_idx, "offsets[", b, "] = ", op[b],
                " can not be greater than input's length ", n_idx);
  }
  check_indices(ip, n_idx, t.rows);
  at::Tensor psw;
  const float* pw = nullptr;
  if (per_sample_weights.numel()) {
    TORCH_CHECK(per_sample_weights.numel() == n_idx, "per_sample_weights must have one weight per index");
    psw = per_sample_weights.to(at::kFloat).contiguous();
    pw = psw.data_ptr<float>();
  }
  at::Tensor out = at::empty({n_bags, t.cols}, at::kFloat);
  if (n_bags == 0 || t.cols == 0) return out.zero_();
  // Bag b ends at offsets[b + 1] where that exists, else at the end of the input (with
  // include_last_offset every bag has its end in offsets).
  BagJob job{t, ip, op, n_idx, n_offs, pw, mode, padding_idx, out.data_ptr<float>()};
  BagFn fn = kBag[t.bits - 1];
#if SPARQ_AVX2_PATH
  if (t.bits == 8 && t.masked && t.bh == 1 && t.bw == 4 && t.wlast == 4 && t.unit_bits <= 56 &&
      t.group * t.unit_bits <= 128 && t.round == 0 && t.scale32 && mode != 2 &&
      __builtin_cpu_supports("avx2")) {
    fn = pw ? bag_chunk_b8w4<true> : bag_chunk_b8w4<false>;
  }
#endif
  const int64_t avg = std::max<int64_t>(1, n_idx / std::max<int64_t>(1, n_bags));
  const int64_t grain = std::max<int64_t>(1, 2048 / (avg * std::max<int64_t>(1, t.cols / 16)));
  if (n_bags <= grain) {
    fn(job, 0, n_bags);
  } else {
    at::parallel_for(0, n_bags, grain, [&](int64_t b0, int64_t b1) { fn(job, b0, b1); });
  }
  return out;
}

at::Tensor embedding_forward(at::Tensor codes, at::Tensor scale, at::Tensor zero_point,
                             at::Tensor mask, at::Tensor base, std::vector<int64_t> geometry,
                             at::Tensor indices) {
  using namespace sparq_nn;
  Table t = make_table(codes, scale, zero_point, mask, base, geometry);
  TORCH_CHECK(indices.device().is_cpu(), "sparq kernel: indices must be a CPU tensor");
  at::Tensor idx = indices.reshape({-1}).to(at::kLong).contiguous();
  const int64_t n = idx.numel();
  check_indices(idx.data_ptr<int64_t>(), n, t.rows);
  at::Tensor out = at::empty({n, t.cols}, at::kFloat);
  if (n == 0 || t.cols == 0) return out;
  RowJob job{t, idx.data_ptr<int64_t>(), out.data_ptr<float>()};
  RowFn fn = kRow[t.bits - 1];
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, t.cols));
  if (n <= grain) {
    fn(job, 0, n);
  } else {
    at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) { fn(job, i0, i1); });
  }
  return out;
}

"""
