// The hot loops of EConv and EFC (NeuralMerger eq. 9) for one instruction set; see lookup.h.
//
// Compiled once per set by kernels/build.py: ONNXMERGE_ISA names the namespace, ONNXMERGE_VEC is the
// vector width in floats, the compiler flags pick the instructions. Vectors are GCC vector extensions
// loaded and stored with memcpy: contiguous loads only. The file is compiled with -fno-tree-vectorize
// so that the compiler never turns the scalar table lookups of EFC into vector gathers (slower than
// scalar loads on the CPUs measured here; DESIGN.md "Kernels"); every vector loop is written as one.
//
// Both ops run in two phases per block of work:
//   1. tables: T[v][c][.] = <codeword c of segment v, the input's segment v> for every position, a
//      vectorised multiply-add over contiguous positions (pixels for EConv, samples for EFC);
//   2. lookups: each output adds, per segment and kernel offset, the table entries its code picks
//      (eq. 9). For EConv that is a whole table row, shifted: contiguous vector adds, accumulated in
//      registers over all segments and kernel offsets before one store (at stride 1 over a tile's
//      outputs on the padded grid, row after row: EConvPlan::flat); or, for float tables whose
//      segment fits L1 over a few rows (EConvPlan::channels), over a few segments for 8 output
//      channels at a time, every channel before the next few segments, so that the table rows
//      loaded stay in L1 from one channel to the next.
// Tables are built for groups of segments (and tiles of rows or samples) that fit a core's L2 cache;
// the items of each phase are spread over onnxruntime's intra-op threads (Parallel), or, for an
// EConv of several samples, the samples. EConv's tables may be int16 / int8 (EConvParams::table_bits):
// the same sums, rounded to integers on store, added as integers per segment and scaled once.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "lookup.h"

#if !defined(ONNXMERGE_ISA) || !defined(ONNXMERGE_VEC)
#error "compile with -DONNXMERGE_ISA=<namespace> -DONNXMERGE_VEC=<floats per vector> (kernels/build.py)"
#endif

namespace onnxmerge {
namespace ONNXMERGE_ISA {
namespace {

constexpr int64_t VEC = ONNXMERGE_VEC;
typedef float vec __attribute__((vector_size(VEC * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
typedef int32_t ivec __attribute__((vector_size(VEC * sizeof(int32_t))));
// s in every lane: one broadcast (vec{} + s is an add then a broadcast: 0 + s is not s for s = -0)
inline vec splat(float s) { return __builtin_shuffle(vec{s}, ivec{}); }

// Block sizes from this CPU's caches (cache_sizes(), read at run time), in the proportions measured
// best on Zen 4 (32 KiB L1d, 1 MiB L2): EFC at batch 1 keeps a block of scalar tables in half of L1d
// (16 KiB there); EFC in batches a block of tables in an eighth of L2 (128 KiB there, the best of
// 32 KiB .. 1 MiB).
int64_t l1_table_bytes() { return cache_sizes().l1d / 2; }
int64_t efc_tile_bytes() { return cache_sizes().l2 / 8; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split `total` units into at most `max_items` items of at least `min_unit` units.
int64_t block_size(int64_t total, int64_t max_items, int64_t min_unit = 1) {
  return std::max(min_unit, ceil_div(total, max_items));
}

// ---------------------------------------------------------------------------------------------
// EConv

// Table entries of type T: float, or int16_t / int8_t (EConvParams::table_bits), stored as
// rint(a * inv) clamped to +-Q, inv a power of two (EConvLayer::seg_bound), so that a * inv is exact
// whether or not the compiler fuses it with the rounding's add. Rounding: adding and subtracting
// 1.5 * 2^23 rounds a float of magnitude below 2^22 to the nearest integer, ties to even (numpy's rint).
template <typename T>
struct Entries {
  typedef T type __attribute__((vector_size(VEC * sizeof(T))));
};

// 32-bit integers to T entries at p, and T entries at p to 32-bit integers: a widening load and a
// narrowing store of the instruction set (the vector extensions' conversions between element sizes
// become scalar code), else the vector extensions' conversion.
template <typename T>
inline void store_entries(T* p, ivec i) {
#if defined(__AVX512F__)  // (the maskz forms: the plain ones trip GCC 12's -Wmaybe-uninitialized in its header)
  if constexpr (sizeof(T) == 1)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_maskz_cvtepi32_epi8(0xFFFF, reinterpret_cast<__m512i>(i)));
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_maskz_cvtepi32_epi16(0xFFFF, reinterpret_cast<__m512i>(i)));
#elif defined(__AVX2__)
  const __m256i w = reinterpret_cast<__m256i>(i);
  const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));  // 8 x int16
  if constexpr (sizeof(T) == 1)
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(h, h));
  else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#elif defined(__ARM_NEON) && ONNXMERGE_VEC == 4
  const int16x4_t h = vmovn_s32(reinterpret_cast<int32x4_t>(i));
  if constexpr (sizeof(T) == 1)
    vst1_lane_s32(reinterpret_cast<int32_t*>(p), vreinterpret_s32_s8(vmovn_s16(vcombine_s16(h, h))), 0);
  else
    vst1_s16(reinterpret_cast<int16_t*>(p), h);
#else
  const auto t = __builtin_convertvector(i, typename Entries<T>::type);
  std::memcpy(p, &t, sizeof t);
#endif
}

template <typename T>
inline ivec load_entries(const T* p) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 1)
    return reinterpret_cast<ivec>(
        _mm512_maskz_cvtepi8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  else
    return reinterpret_cast<ivec>(
        _mm512_maskz_cvtepi16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 1)
    return reinterpret_cast<ivec>(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  else
    return reinterpret_cast<ivec>(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__ARM_NEON) && ONNXMERGE_VEC == 4
  if constexpr (sizeof(T) == 1) {
    int32_t four;
    std::memcpy(&four, p, sizeof four);
    return reinterpret_cast<ivec>(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four))))));
  } else {
    return reinterpret_cast<ivec>(vmovl_s16(vld1_s16(reinterpret_cast<const int16_t*>(p))));
  }
#else
  typename Entries<T>::type t;
  std::memcpy(&t, p, sizeof t);
  return __builtin_convertvector(t, ivec);
#endif
}

// int8 entries on x86 are summed per segment as 16-bit integers, 2 * VEC to a vector: one widening
// load (vpmovsxbw) per two float vectors where 32-bit sums take one per vector, and half the
// registers for the sums. Exact while a segment's sum cannot leave int16: entries are within +-127,
// so for at most kSum16Taps kernel offsets; larger kernels sum in 32 bits.
#if defined(__AVX512BW__) || defined(__AVX2__)
#define ONNXMERGE_SUM16 1
constexpr int64_t kSum16Taps = std::numeric_limits<int16_t>::max() / std::numeric_limits<int8_t>::max();
typedef int16_t svec __attribute__((vector_size(2 * VEC * sizeof(int16_t))));

