// CPU driver for the noise primitive: tiles of Philox counters, written so that GCC and Clang
// vectorise the inner loops (no calls, no data-dependent branches, structure-of-arrays tiles),
// split over the calling thread and the workers of a persistent pool (pool.h). Threads own disjoint
// ranges of x and every element is computed from (seed, position) alone, so the thread count never
// changes a bit of the result.
//
// A tile is 256 positions: 64 Philox counters of Gaussian z (4 normals each), or 2 counters of
// Rademacher r (128 signs each). r costs one Philox per 128 elements and a sign flip of the scale,
// no Box-Muller, which bounds a Gaussian pass.
#include "noise.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "pool.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define HOSL_X86_AVX2 1
#include <immintrin.h>
#endif

namespace hosl {
namespace noise {
namespace {

constexpr int kTile = 64;                   // Philox counters per Gaussian tile: 256 normals, 1 KiB of floats
constexpr int kTilePositions = 4 * kTile;   // positions per tile, either distribution
constexpr int kSignsPerCounter = 128;       // Rademacher: one bit of the counter's four words each
constexpr int64_t kMinPerThread = 1 << 15;  // below this, a thread costs more than it saves
static_assert(kTile % 16 == 0, "philox_tile_avx512 takes counters 16 at a time");

// The Philox words of counters [counter0, counter0 + kTile), word w of counter counter0 + i in cw[i].
// Portable C++; the compiler vectorises it, but it widens the 32x32->64-bit products through lane
// shuffles, so x86-64 CPUs with AVX2 or AVX-512 run philox_tile_avx2 or philox_tile_avx512.
// kCount counters: kTile for a Gaussian tile, the two of a Rademacher tile.
template <int kCount = kTile>
void philox_tile(uint64_t seed, uint64_t counter0, uint32_t* __restrict c0, uint32_t* __restrict c1,
                 uint32_t* __restrict c2, uint32_t* __restrict c3) {
  for (int i = 0; i < kCount; ++i) {
    const uint64_t c = counter0 + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(c);
    c1[i] = static_cast<uint32_t>(c >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int i = 0; i < kCount; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(p1);
      c3[i] = static_cast<uint32_t>(p0);
      c0[i] = n0;
      c2[i] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

#ifdef HOSL_X86_AVX2
// hi and lo 32-bit halves of m * a in each of 8 lanes: vpmuludq multiplies the even lanes, and the
// odd lanes shifted down; two blends put the halves back in lane order. Integer arithmetic: the
// words are those of philox_tile, bit for bit (tests/test_noise.py compares the backends).
__attribute__((target("avx2"))) inline void mulhilo8(__m256i m, __m256i a, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox_tile, 8 counters at a time with their state in registers: about 1.7x faster here.
__attribute__((target("avx2"))) void philox_tile_avx2(uint64_t seed, uint64_t counter0, uint32_t* c0o, uint32_t* c1o,
                                                      uint32_t* c2o, uint32_t* c3o) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int i = 0; i < kTile; i += 8) {
    // Counters base + lane as 64-bit (low word c0, high word c1): the high word gains 1 in the lanes
    // where the low word wrapped, i.e. came out below base's (an unsigned compare, through the sign).
    const uint64_t base = counter0 + static_cast<uint64_t>(i);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    __m256i c0 = _mm256_add_epi32(base_lo, lane);
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))), wrapped);
    __m256i c2 = _mm256_setzero_si256();
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(m0, c0, &hi0, &lo0);
      mulhilo8(m1, c2, &hi1, &lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c0o + i), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c1o + i), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c2o + i), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c3o + i), c3);
  }
}

