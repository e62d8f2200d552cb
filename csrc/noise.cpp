// CPU driver for the noise primitive: tiles of Philox counters, written so that GCC and Clang
// vectorise the inner loops (no calls, no data-dependent branches, structure-of-arrays tiles),
// split over std::threads. Threads own disjoint ranges of x and every element is computed from
// (seed, position) alone, so the thread count never changes a bit of the result.
#include "noise.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define HOSL_X86_AVX2 1
#include <immintrin.h>
#endif

namespace hosl {
namespace noise {
namespace {

constexpr int kTile = 64;                   // Philox counters per tile: 256 normals, 1 KiB of floats
constexpr int64_t kMinPerThread = 1 << 15;  // below this, a thread costs more than it saves
static_assert(kTile % 8 == 0, "philox_tile_avx2 takes counters 8 at a time");

// x86-64: an AVX2 copy beside the baseline one, picked at load time by the CPU (GCC/Clang function
// multiversioning). AVX2 doubles the lanes of the Box-Muller float math (Philox has its own AVX2
// path below); the operations and their order are the same (no FMA: -ffp-contract=off), so the
// bits are too.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define HOSL_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HOSL_TARGET_CLONES
#endif

// The Philox words of counters [counter0, counter0 + kTile), word w of counter counter0 + i in cw[i].
// Portable C++; the compiler vectorises it, but it widens the 32x32->64-bit products through lane
// shuffles, so x86-64 CPUs with AVX2 run philox_tile_avx2 instead.
void philox_tile(uint64_t seed, uint64_t counter0, uint32_t* __restrict c0, uint32_t* __restrict c1,
                 uint32_t* __restrict c2, uint32_t* __restrict c3) {
  for (int i = 0; i < kTile; ++i) {
    const uint64_t c = counter0 + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(c);
    c1[i] = static_cast<uint32_t>(c >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int i = 0; i < kTile; ++i) {
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

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// The 4 * kTile normals of counters [counter0, counter0 + kTile), interleaved: z[4 * i + lane].
HOSL_TARGET_CLONES void normals_tile(uint64_t seed, uint64_t counter0, float* __restrict z) {
  alignas(32) uint32_t c0[kTile], c1[kTile], c2[kTile], c3[kTile];
#ifdef HOSL_X86_AVX2
  if (have_avx2())
    philox_tile_avx2(seed, counter0, c0, c1, c2, c3);
  else
#endif
    philox_tile(seed, counter0, c0, c1, c2, c3);
  float z0[kTile], z1[kTile], z2[kTile], z3[kTile];
  for (int i = 0; i < kTile; ++i) {
    box_muller(c0[i], c1[i], &z0[i], &z1[i]);
    box_muller(c2[i], c3[i], &z2[i], &z3[i]);
  }
  for (int i = 0; i < kTile; ++i) {
    z[4 * i + 0] = z0[i];
    z[4 * i + 1] = z1[i];
    z[4 * i + 2] = z2[i];
    z[4 * i + 3] = z3[i];
  }
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
                     uint64_t offset, bool accumulate) {
  alignas(64) float z[4 * kTile];
  alignas(64) float acc[4 * kTile];
  const uint64_t first_pos = offset + static_cast<uint64_t>(begin);
  const uint64_t end_pos = offset + static_cast<uint64_t>(end);
  for (uint64_t counter = first_pos / 4; 4 * counter < end_pos; counter += kTile) {
    // This tile covers positions [4 * counter, 4 * counter + 4 * kTile); clip to the range.
    const uint64_t tile_pos = 4 * counter;
    const uint64_t lo = std::max(tile_pos, first_pos);
    const uint64_t hi = std::min(tile_pos + 4 * kTile, end_pos);
    const int skip = static_cast<int>(lo - tile_pos);
    const int count = static_cast<int>(hi - lo);
    const int64_t first = static_cast<int64_t>(lo - offset);
    if (accumulate) {
      for (int j = 0; j < count; ++j) acc[skip + j] = load_as_float(x, first + j, kDType);
      for (int k = 0; k < num_terms; ++k) {
        normals_tile(seeds[k], counter, z);
        const float c = scales[k];
        for (int j = skip; j < skip + count; ++j) acc[j] = acc[j] + c * z[j];
      }
    } else {
      normals_tile(seeds[0], counter, acc);
    }
    store_tile<kDType>(x, first, acc + skip, count);
  }
}

template <DType kDType>
void add_noise_threads(void* x, int64_t n, const uint64_t* seeds, const float* scales, int num_terms, uint64_t offset,
                       bool accumulate, int num_threads) {
  const int64_t most = std::max<int64_t>(1, n / kMinPerThread);
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), most));
  if (threads == 1) {
    add_noise_range<kDType>(x, 0, n, seeds, scales, num_terms, offset, accumulate);
    return;
  }
  // Chunk boundaries fall on multiples of 4 * kTile positions so that no tile is computed twice.
  const int64_t quantum = 4 * kTile;
  const int64_t per_thread = (n + threads - 1) / threads;
  const int64_t chunk = (per_thread + quantum - 1) / quantum * quantum;
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    const int64_t begin = std::min(n, t * chunk);
    const int64_t end = std::min(n, begin + chunk);
    if (begin >= end) break;
    pool.emplace_back(add_noise_range<kDType>, x, begin, end, seeds, scales, num_terms, offset, accumulate);
  }
  add_noise_range<kDType>(x, 0, std::min(n, chunk), seeds, scales, num_terms, offset, accumulate);
  for (auto& th : pool) th.join();
}

// Entries [begin, end) of the sorted row list. A run of consecutive table rows is one contiguous
// range of elements and positions, so it is one add_noise_range call: every tile costs 4 * kTile
// normals however few of them a narrow row keeps, and a run shares the tiles its rows straddle.
template <DType kDType>
void add_noise_row_list(void* x, int64_t width, const int64_t* rows, int64_t begin, int64_t end, const uint64_t* seeds,
                        const float* scales, int num_terms, uint64_t offset) {
  for (int64_t i = begin; i < end;) {
    int64_t j = i + 1;
    while (j < end && rows[j] == rows[j - 1] + 1) ++j;
    add_noise_range<kDType>(x, rows[i] * width, (rows[j - 1] + 1) * width, seeds, scales, num_terms, offset,
                            /*accumulate=*/true);
    i = j;
  }
}

template <DType kDType>
void add_noise_rows_threads(void* x, int64_t width, const int64_t* rows, int64_t num_given, const uint64_t* seeds,
                            const float* scales, int num_terms, uint64_t offset, int num_threads) {
  // Split by rows: each thread takes a contiguous slice of the distinct rows, so no two threads
  // write the same element (neighbouring rows may share a tile; each stores only its own part).
  const int64_t most = std::min(num_given, std::max<int64_t>(1, num_given * width / kMinPerThread));
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), most));
  const int64_t per_thread = (num_given + threads - 1) / threads;
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    const int64_t begin = std::min(num_given, t * per_thread);
    const int64_t end = std::min(num_given, begin + per_thread);
    if (begin >= end) break;
    pool.emplace_back(add_noise_row_list<kDType>, x, width, rows, begin, end, seeds, scales, num_terms, offset);
  }
  add_noise_row_list<kDType>(x, width, rows, 0, std::min(num_given, per_thread), seeds, scales, num_terms, offset);
  for (auto& th : pool) th.join();
}

}  // namespace