inline svec load_entries16(const int8_t* p) {
#if defined(__AVX512BW__)
  return reinterpret_cast<svec>(
      _mm512_maskz_cvtepi8_epi16(0xFFFFFFFFu, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  return reinterpret_cast<svec>(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
}

// the first and the last VEC of s's 16-bit integers as 32-bit integers
inline void widen16(svec s, ivec& first, ivec& last) {
#if defined(__AVX512BW__)
  const __m512i w = reinterpret_cast<__m512i>(s);
  first = reinterpret_cast<ivec>(_mm512_maskz_cvtepi16_epi32(0xFFFF, _mm512_maskz_extracti64x4_epi64(0xF, w, 0)));
  last = reinterpret_cast<ivec>(_mm512_maskz_cvtepi16_epi32(0xFFFF, _mm512_maskz_extracti64x4_epi64(0xF, w, 1)));
#else
  const __m256i w = reinterpret_cast<__m256i>(s);
  first = reinterpret_cast<ivec>(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(w)));
  last = reinterpret_cast<ivec>(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(w, 1)));
#endif
}
#endif

template <typename T>
inline void put(T* p, vec a, float inv) {
  if constexpr (std::is_same_v<T, float>) {
    store(p, a);
  } else {
    const vec magic = splat(12582912.0f), top = splat(static_cast<float>(std::numeric_limits<T>::max()));
    vec q = (a * splat(inv) + magic) - magic;
    q = q > top ? top : q;
    q = q < -top ? -top : q;
    store_entries(p, __builtin_convertvector(q, ivec));
  }
}

// put for 4 vectors at p (4 * VEC entries). On AVX2 and AVX-512 the integer entries of the 4 are
// rounded by the conversion instruction (round to nearest even, the default rounding mode: numpy's
// rint), narrowed together by saturating packs and clamped below at -Q once: 4 converts, 3 packs, a
// permute and a clamp per 4 vectors of int8 entries, where put's rounding and clamps took 11
// instructions per vector, more than the table's multiply-adds at r = 8 (the table phase of a
// 64-channel 3x3 layer was half of its int8 run on Zen 3; with AVX-512 on an Intel Xeon, int8 light,
// 64 channels 3x3 at 32x32 ran 238 -> 216 us, 512 channels 1x1 at 13x13 453 -> 373 us). Same entries:
// |a * inv| <= Q by the scale's bound (EConvLayer::seg_bound), so the packs' saturation above never
// binds; a NaN entry (a non-finite input, whose outputs are NaN through the scale) stores -Q here,
// -Q - 1 in put.
template <typename T>
inline void put4(T* p, const vec (&a)[4], float inv) {
#if defined(__AVX2__) && ONNXMERGE_VEC == 8
  if constexpr (!std::is_same_v<T, float>) {
    const __m256 s = _mm256_set1_ps(inv);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(reinterpret_cast<__m256>(a[j]), s));
    // packs work within 128-bit lanes: [a0 lo, a1 lo, a0 hi, a1 hi] as 16-bit, so a permute restores order
    const __m256i h01 = _mm256_packs_epi32(i[0], i[1]), h23 = _mm256_packs_epi32(i[2], i[3]);
    if constexpr (sizeof(T) == 1) {
      const __m256i b =
          _mm256_permutevar8x32_epi32(_mm256_packs_epi16(h01, h23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_max_epi8(b, _mm256_set1_epi8(-127)));
    } else {
      const __m256i floor = _mm256_set1_epi16(-32767);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_max_epi16(_mm256_permute4x64_epi64(h01, 0xD8), floor));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 2 * VEC),
                          _mm256_max_epi16(_mm256_permute4x64_epi64(h23, 0xD8), floor));
    }
    return;
  }
#elif defined(__AVX512BW__) && ONNXMERGE_VEC == 16
  // the same with AVX-512's four 128-bit lanes: the permutes take lane L of vector j, at 4 * L + j
  // after the packs, to 4 * j + L (maskz forms: see store_entries)
  if constexpr (!std::is_same_v<T, float>) {
    const __m512 s = _mm512_set1_ps(inv);
    __m512i i[4];
    for (int j = 0; j < 4; ++j)
      i[j] = _mm512_maskz_cvtps_epi32(0xFFFF, _mm512_mul_ps(reinterpret_cast<__m512>(a[j]), s));
    const __m512i h01 = _mm512_packs_epi32(i[0], i[1]), h23 = _mm512_packs_epi32(i[2], i[3]);
    if constexpr (sizeof(T) == 1) {
      const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      const __m512i b = _mm512_maskz_permutexvar_epi32(0xFFFF, order, _mm512_packs_epi16(h01, h23));
      _mm512_storeu_si512(p, _mm512_max_epi8(b, _mm512_set1_epi8(-127)));
    } else {
      const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), floor = _mm512_set1_epi16(-32767);
      _mm512_storeu_si512(p, _mm512_max_epi16(_mm512_maskz_permutexvar_epi64(0xFF, order, h01), floor));
      _mm512_storeu_si512(p + 2 * VEC, _mm512_max_epi16(_mm512_maskz_permutexvar_epi64(0xFF, order, h23), floor));
    }
    return;
  }
#endif
  for (int j = 0; j < 4; ++j) put(p + j * VEC, a[j], inv);
}

// Phase 1 for CB codewords at once: T[c][q] for the codewords whose weights start at w (r apart)
// and planes at t (plane apart). A block of CB codewords by 4 vectors of positions: each input
// vector loaded feeds CB multiply-adds, where one codeword at a time loaded an input vector per
// multiply-add (the loads, not the multiply-adds, bounded the phase).
template <typename T, int CB>
void econv_tables_block(const float* x, int64_t chan, const float* w, int64_t r, int64_t depth, int64_t span,
                        float inv, T* t, int64_t plane) {
  int64_t q = 0;
  for (; q + 4 * VEC <= span; q += 4 * VEC) {
    vec a[CB][4];
    for (int cb = 0; cb < CB; ++cb)
      for (int j = 0; j < 4; ++j) a[cb][j] = splat(0.0f);
    for (int64_t k = 0; k < depth; ++k) {
      const float* xk = x + k * chan + q;
      const vec x0 = load(xk), x1 = load(xk + VEC), x2 = load(xk + 2 * VEC), x3 = load(xk + 3 * VEC);
      for (int cb = 0; cb < CB; ++cb) {
        const vec wk = splat(w[cb * r + k]);
        a[cb][0] += wk * x0;
        a[cb][1] += wk * x1;
        a[cb][2] += wk * x2;
        a[cb][3] += wk * x3;
      }
    }
    for (int cb = 0; cb < CB; ++cb)
      put4(t + cb * plane + q, a[cb], inv);
  }
  for (; q < span; q += VEC) {
    vec a[CB];
    for (int cb = 0; cb < CB; ++cb) a[cb] = splat(0.0f);
    for (int64_t k = 0; k < depth; ++k) {
      const vec xk = load(x + k * chan + q);
      for (int cb = 0; cb < CB; ++cb) a[cb] += splat(w[cb * r + k]) * xk;
    }
    for (int cb = 0; cb < CB; ++cb) put(t + cb * plane + q, a[cb], inv);
  }
}

// codewords per block of phase 1: CB x 4 sums in the registers, the inputs read by the multiply-adds
// from L1: 4 with AVX-512's 32 vector registers; 3 with AVX2's 16 (12 sums: on Zen 3 the 8 sums of 2
// codewords left the two FMA pipes waiting on their 4-cycle latency; 3 took the table phase of a
// 64-channel 3x3 layer from 52 to 46% of its int8 run, a C++ timing harness); 2 elsewhere (NEON's 32
// registers would hold 4: not measured)
constexpr int kTableCodewords = VEC == 16 ? 4 : VEC == 8 ? 3 : 2;

// Phase 1 for segment v, codewords [c0, c1): T[c][q] = sum_k codebook[v][c][k] * xp[v*r + k][first + q]
// for q < span (a multiple of VEC), where xp is the padded input [d][chan] and t is codeword 0's plane;
// integer entries scaled by inv (put). The sum runs over k in order from 0, one multiply-add per k.
template <typename T>
void econv_tables(const EConvLayer& L, const EConvPlan& P, const float* xp, int64_t chan, int64_t v, int64_t c0,
                  int64_t c1, int64_t first, int64_t span, float inv, T* t) {
  const EConvParams& s = L.s;
  const int64_t depth = std::clamp<int64_t>(s.d - v * s.r, 0, s.r);
  const float* x = xp + v * s.r * chan + first;
  const float* w = L.codebook.data() + v * s.C * s.r;
  int64_t c = c0;
  // whole blocks, but two pairs rather than a block of 3 and a single codeword
  for (; c + kTableCodewords <= c1 && (kTableCodewords != 3 || c1 - c != 4); c += kTableCodewords)
    econv_tables_block<T, kTableCodewords>(x, chan, w + c * s.r, s.r, depth, span, inv, t + c * P.plane, P.plane);
  for (; c + 2 <= c1; c += 2)
    econv_tables_block<T, 2>(x, chan, w + c * s.r, s.r, depth, span, inv, t + c * P.plane, P.plane);
  for (; c < c1; ++c) econv_tables_block<T, 1>(x, chan, w + c * s.r, s.r, depth, span, inv, t + c * P.plane, P.plane);
}

// How segment v's integer sums join the float sums of the lookups (segment_runs): its own scale, and
// for int8 sums in 16 bits the run of segments it is summed with: the run's scale (2^ of the least
// exponent of its segments' scales), the left shift that takes v's sums to it, and whether the run
// ends at v.
struct SegmentRun {
  float scale = 1.0f, run_scale = 1.0f;
  int shift = 0;
  bool last = true;
  // where v starts a pair of its run (EFC's shuffles take a run's segments two at a time from its
  // first): the pair's multipliers as bytes, 2^shift of v low and of v + 1 high (0 where v is alone)
  int16_t pair = 1;
};