// GCC 12 warns inside its own AVX-512 headers: the shift intrinsics start from an undefined vector
// on purpose (_mm512_undefined_epi32), which it reads as an uninitialised variable.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// mulhilo8 on 16 lanes.
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i m, __m512i a, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// philox_tile_avx2 on 16 counters at a time; AVX-512 has the unsigned compare the wrap needs.
__attribute__((target("avx512f"))) void philox_tile_avx512(uint64_t seed, uint64_t counter0, uint32_t* c0o,
                                                           uint32_t* c1o, uint32_t* c2o, uint32_t* c3o) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i one = _mm512_set1_epi32(1);
  for (int i = 0; i < kTile; i += 16) {
    const uint64_t base = counter0 + static_cast<uint64_t>(i);
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    __m512i c0 = _mm512_add_epi32(base_lo, lane);
    const __mmask16 wrapped = _mm512_cmplt_epu32_mask(c0, base_lo);
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    __m512i c1 = _mm512_mask_add_epi32(base_hi, wrapped, base_hi, one);
    __m512i c2 = _mm512_setzero_si512();
    __m512i c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(m0, c0, &hi0, &lo0);
      mulhilo16(m1, c2, &hi1, &lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm512_storeu_si512(c0o + i, c0);
    _mm512_storeu_si512(c1o + i, c1);
    _mm512_storeu_si512(c2o + i, c2);
    _mm512_storeu_si512(c3o + i, c3);
  }
}
#pragma GCC diagnostic pop
#endif

// One tile: z[j] = z(seed, 4 * counter0 + j) for its 4 * kTile positions, then acc[j] = z[j], or
// acc[j] += scale * z[j] when accumulating, for j in [skip, skip + count). The body is inlined
// into one copy per instruction set (below), so that its Box-Muller and accumulation loops
// vectorise to that set's width. The operations and their order are the same in every copy (no
// FMA: -ffp-contract=off), and so are the bits.
enum class Isa { kBase, kAvx2, kAvx512 };

template <Isa kIsa>
__attribute__((always_inline)) inline void tile_body(uint64_t seed, uint64_t tile_pos, float scale,
                                                     float* __restrict acc, int skip, int count, bool accumulate) {
  const uint64_t counter0 = tile_pos / 4;
  alignas(64) uint32_t c0[kTile], c1[kTile], c2[kTile], c3[kTile];
#ifdef HOSL_X86_AVX2
  if constexpr (kIsa == Isa::kAvx512)
    philox_tile_avx512(seed, counter0, c0, c1, c2, c3);
  else if constexpr (kIsa == Isa::kAvx2)
    philox_tile_avx2(seed, counter0, c0, c1, c2, c3);
  else
#endif
    philox_tile(seed, counter0, c0, c1, c2, c3);
  alignas(64) float z0[kTile], z1[kTile], z2[kTile], z3[kTile];
  for (int i = 0; i < kTile; ++i) {
    box_muller(c0[i], c1[i], &z0[i], &z1[i]);
    box_muller(c2[i], c3[i], &z2[i], &z3[i]);
  }
  alignas(64) float z[4 * kTile];
  for (int i = 0; i < kTile; ++i) {
    z[4 * i + 0] = z0[i];
    z[4 * i + 1] = z1[i];
    z[4 * i + 2] = z2[i];
    z[4 * i + 3] = z3[i];
  }
  if (accumulate) {
    for (int j = skip; j < skip + count; ++j) acc[j] = acc[j] + scale * z[j];
  } else {
    for (int j = skip; j < skip + count; ++j) acc[j] = z[j];
  }
}

constexpr int kSignCounters = kTilePositions / kSignsPerCounter;

// The 4 * kSignCounters words of a Rademacher tile (tile_pos a multiple of 128), word w of the
// tile's counter c at words[4 * c + w]: the signs of positions tile_pos + 32 * (4 * c + w) + b.
inline void signs_words(uint64_t seed, uint64_t tile_pos, uint32_t* words) {
  uint32_t c0[kSignCounters], c1[kSignCounters], c2[kSignCounters], c3[kSignCounters];
  philox_tile<kSignCounters>(seed, tile_pos / kSignsPerCounter, c0, c1, c2, c3);
  for (int c = 0; c < kSignCounters; ++c) {
    words[4 * c + 0] = c0[c];
    words[4 * c + 1] = c1[c];
    words[4 * c + 2] = c2[c];
    words[4 * c + 3] = c3[c];
  }
}