void add_noise(void* x, int64_t n, DType dtype, const uint64_t* seeds, const float* scales, int num_terms,
               uint64_t offset, bool accumulate, int num_threads) {
  if (n <= 0) return;
  switch (dtype) {
    case DType::kFloat32:
      return add_noise_threads<DType::kFloat32>(x, n, seeds, scales, num_terms, offset, accumulate, num_threads);
    case DType::kBFloat16:
      return add_noise_threads<DType::kBFloat16>(x, n, seeds, scales, num_terms, offset, accumulate, num_threads);
    case DType::kFloat16:
      return add_noise_threads<DType::kFloat16>(x, n, seeds, scales, num_terms, offset, accumulate, num_threads);
    default:
      break;
  }
  throw std::invalid_argument("hosl._C: unknown dtype code");
}

void add_noise_rows(void* x, int64_t width, const int64_t* rows, int64_t num_given, DType dtype, const uint64_t* seeds,
                    const float* scales, int num_terms, uint64_t offset, int num_threads) {
  if (width < 0 || num_given < 0)
    throw std::invalid_argument("hosl._C: width and the number of rows must be >= 0, got " + std::to_string(width) +
                                " and " + std::to_string(num_given));
  if (width == 0 || num_given == 0) return;
  if (x == nullptr || rows == nullptr) throw std::invalid_argument("hosl._C: null table or rows pointer");
  switch (dtype) {
    case DType::kFloat32:
      return add_noise_rows_threads<DType::kFloat32>(x, width, rows, num_given, seeds, scales, num_terms, offset,
                                                     num_threads);
    case DType::kBFloat16:
      return add_noise_rows_threads<DType::kBFloat16>(x, width, rows, num_given, seeds, scales, num_terms, offset,
                                                      num_threads);
    case DType::kFloat16:
      return add_noise_rows_threads<DType::kFloat16>(x, width, rows, num_given, seeds, scales, num_terms, offset,
                                                     num_threads);
    default:
      break;
  }
  throw std::invalid_argument("hosl._C: unknown dtype code");
}

}  // namespace noise
}  // namespace hosl