#ifdef ONNXMERGE_SUM16
// econv_lookup for int8 entries summed in 16 bits (K == 2: one 16-bit vector covers both float
// vectors of a row): the run's sums so far (run) in registers, a segment at the run's scale added
// straight into them, another (shifted left by the difference of the scales' exponents) through its
// own sums; the float sums stay in y, read and written where a run (or the group) ends, so that the
// registers hold twice the rows (the float sums held in registers spilled the 16-bit ones).
template <int RB>
void econv_lookup_sum16(float* y, int64_t ystride, bool init, float bias, const int8_t* t, int64_t rowstep,
                        int64_t segs, int64_t seg_stride, const int32_t* off, int64_t taps, const SegmentRun* seg) {
  svec run[RB] = {};
  for (int64_t v = 0; v < segs; ++v) {
    const int8_t* tv = t + v * seg_stride;
    const int32_t* ov = off + v * taps;
    const int shift = seg[v].shift;
    if (shift == 0) {
      for (int64_t i = 0; i < taps; ++i)
        for (int rb = 0; rb < RB; ++rb) run[rb] += load_entries16(tv + ov[i] + rb * rowstep);
    } else {
      svec sum[RB] = {};
      for (int64_t i = 0; i < taps; ++i)
        for (int rb = 0; rb < RB; ++rb) sum[rb] += load_entries16(tv + ov[i] + rb * rowstep);
      for (int rb = 0; rb < RB; ++rb) run[rb] += sum[rb] << shift;
    }
    if (seg[v].last || v == segs - 1) {
      const vec sv = splat(seg[v].run_scale);
      for (int rb = 0; rb < RB; ++rb) {
        ivec first, last;
        widen16(run[rb], first, last);
        float* yr = y + rb * ystride;
        const vec a0 = init ? splat(bias) : load(yr), a1 = init ? splat(bias) : load(yr + VEC);
        store(yr, a0 + __builtin_convertvector(first, vec) * sv);
        store(yr + VEC, a1 + __builtin_convertvector(last, vec) * sv);
        run[rb] = svec{};
      }
      init = false;
    }
  }
}
#endif

// Phase 2 for RB output rows of K vectors: y[rb][.] (+)= sum over the group's segments and kernel
// offsets of the table row each code picks. t points at the group's tables, shifted to the first
// output row and column; a segment's offsets (code plane + kernel offset) are at off[v * taps ..].
// Integer entries are summed per segment as integers (exact: 16-bit for int8 on x86 where the
// segment's offsets allow, ONNXMERGE_SUM16, else 32-bit) and added to the float sums scaled by the
// segment's scale (a power of two: exact), in segment order; int8 sums in 16 bits go on together over
// a run of segments (segment_runs), each shifted to the run's least scale, and join the float sums
// once a run (or the group) ends.
template <typename T, int RB, int K>
void econv_lookup(float* y, int64_t ystride, bool init, float bias, const T* t, int64_t rowstep, int64_t segs,
                  int64_t seg_stride, const int32_t* off, int64_t taps, const SegmentRun* seg) {
#ifdef ONNXMERGE_SUM16
  if constexpr (std::is_same_v<T, int8_t> && K == 2)
    if (taps <= kSum16Taps)
      return econv_lookup_sum16<RB>(y, ystride, init, bias, t, rowstep, segs, seg_stride, off, taps, seg);
#endif
  vec acc[RB][K];
  for (int rb = 0; rb < RB; ++rb)
    for (int k = 0; k < K; ++k) acc[rb][k] = init ? splat(bias) : load(y + rb * ystride + k * VEC);
  for (int64_t v = 0; v < segs; ++v) {
    const T* tv = t + v * seg_stride;
    const int32_t* ov = off + v * taps;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < taps; ++i) {
        const float* src = tv + ov[i];
        for (int rb = 0; rb < RB; ++rb)
          for (int k = 0; k < K; ++k) acc[rb][k] += load(src + rb * rowstep + k * VEC);
      }
    } else {
      ivec sum[RB][K] = {};
      for (int64_t i = 0; i < taps; ++i) {
        const T* src = tv + ov[i];
        for (int rb = 0; rb < RB; ++rb)
          for (int k = 0; k < K; ++k) sum[rb][k] += load_entries(src + rb * rowstep + k * VEC);
      }
      const vec sv = splat(seg[v].scale);
      for (int rb = 0; rb < RB; ++rb)
        for (int k = 0; k < K; ++k) acc[rb][k] += __builtin_convertvector(sum[rb][k], vec) * sv;
    }
  }
  for (int rb = 0; rb < RB; ++rb)
    for (int k = 0; k < K; ++k) store(y + rb * ystride + k * VEC, acc[rb][k]);
}

// Phase 2 for float tables, OB output channels at once over one run of K vectors of positions:
// y[ob][.] (+)= sum over `segs` segments and the kernel offsets of the table run each channel's code
// picks. Channel ob's outputs are at y + ob * ychan, its offsets at off + ob * ochan (+ v * taps).
// econv_lookup's rows share one offset per load; here each load has its own, but the caller runs a
// few segments for every output channel before the next (econv_sample), so the table entries the
// loads read, those of a few segments over a few output rows, stay in L1 from one channel to the
// next, where a channel's rows over all segments of a group read a group's tables out of L2.
template <int OB, int K>
void econv_lookup_channels(float* y, int64_t ychan, bool init, const float* bias, const float* t, int64_t segs,
                           int64_t seg_stride, const int32_t* off, int64_t ochan, int64_t taps) {
  vec acc[OB][K];
  for (int ob = 0; ob < OB; ++ob)
    for (int k = 0; k < K; ++k) acc[ob][k] = init ? splat(bias ? bias[ob] : 0.0f) : load(y + ob * ychan + k * VEC);
  for (int64_t v = 0; v < segs; ++v) {
    const float* tv = t + v * seg_stride;
    const int32_t* ov = off + v * taps;
    for (int64_t i = 0; i < taps; ++i)
      for (int ob = 0; ob < OB; ++ob) {
        const float* src = tv + ov[ob * ochan + i];
        for (int k = 0; k < K; ++k) acc[ob][k] += load(src + k * VEC);
      }
  }
  for (int ob = 0; ob < OB; ++ob)
    for (int k = 0; k < K; ++k) store(y + ob * ychan + k * VEC, acc[ob][k]);
}

// output channels per call of econv_lookup_channels and vectors of positions per run: 16 sums in
// AVX-512's registers, 8 in AVX2's (the loads' addresses and the channels' offsets take the rest); 6
// channels of 4 vectors were faster on some 64-512-channel layers and slower on others (Intel Xeon,
// AVX-512), and read more table rows per run
constexpr int kChannels = VEC == 16 ? 8 : 4, kRunVecs = 2;
// at most this many work items for the runs of a tile: a few runs each (econv_sample)
constexpr int64_t kRunItems = 8;
using ChannelsFn = void (*)(float*, int64_t, bool, const float*, const float*, int64_t, int64_t, const int32_t*,
                            int64_t, int64_t);
template <int OB, int... K>
constexpr std::array<ChannelsFn, kRunVecs> channels_row(std::integer_sequence<int, K...>) {
  return {{econv_lookup_channels<OB, K + 1>...}};
}
template <int... B>
constexpr auto channels_table(std::integer_sequence<int, B...>) {
  return std::array<std::array<ChannelsFn, kRunVecs>, sizeof...(B)>{
      {channels_row<B + 1>(std::make_integer_sequence<int, kRunVecs>())...}};
}
ChannelsFn econv_channels_fn(int64_t channels, int64_t vecs) {
  static constexpr auto table = channels_table(std::make_integer_sequence<int, kChannels>());
  return table[channels - 1][vecs - 1];
}

// output rows accumulated together (independent add chains sharing each offset load) and vectors per
// row: as many accumulators as the registers hold (32 with AVX-512, 16 otherwise); integer tables
// need as many again for the per-segment sums, so half the rows, except int8 summed in 16 bits: one
// 16-bit vector a row for the run, one for a shifted segment, the float sums in memory
// (econv_lookup_sum16), so twice the rows (AVX2: 64 k3 32x32 light 290 -> 268 us on Zen 3; AVX-512
// not timed)
#ifndef ONNXMERGE_ROWS
#define ONNXMERGE_ROWS (VEC == 16 ? 8 : 4)
#endif
#ifdef ONNXMERGE_SUM16
constexpr bool kSum16 = true;
#else
constexpr bool kSum16 = false;
#endif
template <typename T>
constexpr int kRows = std::is_same_v<T, int8_t> && kSum16 ? 2 * ONNXMERGE_ROWS
                      : std::is_same_v<T, float> ? ONNXMERGE_ROWS : std::max(1, ONNXMERGE_ROWS / 2);
constexpr int kVecs = 2;

template <typename T>
using LookupFn = void (*)(float*, int64_t, bool, float, const T*, int64_t, int64_t, int64_t, const int32_t*, int64_t,
                          const SegmentRun*);