// A Rademacher tile (tile_pos a multiple of 128): r[j] = +-scale, the sign bit of scale flipped
// where bit j % 32 of word j / 32 is set, which is scale * r exactly; then acc[j] += r[j], or
// acc[j] = r[j], on [skip, skip + count).
template <Isa kIsa>
__attribute__((always_inline)) inline void signs_body(uint64_t seed, uint64_t tile_pos, float scale,
                                                      float* __restrict acc, int skip, int count, bool accumulate) {
  uint32_t words[4 * kSignCounters];
  signs_words(seed, tile_pos, words);
  const uint32_t scale_bits = float_as_bits(scale);
  alignas(64) float r[kTilePositions];
  for (int w = 0; w < 4 * kSignCounters; ++w) {
    const uint32_t word = words[w];
    for (int b = 0; b < 32; ++b) r[32 * w + b] = bits_as_float(scale_bits ^ (((word >> b) & 1u) << 31));
  }
  if (accumulate) {
    for (int j = skip; j < skip + count; ++j) acc[j] = acc[j] + r[j];
  } else {
    for (int j = skip; j < skip + count; ++j) acc[j] = r[j];
  }
}

using TileFn = void (*)(uint64_t, uint64_t, float, float*, int, int, bool);

void tile_base(uint64_t seed, uint64_t tile_pos, float scale, float* acc, int skip, int count, bool accumulate) {
  tile_body<Isa::kBase>(seed, tile_pos, scale, acc, skip, count, accumulate);
}

void signs_base(uint64_t seed, uint64_t tile_pos, float scale, float* acc, int skip, int count, bool accumulate) {
  signs_body<Isa::kBase>(seed, tile_pos, scale, acc, skip, count, accumulate);
}

#ifdef HOSL_X86_AVX2
__attribute__((target("avx2"))) void tile_avx2(uint64_t seed, uint64_t tile_pos, float scale, float* acc, int skip,
                                               int count, bool accumulate) {
  tile_body<Isa::kAvx2>(seed, tile_pos, scale, acc, skip, count, accumulate);
}

__attribute__((target("avx2"))) void signs_avx2(uint64_t seed, uint64_t tile_pos, float scale, float* acc, int skip,
                                                int count, bool accumulate) {
  signs_body<Isa::kAvx2>(seed, tile_pos, scale, acc, skip, count, accumulate);
}

__attribute__((target("avx512f"))) void tile_avx512(uint64_t seed, uint64_t tile_pos, float scale, float* acc,
                                                    int skip, int count, bool accumulate) {
  tile_body<Isa::kAvx512>(seed, tile_pos, scale, acc, skip, count, accumulate);
}

// A whole tile accumulated (every tile but a range's first and last): 16 lanes at a time, each lane
// +scale or -scale by a blend under 16 bits of a word taken as the mask, which is the sign flip
// signs_body makes (-scale is scale with its sign bit flipped), so the same bits.
__attribute__((target("avx512f"))) void signs_avx512(uint64_t seed, uint64_t tile_pos, float scale, float* acc,
                                                     int skip, int count, bool accumulate) {
  if (!accumulate || skip != 0 || count != kTilePositions) {
    signs_body<Isa::kAvx512>(seed, tile_pos, scale, acc, skip, count, accumulate);
    return;
  }
  uint32_t words[4 * kSignCounters];
  signs_words(seed, tile_pos, words);
  const __m512 plus = _mm512_set1_ps(scale);
  const __m512 minus = _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(plus), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  for (int w = 0; w < 4 * kSignCounters; ++w) {
    for (int half = 0; half < 2; ++half) {
      const __mmask16 set = static_cast<__mmask16>(words[w] >> (16 * half));
      float* at = acc + 32 * w + 16 * half;
      _mm512_store_ps(at, _mm512_add_ps(_mm512_load_ps(at), _mm512_mask_blend_ps(set, plus, minus)));
    }
  }
}
#endif

struct Copy {
  const char* name;
  TileFn gaussian;
  TileFn signs;
};

// The copies this CPU runs, widest first.
std::vector<Copy> runnable_copies() {
  std::vector<Copy> copies;
#ifdef HOSL_X86_AVX2
  if (__builtin_cpu_supports("avx512f")) copies.push_back({"avx512", tile_avx512, signs_avx512});
  if (__builtin_cpu_supports("avx2")) copies.push_back({"avx2", tile_avx2, signs_avx2});
#endif
  copies.push_back({"base", tile_base, signs_base});
  return copies;
}

// The copy in use: the widest, unless set_noise_isa chose another (tests and benchmarks do).
std::atomic<int> g_copy{0};

Copy current_copy() {
  static const std::vector<Copy> copies = runnable_copies();
  return copies[static_cast<size_t>(g_copy.load(std::memory_order_relaxed))];
}

