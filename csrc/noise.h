// Seeded Gaussian noise z(seed, j) for the CPU: the C++ side of the noise contract.
// (Rademacher directions r(seed, j) = +-1 share the driver: bit j % 128 of the same Philox at counter
// j / 128, word (j % 128) / 32, bit j % 32, -1 where it is set; see noise.cpp.)
//
// z(seed, j) depends only on the 64-bit seed and the flat position j. Philox4x32-10 keyed by the
// seed, counter = j / 4, gives four 32-bit words; Box-Muller turns words (0, 1) into the normals at
// lanes 0 and 1 and words (2, 3) into lanes 2 and 3. Every floating-point step is an IEEE operation
// with one rounding (add, mul, correctly rounded div and sqrt, exact int->float conversion), in a
// fixed order, with no FMA contraction (setup.py compiles with -ffp-contract=off). The torch
// reference (hosl/reference.py) and the Triton kernel (kernels/noise.py) spell out the same steps,
// so all three backends produce the same bits; tests/test_noise.py checks it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "dtype.h"

namespace hosl {
namespace noise {

// Philox4x32 multipliers and Weyl key increments (Salmon et al., SC'11).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f): fdlibm's logf minimax
// coefficients (|error of R| < 2^-34 on the reduced range), ln 2 split in a high part with
// trailing zero bits (k * LN2_HI is exact for |k| < 128) and a low part.
constexpr float kLg1 = 0x1.555554p-1f;
constexpr float kLg2 = 0x1.999c26p-2f;
constexpr float kLg3 = 0x1.23d3dcp-2f;
constexpr float kLg4 = 0x1.f13c4cp-3f;
constexpr float kLn2Hi = 0x1.62e3p-1f;
constexpr float kLn2Lo = 0x1.2fefa2p-17f;
constexpr uint32_t kSqrt2Bits = 0x3FB504F3u;  // float(sqrt(2)) rounded down

// Taylor coefficients of sin and cos, rounded to float. On |a| <= pi/4 the truncation error is
// below 2e-9, under half an ulp of the results.
constexpr float kS1 = -0x1.555556p-3f;
constexpr float kS2 = 0x1.111112p-7f;
constexpr float kS3 = -0x1.a01a02p-13f;
constexpr float kS4 = 0x1.71de3ap-19f;
constexpr float kC1 = -0.5f;
constexpr float kC2 = 0x1.555556p-5f;
constexpr float kC3 = -0x1.6c16c2p-10f;
constexpr float kC4 = 0x1.a01a02p-16f;
constexpr float kC5 = -0x1.27e4fcp-22f;
constexpr float kAngleStep = 0x1.921fb6p-22f;  // float(pi) / 2^23: radians per unit of the 24-bit angle
constexpr float kTwoPowMinus24 = 0x1p-24f;

inline float bits_as_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

inline uint32_t float_as_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// Natural log of u in [2^-24, 1] (always a normal float here).
inline float log_unit(float u) {
  const uint32_t bits = float_as_bits(u);
  // Arithmetic instead of branches or selects, so that the tile loops vectorise.
  uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;             // mantissa m in [1, 2)
  const uint32_t big = static_cast<uint32_t>(mbits > kSqrt2Bits);  // keep m in [sqrt(2)/2, sqrt(2)]
  mbits -= big << 23;
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(big);
  const float f = bits_as_float(mbits) - 1.0f;  // exact (Sterbenz)
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (kLg2 + w * kLg4);
  const float t2 = z * (kLg1 + w * kLg3);
  const float r = t2 + t1;
  const float hfsq = (0.5f * f) * f;
  const float k = static_cast<float>(e);
  return k * kLn2Hi - ((hfsq - (s * (hfsq + r) + k * kLn2Lo)) - f);
}

// Box-Muller on one pair of Philox words: radius from a, angle from b.
inline void box_muller(uint32_t a, uint32_t b, float* z_cos, float* z_sin) {
  const float u = static_cast<float>(static_cast<int32_t>(a >> 8) + 1) * kTwoPowMinus24;  // (0, 1]
  const float radius = std::sqrt(log_unit(u) * -2.0f);
  // Angle 2*pi*y/2^24 = quadrant * pi/2 + rem * pi/2^23 with rem in [-2^21, 2^21): the range
  // reduction is integer arithmetic, so it is exact.
  const int32_t y = static_cast<int32_t>(b >> 8);
  const int32_t qq = (y + (1 << 21)) >> 22;
  const int32_t rem = y - (qq << 22);
  const int32_t q = qq & 3;
  const float a1 = static_cast<float>(rem) * kAngleStep;
  const float a2 = a1 * a1;
  const float ps = kS3 + a2 * kS4;
  const float ps2 = kS2 + a2 * ps;
  const float ps3 = kS1 + a2 * ps2;
  const float sn = a1 + (a1 * a2) * ps3;
  const float pc = kC4 + a2 * kC5;
  const float pc2 = kC3 + a2 * pc;
  const float pc3 = kC2 + a2 * pc2;
  const float pc4 = kC1 + a2 * pc3;
  const float cs = 1.0f + a2 * pc4;
  // Rotate by the quadrant: odd quadrants swap cos and sin; cos is negated in quadrants 1 and 2,
  // sin in 2 and 3. Negation flips the sign bit, exactly what unary minus does.
  const uint32_t swap = 0u - static_cast<uint32_t>(q & 1);
  const uint32_t cs_bits = float_as_bits(cs);
  const uint32_t sn_bits = float_as_bits(sn);
  const uint32_t neg_cos = static_cast<uint32_t>((q ^ (q >> 1)) & 1) << 31;
  const uint32_t neg_sin = static_cast<uint32_t>(q >> 1) << 31;
  const float cos_t = bits_as_float(((cs_bits & ~swap) | (sn_bits & swap)) ^ neg_cos);
  const float sin_t = bits_as_float(((sn_bits & ~swap) | (cs_bits & swap)) ^ neg_sin);
  *z_cos = radius * cos_t;
  *z_sin = radius * sin_t;
}

// Round a float to bfloat16 (nearest, ties to even); NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float f) {
  const uint32_t b = float_as_bits(f);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((b >> 16) | 0x0040u) : rounded);
}