template <typename T, int... R>
constexpr auto lookup_table(std::integer_sequence<int, R...>) {
  return std::array<std::array<LookupFn<T>, kVecs>, sizeof...(R)>{
      {{econv_lookup<T, R + 1, 1>, econv_lookup<T, R + 1, 2>}...}};
}

template <typename T>
LookupFn<T> econv_lookup_fn(int64_t rows, int64_t vecs) {
  static constexpr auto table = lookup_table<T>(std::make_integer_sequence<int, kRows<T>>());
  return table[rows - 1][vecs - 1];
}

// The exponent of a nonzero finite float's highest bit (std::ilogb), from its bits where it is normal:
// these ran per segment and sample, and std::ilogb / std::frexp / std::ldexp are calls into libm.
inline int exponent_of(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const int field = static_cast<int>((bits >> 23) & 0xFF);
  return field != 0 ? field - 127 : std::ilogb(f);
}

// 2^e (std::ldexp(1.0f, e)), built from its bits where it is a normal float
inline float power_of_two(int e) {
  if (e < -126 || e > 127) return std::ldexp(1.0f, e);
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The scale of each segment's integer entries for one sample (EConvLayer::seg_bound): s[v] = 2^e and
// inv[v] = 2^-e; 0 and 0 where the bound is 0 (the segment's tables are all zero); a bound that is
// not finite (an infinite or NaN input) gives inv 0 and s NaN, so that the outputs are NaN.
// x: [d][HW] of segments of r channels (EFC: HW = 1).
template <typename T>
void segment_scales(const std::vector<float>& seg_bound, int64_t d, int64_t r, const float* x, int64_t HW,
                    float* scale, float* inv) {
  for (int64_t v = 0; v < static_cast<int64_t>(seg_bound.size()); ++v) {
    // the segment's channels are one run of x: its largest magnitude, and whether every value is finite
    // (a NaN fails a <= max finite, and max drops it: its own flag), VEC at a time (scalar, this pass
    // took an eighth of a 64-channel 3x3 layer's int8 run on Zen 3)
    const float* xv = x + std::min(d, v * r) * HW;
    const int64_t n = (std::min(d, (v + 1) * r) - std::min(d, v * r)) * HW;
    const vec most = splat(std::numeric_limits<float>::max());
    vec m = splat(0.0f);
    ivec bad = {};
    int64_t i = 0;
    for (; i + VEC <= n; i += VEC) {
      const vec a = reinterpret_cast<vec>(reinterpret_cast<ivec>(load(xv + i)) & std::numeric_limits<int32_t>::max());
      bad |= !(a <= most);
      m = m < a ? a : m;
    }
    float xmax = 0.0f;
    bool finite = true;
    for (int j = 0; j < VEC; ++j) xmax = std::max(xmax, m[j]), finite = finite && bad[j] == 0;
    for (; i < n; ++i) {
      const float a = std::abs(xv[i]);
      finite = finite && std::isfinite(a);
      xmax = std::max(xmax, a);
    }
    const float bound = seg_bound[v] * xmax;
    if (!finite || !std::isfinite(bound)) {
      scale[v] = std::numeric_limits<float>::quiet_NaN(), inv[v] = 0.0f;
    } else if (bound == 0.0f) {
      scale[v] = 0.0f, inv[v] = 0.0f;
    } else {
      // 2^e just above bound / Q: std::frexp's exponent (that of its highest bit, plus one; 0 for 0)
      const float q = bound / static_cast<float>(std::numeric_limits<T>::max());
      const int e = q == 0.0f ? 0 : exponent_of(q) + 1;
      scale[v] = power_of_two(e), inv[v] = power_of_two(-e);
    }
  }
}

// Runs of segments whose int8 sums in 16 bits go on together (econv_lookup_sum16,
// efc_integer_shuffles), for one sample. A segment's sum over `taps` kernel offsets is within
// taps * 127 (its entries are, put / put4: where they are not, its input was not finite and its scale
// NaN); shifted left to the run's least scale's exponent (by at most 7, kFar), the run's sums stay
// within int16 while sum_v taps * 127 * 2^shift_v <= 32767. Each run is summed exactly, as integers,
// and joins the float sums once, where each segment did, rounded each time: the outputs differ from
// segment-by-segment sums by the rounding of the float additions only. For 3x3 layers a run is up to
// 28 segments of one scale, for 1x1 ones 258: the conversion of each segment's sums to float, scaled,
// cost as much as its lookups at few kernel offsets. A segment of scale 0 (its entries all zero)
// joins its neighbours' run unshifted; one of scale NaN (an input not finite) is a run of its own,
// so that its NaN reaches the outputs.
void segment_runs(const float* scale, int64_t V, int64_t taps, SegmentRun* runs) {
  const int64_t limit = std::numeric_limits<int16_t>::max(), one = 127 * taps;
  constexpr int kNone = std::numeric_limits<int>::max();  // no segment of nonzero scale in the run yet
  // shifts of at most 7: EFC's pairs multiply by 2^shift as an unsigned byte (127 << 8 would fit alone)
  constexpr int kFar = 7;
  for (int64_t v = 0; v < V;) {
    int64_t end = v;
    int least = kNone;
    int64_t total = 0;  // the run's bound, in units of 2^least
    if (std::isnan(scale[v])) {
      end = v + 1;
    } else {
      for (; end < V && !std::isnan(scale[end]); ++end) {
        if (scale[end] == 0.0f) continue;
        const int e = exponent_of(scale[end]);
        if (least == kNone) {  // a first segment always starts the run
          least = e, total = one;
          continue;
        }
        const int low = std::min(least, e);
        if (least - low > kFar || e - low > kFar) break;  // (before the shifts: no int64 overflow)
        const int64_t t = (total << (least - low)) + (one << (e - low));
        if (t > limit) break;
        total = t, least = low;
      }
    }
    for (int64_t u = v; u < end; ++u) {
      SegmentRun& run = runs[u];
      const bool plain = scale[u] == 0.0f || std::isnan(scale[u]);
      run.scale = scale[u];
      run.run_scale = std::isnan(scale[u]) ? scale[u] : least == kNone ? 0.0f : power_of_two(least);
      run.shift = plain ? 0 : exponent_of(scale[u]) - least;
      run.last = u == end - 1;
    }
    for (int64_t u = v; u < end; u += 2)
      runs[u].pair = static_cast<int16_t>((1 << runs[u].shift) | (u + 1 < end ? (1 << runs[u + 1].shift) << 8 : 0));
    v = end;
  }
}

// An allocator of cache-line-aligned arrays: a table plane (a multiple of 16 entries) then starts a
// line, and so does each vector the lookups load at a kernel offset of column 0
template <typename T>
struct LineAligned {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kLine); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};

// What one sample's EConv works in: the padded input, a segment group's tables, the segments'
// scales (integer tables) and, where output rows are not whole vectors or the plan is flat, padded
// outputs.
template <typename T>
struct EConvScratch {
  std::vector<float, LineAligned<float>> xp;  // [d][Hp * row]; the pads stay zero for every sample of the plan
  std::vector<T, LineAligned<T>> tables;      // [group][C][plane]
  std::vector<float> scale, inv;
  std::vector<SegmentRun> runs;  // how each segment's integer sums join the float sums (segment_runs)
  std::vector<float, LineAligned<float>> padded;  // flat: [p][out_plane]; else [p][Ho][nvec * VEC], or empty

  // xp: flat, the last channel's tables read up to (kw - 1) * dw + 2 vectors past its last row
  EConvScratch(const EConvLayer& L, const EConvPlan& P)
      : xp(static_cast<size_t>(L.s.d * P.Hp * P.row + (L.s.kw - 1) * L.s.dw + 2 * 16), 0.0f),
        tables(static_cast<size_t>(P.group * L.s.C * P.plane)),
        scale(static_cast<size_t>(L.s.V), 1.0f),
        inv(static_cast<size_t>(L.s.V), 1.0f),
        runs(static_cast<size_t>(L.s.V)),
        padded(P.flat ? static_cast<size_t>(L.s.p * P.out_plane)
               : P.Wo % VEC == 0 ? 0 : static_cast<size_t>(L.s.p * P.Ho * ceil_div(P.Wo, VEC) * VEC)) {}
};