inline float load_as_float(const void* x, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(x)[i];
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
    default:
      return fp16_to_float(static_cast<const uint16_t*>(x)[i]);
  }
}

// Rounds once, from the float accumulator into x's dtype.
template <DType kDType>
inline void store_tile(void* x, int64_t first, const float* acc, int count) {
  if constexpr (kDType == DType::kFloat32) {
    std::memcpy(static_cast<float*>(x) + first, acc, sizeof(float) * count);
  } else {
    uint16_t* out = static_cast<uint16_t*>(x) + first;
    for (int j = 0; j < count; ++j)
      out[j] = kDType == DType::kBFloat16 ? float_to_bf16(acc[j]) : float_to_fp16(acc[j]);
  }
}

// Elements [begin, end) of x, i.e. noise positions [offset + begin, offset + end).
template <DType kDType>
void add_noise_range(void* x, int64_t begin, int64_t end, const uint64_t* seeds, const float* scales, int num_terms,
                     uint64_t offset, bool accumulate, Dist dist) {
  alignas(64) float acc[kTilePositions];
  const Copy copy = current_copy();
  const TileFn tile = dist == Dist::kRademacher ? copy.signs : copy.gaussian;
  const uint64_t align = dist == Dist::kRademacher ? kSignsPerCounter : 4;  // a tile starts on a counter
  const uint64_t first_pos = offset + static_cast<uint64_t>(begin);
  const uint64_t end_pos = offset + static_cast<uint64_t>(end);
  for (uint64_t tile_pos = first_pos / align * align; tile_pos < end_pos; tile_pos += kTilePositions) {
    // This tile covers positions [tile_pos, tile_pos + kTilePositions); clip to the range.
    const uint64_t lo = std::max(tile_pos, first_pos);
    const uint64_t hi = std::min(tile_pos + kTilePositions, end_pos);
    const int skip = static_cast<int>(lo - tile_pos);
    const int count = static_cast<int>(hi - lo);
    const int64_t first = static_cast<int64_t>(lo - offset);
    if (accumulate) {
      for (int j = 0; j < count; ++j) acc[skip + j] = load_as_float(x, first + j, kDType);
      for (int k = 0; k < num_terms; ++k) tile(seeds[k], tile_pos, scales[k], acc, skip, count, true);
    } else {
      tile(seeds[0], tile_pos, 1.0f, acc, skip, count, false);
    }
    store_tile<kDType>(x, first, acc + skip, count);
  }
}

template <DType kDType>
void add_noise_threads(void* x, int64_t n, const uint64_t* seeds, const float* scales, int num_terms, uint64_t offset,
                       bool accumulate, int num_threads, Dist dist) {
  const int64_t most = std::max<int64_t>(1, n / kMinPerThread);
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), most));
  if (threads == 1) {
    add_noise_range<kDType>(x, 0, n, seeds, scales, num_terms, offset, accumulate, dist);
    return;
  }
  // Chunk boundaries fall on multiples of 4 * kTile positions so that no tile is computed twice.
  const int64_t quantum = kTilePositions;
  const int64_t per_thread = (n + threads - 1) / threads;
  const int64_t chunk = (per_thread + quantum - 1) / quantum * quantum;
  int ranges = 1;  // range t is [t * chunk, (t + 1) * chunk) clipped to n; the empty ones are dropped
  while (ranges < threads && ranges * chunk < n) ++ranges;
  pool::parallel_for(ranges, [&](int t) {
    const int64_t begin = std::min(n, t * chunk);
    const int64_t end = std::min(n, begin + chunk);
    add_noise_range<kDType>(x, begin, end, seeds, scales, num_terms, offset, accumulate, dist);
  });
}

// Entries [begin, end) of the sorted row list. A run of consecutive table rows is one contiguous
// range of elements and positions, so it is one add_noise_range call: every tile costs 4 * kTile
// normals however few of them a narrow row keeps, and a run shares the tiles its rows straddle.
template <DType kDType>
void add_noise_row_list(void* x, int64_t width, const int64_t* rows, int64_t begin, int64_t end, const uint64_t* seeds,
                        const float* scales, int num_terms, uint64_t offset, Dist dist) {
  for (int64_t i = begin; i < end;) {
    int64_t j = i + 1;
    while (j < end && rows[j] == rows[j - 1] + 1) ++j;
    add_noise_range<kDType>(x, rows[i] * width, (rows[j - 1] + 1) * width, seeds, scales, num_terms, offset,
                            /*accumulate=*/true, dist);
    i = j;
  }
}