inline float bf16_to_float(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }

// Round a float to IEEE half (nearest, ties to even), subnormals and overflow included.
inline uint16_t float_to_fp16(float f) {
  uint32_t b = float_as_bits(f);
  const uint32_t sign = (b >> 16) & 0x8000u;
  b &= 0x7FFFFFFFu;
  uint32_t h;
  if (b >= 0x47800000u) {  // >= 2^16: infinity, or NaN (quiet)
    h = b > 0x7F800000u ? 0x7E00u : 0x7C00u;
  } else if (b < 0x38800000u) {  // below 2^-14: a half subnormal or zero
    // Adding 0.5 puts the half's subnormal unit (2^-24) at the float's last bit, so the FPU's own
    // round-to-nearest-even does the rounding; the low bits of the sum are the half's bits.
    h = float_as_bits(bits_as_float(b) + 0.5f) - 0x3F000000u;
  } else {
    const uint32_t odd = (b >> 13) & 1u;
    b += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + odd;  // rebias, round half to even
    h = b >> 13;                                                  // a carry into the exponent is right
  }
  return static_cast<uint16_t>(h | sign);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t b = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const uint32_t exp = b & (0x7C00u << 13);
  b += static_cast<uint32_t>(127 - 15) << 23;
  if (exp == (0x7C00u << 13)) {
    b += static_cast<uint32_t>(128 - 16) << 23;  // infinity or NaN
  } else if (exp == 0) {
    // Subnormal or zero: scale by 2^-14 through an exact float subtraction.
    b += 1u << 23;
    b = float_as_bits(bits_as_float(b) - bits_as_float(113u << 23));
  }
  return bits_as_float(b | sign);
}

using DType = hosl::DType;  // the wire numbering (dtype.h); the noise writes float32, bfloat16, float16

// The distribution of the directions: z, the Gaussian above, or r, +-1 from one Philox bit each.
enum class Dist : int { kGaussian = 0, kRademacher = 1 };

// x[i] += sum_k scales[k] * z(seeds[k], offset + i) for i in [0, n), accumulated in float in the
// order of k and rounded once into x's dtype (z or r by dist). With accumulate = false (and one term
// of scale 1), writes z itself into float x instead. Splits the work over num_threads threads; the
// result does not depend on the split.
void add_noise(void* x, int64_t n, DType dtype, const uint64_t* seeds, const float* scales, int num_terms,
               uint64_t offset, bool accumulate, int num_threads, Dist dist = Dist::kGaussian);

// The rows of a row-major table of rows of `width` elements at x: for each r in rows[0, num_given)
// and j < width, x[r * width + j] += sum_k scales[k] * z(seeds[k], offset + r * width + j), the
// position the element has in the dense layout, so the rows get exactly the bits add_noise would
// give them and the other rows are not touched. rows must be sorted and distinct (the caller
// deduplicates: threads own disjoint ranges of the list, so a repeated row would be a data race).
// Splits the list over num_threads threads; the result does not depend on the split.
void add_noise_rows(void* x, int64_t width, const int64_t* rows, int64_t num_given, DType dtype, const uint64_t* seeds,
                    const float* scales, int num_terms, uint64_t offset, int num_threads, Dist dist = Dist::kGaussian);

// The CPU kernel comes in copies for instruction sets (x86-64: avx512, avx2, base), with the same
// bits. noise_isas: the copies this CPU runs, widest first; noise_isa: the one in use (the widest
// unless set); set_noise_isa: use another (throws std::invalid_argument for one the CPU lacks).
std::vector<std::string> noise_isas();
std::string noise_isa();
void set_noise_isa(const std::string& name);

}  // namespace noise
}  // namespace hosl