// One sample: x [d, H, W] -> y [p, Ho, Wo], the tables and lookups of each tile and segment group
// spread over `parallel`.
template <typename T>
void econv_sample(const EConvLayer& L, const EConvPlan& P, const float* x, const float* bias, float* y,
                  EConvScratch<T>& w, const Parallel& parallel) {
  const EConvParams& s = L.s;
  const int64_t taps = s.kh * s.kw, HW = P.H * P.W;
  const int64_t nvec = ceil_div(P.Wo, VEC);
  // outputs are accumulated in place when rows are whole vectors, else in a padded copy (flat: on the
  // padded grid, EConvPlan::flat)
  const bool direct = w.padded.empty();
  const int64_t ystride = direct ? P.Wo : nvec * VEC;
  const int64_t chan = P.Hp * P.row;
  const int64_t seg_stride = s.C * P.plane;
  const int64_t cblock = 16;
  const int64_t cblocks = ceil_div(s.C, cblock);
  const int64_t oblock = block_size(s.p, 32);

  if constexpr (!std::is_same_v<T, float>) {
    segment_scales<T>(L.seg_bound, s.d, s.r, x, HW, w.scale.data(), w.inv.data());
    segment_runs(w.scale.data(), s.V, taps, w.runs.data());
  }
  // the sample on the padded grid, columns split by phase (lookup.h, EConvPlan)
  for (int64_t ch = 0; ch < s.d; ++ch) {
    const float* src = x + ch * HW;
    float* dst = w.xp.data() + ch * chan;
    for (int64_t h = 0; h < P.H; ++h) {
      float* drow = dst + (h + s.pt) * P.row;
      if (s.sw == 1) {
        std::memcpy(drow + s.pl, src + h * P.W, sizeof(float) * static_cast<size_t>(P.W));
      } else {
        for (int64_t c = 0; c < P.W; ++c) {
          const int64_t col = c + s.pl;
          drow[(col % s.sw) * P.width + col / s.sw] = src[h * P.W + c];
        }
      }
    }
  }
  float* out = direct ? y : w.padded.data();
  for (int64_t a0 = 0; a0 < P.Ho; a0 += P.tile_rows) {
    const int64_t a1 = std::min(P.Ho, a0 + P.tile_rows);
    const int64_t first = a0 * s.sh * P.row;
    // flat: the tile's run of outputs, rounded up to whole rows of vectors (at most kMaxVec entries),
    // reads past its last input row's start
    const int64_t reach = P.flat ? (s.kw - 1) * s.dw + kMaxVec : 0;
    const int64_t span = ceil_div(((a1 - 1 - a0) * s.sh + (s.kh - 1) * s.dh + 1) * P.row + reach, VEC) * VEC;
    // A plan of one tile builds tables only over the vectors that hold input rows: the padding rows
    // above and below (and the reach past them) are zeros in every channel, so their entries are 0,
    // as the tables were made and as no tile ever writes them (512 channels 3x3 at 4x4: a 6x6 padded
    // grid and its reach, 56 entries a plane, of which 32 cover the input rows).
    const bool one_tile = a0 == 0 && a1 == P.Ho;
    const int64_t q0 = one_tile ? s.pt * P.row / VEC * VEC : 0;
    const int64_t q1 = one_tile ? std::min(span, ceil_div((s.pt + P.H) * P.row, VEC) * VEC) : span;
    for (int64_t g0 = 0; g0 < s.V; g0 += P.group) {
      const int64_t g1 = std::min(s.V, g0 + P.group);
      parallel.run(static_cast<size_t>((g1 - g0) * cblocks), [&](size_t item) {
        const int64_t v = g0 + static_cast<int64_t>(item) / cblocks;
        const int64_t c0 = (static_cast<int64_t>(item) % cblocks) * cblock;
        econv_tables(L, P, w.xp.data(), chan, v, c0, std::min(s.C, c0 + cblock), first + q0, q1 - q0, w.inv[v],
                     w.tables.data() + (v - g0) * seg_stride + q0);
      });
      if constexpr (std::is_same_v<T, float>) if (P.channels) {
        const int64_t few = std::min(P.channel_segments, g1 - g0);
        const int64_t ochan = s.V * taps;
        // the lookups of segments [v0, v1) for run i of kRunVecs vectors of positions, every output
        // channel: the tile's outputs as one run (EConvPlan::flat), else each output row's
        const int64_t row_vecs = P.flat ? ceil_div((a1 - a0) * P.row, VEC) : nvec;  // vectors of a "row"
        const int64_t per_row = ceil_div(row_vecs, kRunVecs);
        const int64_t runs = P.flat ? per_row : (a1 - a0) * per_row;
        const auto lookups = [&](int64_t i, int64_t v0, int64_t v1) {
          const int64_t cv = (i % per_row) * kRunVecs, vecs = std::min<int64_t>(kRunVecs, row_vecs - cv);
          float* y0;
          const float* t0;
          int64_t ychan;
          if (P.flat) {
            y0 = out + a0 * P.row + cv * VEC, ychan = P.out_plane, t0 = w.tables.data() + cv * VEC;
          } else {
            const int64_t a = a0 + i / per_row;
            y0 = out + a * ystride + cv * VEC, ychan = P.Ho * ystride;
            t0 = w.tables.data() + (a - a0) * s.sh * P.row + cv * VEC;
          }
          for (int64_t o = 0; o < s.p; o += kChannels)
            econv_channels_fn(std::min<int64_t>(kChannels, s.p - o), vecs)(
                y0 + o * ychan, ychan, v0 == 0, bias ? bias + o : nullptr, t0 + (v0 - g0) * seg_stride, v1 - v0,
                seg_stride, P.offsets.data() + o * ochan + v0 * taps, ochan, taps);
        };
        // a few runs per item, at most kRunItems items: within one the runs of a few segments go one
        // after another, so the tables they read slide along in L1 (a run reads mostly what the one
        // before it read)
        const int64_t chunk = ceil_div(runs, kRunItems);
        parallel.run(static_cast<size_t>(ceil_div(runs, chunk)), [&](size_t item) {
          const int64_t i0 = static_cast<int64_t>(item) * chunk, i1 = std::min(runs, i0 + chunk);
          for (int64_t v0 = g0; v0 < g1; v0 += few)
            for (int64_t i = i0; i < i1; ++i) lookups(i, v0, std::min(g1, v0 + few));
        });
        continue;
      }
      parallel.run(static_cast<size_t>(ceil_div(s.p, oblock)), [&](size_t item) {
        const int64_t o0 = static_cast<int64_t>(item) * oblock;
        for (int64_t o = o0; o < std::min(s.p, o0 + oblock); ++o) {
          const int32_t* off = P.offsets.data() + (o * s.V + g0) * taps;
          const float b = bias ? bias[o] : 0.0f;
          if (P.flat) {  // the tile's outputs as one run: "rows" of kVecs vectors, then what is left
            // in whole rows of kVecs vectors where that stays within the plan's rounding to kMaxVec
            const int64_t run = ceil_div((a1 - a0) * P.row, VEC), step = kRows<T> * kVecs;
            const int64_t nv = kVecs * VEC <= kMaxVec ? ceil_div(run, kVecs) * kVecs : run;
            float* yo = out + o * P.out_plane + a0 * P.row;
            for (int64_t cv = 0; cv < nv; cv += step) {
              const int64_t left = std::min(step, nv - cv), rows = left / kVecs, rest = left % kVecs;
              if (rows > 0)
                econv_lookup_fn<T>(rows, kVecs)(yo + cv * VEC, kVecs * VEC, g0 == 0, b, w.tables.data() + cv * VEC,
                                                kVecs * VEC, g1 - g0, seg_stride, off, taps, w.runs.data() + g0);
              if (rest > 0) {
                const int64_t c = cv + rows * kVecs;
                econv_lookup_fn<T>(1, rest)(yo + c * VEC, 0, g0 == 0, b, w.tables.data() + c * VEC, 0, g1 - g0,
                                            seg_stride, off, taps, w.runs.data() + g0);
              }
            }
            continue;
          }
          for (int64_t a = a0; a < a1; a += kRows<T>) {
            const int64_t rows = std::min<int64_t>(kRows<T>, a1 - a);
            for (int64_t cv = 0; cv < nvec; cv += kVecs) {
              const int64_t vecs = std::min<int64_t>(kVecs, nvec - cv);
              econv_lookup_fn<T>(rows, vecs)(out + (o * P.Ho + a) * ystride + cv * VEC, ystride, g0 == 0, b,
                                             w.tables.data() + (a - a0) * s.sh * P.row + cv * VEC, s.sh * P.row,
                                             g1 - g0, seg_stride, off, taps, w.runs.data() + g0);
            }
          }
        }
      });
    }
  }
  if (P.flat)
    for (int64_t o = 0; o < s.p; ++o)
      for (int64_t a = 0; a < P.Ho; ++a)
        std::memcpy(y + (o * P.Ho + a) * P.Wo, w.padded.data() + o * P.out_plane + a * P.row,
                    sizeof(float) * static_cast<size_t>(P.Wo));
  else if (!direct)
    for (int64_t oa = 0; oa < s.p * P.Ho; ++oa)
      std::memcpy(y + oa * P.Wo, w.padded.data() + oa * ystride, sizeof(float) * static_cast<size_t>(P.Wo));
}