template <DType kDType>
void add_noise_rows_threads(void* x, int64_t width, const int64_t* rows, int64_t num_given, const uint64_t* seeds,
                            const float* scales, int num_terms, uint64_t offset, int num_threads, Dist dist) {
  // Split by rows: each thread takes a contiguous slice of the distinct rows, so no two threads
  // write the same element (neighbouring rows may share a tile; each stores only its own part).
  const int64_t most = std::min(num_given, std::max<int64_t>(1, num_given * width / kMinPerThread));
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), most));
  const int64_t per_thread = (num_given + threads - 1) / threads;
  int slices = 1;  // slice t is entries [t * per_thread, (t + 1) * per_thread) clipped; the empty ones dropped
  while (slices < threads && slices * per_thread < num_given) ++slices;
  pool::parallel_for(slices, [&](int t) {
    const int64_t begin = std::min(num_given, t * per_thread);
    const int64_t end = std::min(num_given, begin + per_thread);
    add_noise_row_list<kDType>(x, width, rows, begin, end, seeds, scales, num_terms, offset, dist);
  });
}

}  // namespace

void add_noise(void* x, int64_t n, DType dtype, const uint64_t* seeds, const float* scales, int num_terms,
               uint64_t offset, bool accumulate, int num_threads, Dist dist) {
  if (n <= 0) return;
  switch (dtype) {
    case DType::kFloat32:
      return add_noise_threads<DType::kFloat32>(x, n, seeds, scales, num_terms, offset, accumulate, num_threads, dist);
    case DType::kBFloat16:
      return add_noise_threads<DType::kBFloat16>(x, n, seeds, scales, num_terms, offset, accumulate, num_threads,
                                                 dist);
    case DType::kFloat16:
      return add_noise_threads<DType::kFloat16>(x, n, seeds, scales, num_terms, offset, accumulate, num_threads, dist);
    default:
      break;
  }
  throw std::invalid_argument("hosl._C: unknown dtype code");
}

void add_noise_rows(void* x, int64_t width, const int64_t* rows, int64_t num_given, DType dtype, const uint64_t* seeds,
                    const float* scales, int num_terms, uint64_t offset, int num_threads, Dist dist) {
  if (width < 0 || num_given < 0)
    throw std::invalid_argument("hosl._C: width and the number of rows must be >= 0, got " + std::to_string(width) +
                                " and " + std::to_string(num_given));
  if (width == 0 || num_given == 0) return;
  if (x == nullptr || rows == nullptr) throw std::invalid_argument("hosl._C: null table or rows pointer");
  switch (dtype) {
    case DType::kFloat32:
      return add_noise_rows_threads<DType::kFloat32>(x, width, rows, num_given, seeds, scales, num_terms, offset,
                                                     num_threads, dist);
    case DType::kBFloat16:
      return add_noise_rows_threads<DType::kBFloat16>(x, width, rows, num_given, seeds, scales, num_terms, offset,
                                                      num_threads, dist);
    case DType::kFloat16:
      return add_noise_rows_threads<DType::kFloat16>(x, width, rows, num_given, seeds, scales, num_terms, offset,
                                                     num_threads, dist);
    default:
      break;
  }
  throw std::invalid_argument("hosl._C: unknown dtype code");
}

std::vector<std::string> noise_isas() {
  std::vector<std::string> names;
  for (const Copy& c : runnable_copies()) names.emplace_back(c.name);
  return names;
}

std::string noise_isa() { return current_copy().name; }

void set_noise_isa(const std::string& name) {
  const std::vector<Copy> copies = runnable_copies();
  for (size_t i = 0; i < copies.size(); ++i) {
    if (name == copies[i].name) {
      g_copy.store(static_cast<int>(i), std::memory_order_relaxed);
      return;
    }
  }
  std::string names;
  for (const Copy& c : copies) names += std::string(names.empty() ? "" : ", ") + c.name;
  throw std::invalid_argument("hosl._C: this CPU runs the noise copies " + names + ", not " + name);
}

}  // namespace noise
}  // namespace hosl