// A scratch set of `pool`, or a new one S(args...); given back with give_scratch.
template <typename S, typename... Args>
std::shared_ptr<S> take_scratch(ScratchPool& pool, const Args&... args) {
  {
    std::lock_guard<std::mutex> guard(pool.lock);
    if (!pool.sets.empty()) {
      auto w = std::static_pointer_cast<S>(pool.sets.back());
      pool.sets.pop_back();
      return w;
    }
  }
  return std::make_shared<S>(args...);
}

template <typename S>
void give_scratch(ScratchPool& pool, std::shared_ptr<S> w) {
  std::lock_guard<std::mutex> guard(pool.lock);
  pool.sets.push_back(std::move(w));
}

// One sample: its work spread over the threads. Several: the samples spread over the threads, each
// sample's work on one thread (one parallel section per run, no synchronisation between a sample's
// phases), with as many scratch sets as samples run at once, reused from sample to sample.
template <typename T>
void econv_entries(const EConvLayer& L, const EConvPlan& P, int64_t N, const float* x, const float* bias, float* y,
                   const Parallel& parallel) {
  const int64_t in = L.s.d * P.H * P.W, out = L.s.p * P.Ho * P.Wo;
  if (N == 1) {
    auto w = take_scratch<EConvScratch<T>>(P.scratch, L, P);
    econv_sample(L, P, x, bias, y, *w, parallel);
    give_scratch(P.scratch, std::move(w));
    return;
  }
  parallel.run(static_cast<size_t>(N), [&](size_t n) {
    auto w = take_scratch<EConvScratch<T>>(P.scratch, L, P);
    econv_sample(L, P, x + static_cast<int64_t>(n) * in, bias, y + static_cast<int64_t>(n) * out, *w, Parallel());
    give_scratch(P.scratch, std::move(w));
  });
}

void econv_run(const EConvLayer& L, const EConvPlan& P, int64_t N, const float* x, const float* bias, float* y,
               const Parallel& parallel) {
  if (L.s.table_bits == 8)
    econv_entries<int8_t>(L, P, N, x, bias, y, parallel);
  else if (L.s.table_bits == 16)
    econv_entries<int16_t>(L, P, N, x, bias, y, parallel);
  else
    econv_entries<float>(L, P, N, x, bias, y, parallel);
}

// ---------------------------------------------------------------------------------------------
// EFC

// Phase 1 of segment v for Q vectors of codewords from q: Q independent sums side by side, so that
// the multiply-adds overlap (one vector at a time, each sum waited on its last multiply-add's latency:
// the phase took 12 of 30 us of a 1024-wide layer's int8 run on Zen 3).
template <int Q>
void efc_tables_vectors(const float* x, const float* w, int64_t Cp, int64_t depth, int64_t q, float* table) {
  vec a[Q];
  for (int i = 0; i < Q; ++i) a[i] = splat(0.0f);
  for (int64_t k = 0; k < depth; ++k) {
    const vec xk = splat(x[k]);
    for (int i = 0; i < Q; ++i) a[i] += xk * load(w + k * Cp + q + i * VEC);
  }
  for (int i = 0; i < Q; ++i) store(table + q + i * VEC, a[i]);
}

// Phase 1 for one sample: T[v][c] = <codeword c of segment v, x's segment v>, vectorised over
// codewords; each entry summed over k in order from 0, one multiply-add per k.
void efc_sample_tables(const EFCLayer& L, const float* x, float* table, const Parallel& parallel) {
  const EFCParams& s = L.s;
  const int64_t Cp = L.Cp;
  const int64_t vblock = block_size(s.V, 64, 8);
  parallel.run(static_cast<size_t>(ceil_div(s.V, vblock)), [&](size_t item) {
    const int64_t v0 = static_cast<int64_t>(item) * vblock;
    for (int64_t v = v0; v < std::min(s.V, v0 + vblock); ++v) {
      const int64_t depth = std::clamp<int64_t>(s.d - v * s.r, 0, s.r);
      const float* w = L.codebook_t.data() + v * s.r * Cp;
      const float* xv = x + v * s.r;
      float* t = table + v * Cp;
      int64_t q = 0;
      for (; q + 8 * VEC <= Cp; q += 8 * VEC) efc_tables_vectors<8>(xv, w, Cp, depth, q, t);
      if (q + 4 * VEC <= Cp) efc_tables_vectors<4>(xv, w, Cp, depth, q, t), q += 4 * VEC;
      if (q + 2 * VEC <= Cp) efc_tables_vectors<2>(xv, w, Cp, depth, q, t), q += 2 * VEC;
      if (q < Cp) efc_tables_vectors<1>(xv, w, Cp, depth, q, t);
    }
  });
}

// Phase 2 for one sample, outputs [o0, o1): y[o] = b + sum_v T[v][code[o][v]] as scalar loads, codes
// [out][V], over blocks of segments whose tables stay in L1; four chains so that the loads overlap.
template <typename Code>
void efc_sample_scalar(const EFCLayer& L, const Code* codes, const float* table, int64_t o0, int64_t o1, float* y) {
  const EFCParams& s = L.s;
  const int64_t Cp = L.Cp;
  const int64_t segs_l1 = std::max<int64_t>(1, l1_table_bytes() / (Cp * static_cast<int64_t>(sizeof(float))));
  for (int64_t v0 = 0; v0 < s.V; v0 += segs_l1) {
    const int64_t segs = std::min(s.V, v0 + segs_l1) - v0;
    const float* t = table + v0 * Cp;
    for (int64_t o = o0; o < o1; ++o) {
      const Code* c = codes + o * s.V + v0;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
      int64_t v = 0;
      for (; v + 4 <= segs; v += 4) {
        s0 += t[v * Cp + c[v]];
        s1 += t[(v + 1) * Cp + c[v + 1]];
        s2 += t[(v + 2) * Cp + c[v + 2]];
        s3 += t[(v + 3) * Cp + c[v + 3]];
      }
      for (; v < segs; ++v) s0 += t[v * Cp + c[v]];
      y[o] += (s0 + s1) + (s2 + s3);
    }
  }
}

#if defined(__AVX512F__)
// Phase 2 for one sample on AVX-512 with at most 64 codewords, outputs [o0, o0 + 16 * Q): a segment's
// table (up to four registers) is looked up for 16 outputs at a time by permutes across registers
// (vpermt2ps: 32 entries from two registers, bit 5 of the code picks the pair), not by memory
// gathers. Codes [V][out] as bytes; sums run over v in order, one chain per output.
template <int Q>
void efc_sample_registers(const EFCLayer& L, const float* table, int64_t o0, float* y) {
  const EFCParams& s = L.s;
  const int64_t Cp = L.Cp;
  __m512 acc[Q];
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_loadu_ps(y + o0 + 16 * q);
  const __m512i bit5 = _mm512_set1_epi32(32);
  const uint8_t* codes = L.codes_vo.data() + o0;
  for (int64_t v = 0; v < s.V; ++v, codes += s.out) {
    const float* t = table + v * Cp;
    const __m512 t0 = _mm512_loadu_ps(t), t1 = Cp > 16 ? _mm512_loadu_ps(t + 16) : t0;
    const __m512 t2 = Cp > 32 ? _mm512_loadu_ps(t + 32) : t0, t3 = Cp > 32 ? _mm512_loadu_ps(t + 48) : t0;
    for (int q = 0; q < Q; ++q) {
      // (the maskz form: the plain one trips GCC 12's -Wmaybe-uninitialized inside its own header)
      const __m512i idx =
          _mm512_maskz_cvtepu8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * q)));
      __m512 e = _mm512_permutex2var_ps(t0, idx, t1);
      if (Cp > 32) e = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, bit5), e, _mm512_permutex2var_ps(t2, idx, t3));
      acc[q] = _mm512_add_ps(acc[q], e);
    }
  }
  for (int q = 0; q < Q; ++q) _mm512_storeu_ps(y + o0 + 16 * q, acc[q]);
}
#endif

// Phase 2 of one sample as work items: blocks of whole 64s of outputs, each set to the bias, then
// `lookups(o0, o1)` adds the table entries of outputs [o0, o1).
template <typename Fn>
void efc_output_blocks(const EFCLayer& L, const float* bias, float* y, const Parallel& parallel, const Fn& lookups) {
  const int64_t out = L.s.out, oblock = ceil_div(block_size(out, 32, 64), 64) * 64;
  parallel.run(static_cast<size_t>(ceil_div(out, oblock)), [&](size_t item) {
    const int64_t o0 = static_cast<int64_t>(item) * oblock, o1 = std::min(out, o0 + oblock);
    for (int64_t o = o0; o < o1; ++o) y[o] = bias ? bias[o] : 0.0f;
    lookups(o0, o1);
  });
}

// ---- integer tables (EFCParams::table_bits 16 / 8): EConv's arithmetic on one pixel (a 1x1 kernel):
// segment v's entries rint(T / s_v), s_v a power of two from EFCLayer::seg_bound and the sample's
// max |x_v| (segment_scales); y[o] = b[o] + sum_v s_v * entry, added in segment order. The product of
// an entry and a power of two is exact, so fusing it with the add changes no rounding.

// Phase 2 for one sample, outputs [o0, o1), as scalar loads of codes [out][V]: one chain per output,
// the segments in order, OB outputs side by side (one output at a time, each add waited on the last).
template <int OB, typename T, typename Code>
void efc_integer_outputs(const EFCLayer& L, const Code* codes, const T* table, const float* scale, int64_t o,
                         float* y) {
  const EFCParams& s = L.s;
  float a[OB];
  const Code* c[OB];
  for (int i = 0; i < OB; ++i) a[i] = y[o + i], c[i] = codes + (o + i) * s.V;
  for (int64_t v = 0; v < s.V; ++v) {
    const T* t = table + v * L.Cp;
    for (int i = 0; i < OB; ++i) a[i] += static_cast<float>(t[c[i][v]]) * scale[v];
  }
  for (int i = 0; i < OB; ++i) y[o + i] = a[i];
}

template <typename T, typename Code>
void efc_integer_scalar(const EFCLayer& L, const Code* codes, const T* table, const float* scale, int64_t o0,
                        int64_t o1, float* y) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) efc_integer_outputs<4>(L, codes, table, scale, o, y);
  for (; o < o1; ++o) efc_integer_outputs<1>(L, codes, table, scale, o, y);
}

#if defined(__AVX2__)
// Phase 2 for one sample with int8 tables of at most 64 codewords (T-MAC's lookups), outputs
// [o0, o0 + 32): a segment's table is up to four 16-byte registers (EFCLayer::Cp / 16), and vpshufb
// looks 32 codes up in one of them at once (by the code's low 4 bits; bits 4 and 5 choose the
// register, by blends): a lookup is a shuffle, not a load. Codes in blocks of 32 outputs
// (EFCLayer::codes_blocks).
template <int Cp>
inline __m256i efc_shuffle(const int8_t* t, __m256i code) {
  const auto row = [&](int64_t i) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 16 * i)));
  };
  __m256i e = _mm256_shuffle_epi8(row(0), code);  // codes < 64: bit 7 clear, no lane zeroed
  if constexpr (Cp == 16) return e;
  const __m256i bit4 = _mm256_slli_epi16(code, 3);  // bit 4 of every byte to its bit 7, blendv's selector
  e = _mm256_blendv_epi8(e, _mm256_shuffle_epi8(row(1), code), bit4);
  if constexpr (Cp == 32) return e;
  const __m256i r2 = row(2), r3 = Cp == 64 ? row(3) : r2;  // Cp 48: no code reaches a fourth register
  const __m256i f = _mm256_blendv_epi8(_mm256_shuffle_epi8(r2, code), _mm256_shuffle_epi8(r3, code), bit4);
  return _mm256_blendv_epi8(e, f, _mm256_slli_epi16(code, 2));  // bit 5 to bit 7
}

// The 32 outputs from o0, segments two at a time where they are in one run (segment_runs: one kernel
// offset a segment): their entries interleaved and multiplied by 2^shift each (vpmaddubsw, the
// multipliers as unsigned bytes: shifts <= 7) give the pair's 16-bit sums at the run's scale, added
// to the run's; a run joins the float sums at its end. Each segment's entries converted to float and
// scaled took 12 instructions of its ~20 (fc 1024 -> 1024 light, batch 1: 25 -> 17 us on Zen 3).
template <int Cp>
void efc_integer_shuffles(const EFCLayer& L, const int8_t* table, const SegmentRun* seg, int64_t o0, float* y) {
  const EFCParams& s = L.s;
  __m256 acc[4];
  for (int q = 0; q < 4; ++q) acc[q] = _mm256_loadu_ps(y + o0 + 8 * q);
  // the unpacks interleave within 128-bit lanes: run[0] holds outputs 0-7 and 16-23, run[1] 8-15 and 24-31
  __m256i run[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  const uint8_t* codes = L.codes_blocks.data() + o0 * s.V;  // block o0 / 32 (EFCLayer::codes_blocks)
  const auto entries = [&](int64_t v) {
    return efc_shuffle<Cp>(table + v * Cp, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + v * 32)));
  };
  for (int64_t v = 0; v < s.V;) {
    const bool pair = !seg[v].last;  // v + 1 is in v's run (the last segment ends every run)
    const __m256i e = entries(v), f = pair ? entries(v + 1) : _mm256_setzero_si256();
    const __m256i m = _mm256_set1_epi16(seg[v].pair);
    run[0] = _mm256_add_epi16(run[0], _mm256_maddubs_epi16(m, _mm256_unpacklo_epi8(e, f)));
    run[1] = _mm256_add_epi16(run[1], _mm256_maddubs_epi16(m, _mm256_unpackhi_epi8(e, f)));
    v += pair ? 2 : 1;
    if (seg[v - 1].last) {
      const __m256 sv = _mm256_set1_ps(seg[v - 1].run_scale);
      for (int q = 0; q < 4; ++q) {
        const __m256i r = run[q % 2];
        const __m128i part = q < 2 ? _mm256_castsi256_si128(r) : _mm256_extracti128_si256(r, 1);
        acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part)), sv, acc[q]);
      }
      run[0] = run[1] = _mm256_setzero_si256();
    }
  }
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(y + o0 + 8 * q, acc[q]);
}

void efc_integer_shuffles(const EFCLayer& L, const int8_t* table, const SegmentRun* seg, int64_t o0, float* y) {
  switch (L.Cp) {
    case 16: return efc_integer_shuffles<16>(L, table, seg, o0, y);
    case 32: return efc_integer_shuffles<32>(L, table, seg, o0, y);
    case 48: return efc_integer_shuffles<48>(L, table, seg, o0, y);
    default: return efc_integer_shuffles<64>(L, table, seg, o0, y);
  }
}
#endif

// What one sample's EFC with integer tables works in.
template <typename T>
struct EFCIntegerScratch {
  std::vector<float> table, scale, inv;
  std::vector<SegmentRun> runs;  // (int8 shuffles: segment_runs)
  std::vector<T> entries;
  explicit EFCIntegerScratch(const EFCLayer& L)
      : table(static_cast<size_t>(L.s.V * L.Cp)), scale(static_cast<size_t>(L.s.V)),
        inv(static_cast<size_t>(L.s.V)), runs(static_cast<size_t>(L.s.V)), entries(static_cast<size_t>(L.s.V * L.Cp)) {}
};

// One sample with integer tables: float tables, the segments' scales, the entries, then the lookups
// spread over blocks of outputs.
template <typename T, typename Code>
void efc_integer_sample(const EFCLayer& L, const Code* codes, const float* x, const float* bias, float* y,
                        EFCIntegerScratch<T>& w, const Parallel& parallel) {
  const EFCParams& s = L.s;
  efc_sample_tables(L, x, w.table.data(), parallel);
  segment_scales<T>(L.seg_bound, s.d, s.r, x, 1, w.scale.data(), w.inv.data());
  segment_runs(w.scale.data(), s.V, 1, w.runs.data());
  for (int64_t v = 0; v < s.V; ++v) {
    const float* t = w.table.data() + v * L.Cp;
    T* e = w.entries.data() + v * L.Cp;
    int64_t q = 0;
    for (; q + 4 * VEC <= L.Cp; q += 4 * VEC)
      put4(e + q, {load(t + q), load(t + q + VEC), load(t + q + 2 * VEC), load(t + q + 3 * VEC)}, w.inv[v]);
    for (; q < L.Cp; q += VEC) put(e + q, load(t + q), w.inv[v]);
  }
  efc_output_blocks(L, bias, y, parallel, [&](int64_t o0, int64_t o1) {
    int64_t o = o0;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<T, int8_t>)
      if (!L.codes_blocks.empty())
        for (; o + 32 <= o1; o += 32) efc_integer_shuffles(L, w.entries.data(), w.runs.data(), o, y);
#endif
    efc_integer_scalar(L, codes, w.entries.data(), w.scale.data(), o, o1, y);  // (after shuffles: fewer than 32)
  });
}

// One sample: tables, then the lookups spread over blocks of outputs.
template <typename Code>
void efc_sample(const EFCLayer& L, const Code* codes, const float* x, const float* bias, float* y, float* table,
                const Parallel& parallel) {
  efc_sample_tables(L, x, table, parallel);
  efc_output_blocks(L, bias, y, parallel, [&](int64_t o0, int64_t o1) {
#if defined(__AVX512F__)
    if (!L.codes_vo.empty()) {
      int64_t o = o0;
      for (; o + 64 <= o1; o += 64) efc_sample_registers<4>(L, table, o, y);
      for (; o + 16 <= o1; o += 16) efc_sample_registers<1>(L, table, o, y);
      efc_sample_scalar(L, codes, table, o, o1, y);  // the last outputs, fewer than 16
      return;
    }
#endif
    efc_sample_scalar(L, codes, table, o0, o1, y);
  });
}

// Tables of CB codewords for a tile of K vectors of samples: T[c][j] = sum_d w[d][c] * xt[d][j], summed
// over d in order from 0 (one multiply-add per d, as every path computes an entry). CB codewords at
// once: one codeword's K chains waited on the multiply-adds' latency (a fourth of the throughput at
// K = 2; fc 4096 -> 1024 at batch 32 spent a quarter of its time in the tables on Zen 3).
constexpr int64_t kTileCodewords = 4;
template <int K, int CB>
void efc_tile_tables(const float* xt, const float* w, int64_t Cp, int64_t depth, float* table) {
  constexpr int64_t W = K * VEC;
  vec a[CB][K];
  for (int j = 0; j < CB; ++j)
    for (int k = 0; k < K; ++k) a[j][k] = splat(0.0f);
  for (int64_t d = 0; d < depth; ++d)
    for (int j = 0; j < CB; ++j) {
      const vec wd = splat(w[d * Cp + j]);
      for (int k = 0; k < K; ++k) a[j][k] += wd * load(xt + d * W + k * VEC);
    }
  for (int j = 0; j < CB; ++j)
    for (int k = 0; k < K; ++k) store(table + j * W + k * VEC, a[j][k]);
}

// A tile of K vectors of samples: the input transposed to [d][K*VEC], tables T[v][c][K*VEC] for blocks
// of segments that fit L2, and per output one vector add per segment into acc[out][K*VEC].
template <typename Code, int K>
void efc_tile(const EFCLayer& L, const Code* codes, const float* x, int64_t n0, int64_t nt, const float* bias,
              float* y, const Parallel& parallel) {
  const EFCParams& s = L.s;
  constexpr int64_t W = K * VEC;
  std::vector<float> xt(static_cast<size_t>(s.d * W), 0.0f);
  for (int64_t j = 0; j < nt; ++j)
    for (int64_t i = 0; i < s.d; ++i) xt[i * W + j] = x[(n0 + j) * s.d + i];
  const int64_t vblock = std::clamp<int64_t>(efc_tile_bytes() / (s.C * W * static_cast<int64_t>(sizeof(float))), 1,
                                             s.V);
  std::vector<float> table(static_cast<size_t>(vblock * s.C * W));
  std::vector<float> acc(static_cast<size_t>(s.out * W));
  const int64_t oblock = block_size(s.out, 32, 8);
  for (int64_t v0 = 0; v0 < s.V; v0 += vblock) {
    const int64_t v1 = std::min(s.V, v0 + vblock);
    parallel.run(static_cast<size_t>(v1 - v0), [&](size_t item) {
      const int64_t v = v0 + static_cast<int64_t>(item);
      const int64_t depth = std::clamp<int64_t>(s.d - v * s.r, 0, s.r);
      const float* w = L.codebook_t.data() + v * s.r * L.Cp;
      const float* xv = xt.data() + v * s.r * W;
      float* tv = table.data() + (v - v0) * s.C * W;
      int64_t c = 0;
      for (; c + kTileCodewords <= s.C; c += kTileCodewords)
        efc_tile_tables<K, kTileCodewords>(xv, w + c, L.Cp, depth, tv + c * W);
      for (; c < s.C; ++c) efc_tile_tables<K, 1>(xv, w + c, L.Cp, depth, tv + c * W);
    });
    parallel.run(static_cast<size_t>(ceil_div(s.out, oblock)), [&](size_t item) {
      const int64_t o0 = static_cast<int64_t>(item) * oblock;
      for (int64_t o = o0; o < std::min(s.out, o0 + oblock); ++o) {
        float* ao = acc.data() + o * W;
        vec a[K], b[K];  // two chains (even and odd segments), so that the adds overlap
        for (int k = 0; k < K; ++k) {
          a[k] = v0 == 0 ? splat(bias ? bias[o] : 0.0f) : load(ao + k * VEC);
          b[k] = splat(0.0f);
        }
        const Code* c = codes + o * s.V;
        const float* t = table.data();
        int64_t v = v0;
        for (; v + 2 <= v1; v += 2) {
          const float* ra = t + ((v - v0) * s.C + c[v]) * W;
          const float* rb = t + ((v + 1 - v0) * s.C + c[v + 1]) * W;
          for (int k = 0; k < K; ++k) {
            a[k] += load(ra + k * VEC);
            b[k] += load(rb + k * VEC);
          }
        }
        if (v < v1)
          for (int k = 0; k < K; ++k) a[k] += load(t + ((v - v0) * s.C + c[v]) * W + k * VEC);
        for (int k = 0; k < K; ++k) store(ao + k * VEC, a[k] + b[k]);
      }
    });
  }
  for (int64_t j = 0; j < nt; ++j)
    for (int64_t o = 0; o < s.out; ++o) y[(n0 + j) * s.out + o] = acc[o * W + j];
}

template <typename Code>
void efc_codes(const EFCLayer& L, const Code* codes, int64_t N, const float* x, const float* bias, float* y,
               const Parallel& parallel) {
  const EFCParams& s = L.s;
  // integer tables: sample by sample at every batch size (the scales are per sample and segment)
  const auto integer = [&](auto entry) {
    auto w = take_scratch<EFCIntegerScratch<decltype(entry)>>(L.scratch, L);
    for (int64_t n = 0; n < N; ++n) efc_integer_sample(L, codes, x + n * s.d, bias, y + n * s.out, *w, parallel);
    give_scratch(L.scratch, std::move(w));
  };
  if (s.table_bits == 8) return integer(int8_t{});
  if (s.table_bits == 16) return integer(int16_t{});
  // Up to a few samples, one at a time (a vector of samples would be mostly padding); then tiles of
  // one or two vectors of samples.
  if (N < 4) {
    auto table = take_scratch<std::vector<float>>(L.scratch, static_cast<size_t>(s.V * L.Cp));
    for (int64_t n = 0; n < N; ++n) efc_sample(L, codes, x + n * s.d, bias, y + n * s.out, table->data(), parallel);
    give_scratch(L.scratch, std::move(table));
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += 2 * VEC) {
    const int64_t nt = std::min(N - n0, 2 * VEC);
    if (nt > VEC)
      efc_tile<Code, 2>(L, codes, x, n0, nt, bias, y, parallel);
    else
      efc_tile<Code, 1>(L, codes, x, n0, nt, bias, y, parallel);
  }
}

void efc_run(const EFCLayer& L, int64_t N, const float* x, const float* bias, float* y, const Parallel& parallel) {
  if (!L.codes8.empty())
    efc_codes(L, L.codes8.data(), N, x, bias, y, parallel);
  else
    efc_codes(L, L.codes16.data(), N, x, bias, y, parallel);
}

}  // namespace

extern const IsaKernels kernels;
#if defined(__AVX512F__)
const IsaKernels kernels = {ONNXMERGE_ISA_NAME, econv_run, efc_run, true, true, VEC};
#elif defined(__AVX2__)
const IsaKernels kernels = {ONNXMERGE_ISA_NAME, econv_run, efc_run, false, true, VEC};
#else
const IsaKernels kernels = {ONNXMERGE_ISA_NAME, econv_run, efc_run, false, false, VEC};
#endif

}  // namespace ONNXMERGE_ISA
}  // namespace onnxmerge
