// CRC32C, the wire casts and BoundaryBuffer (see boundary.h).
//
// Encoding touches the data as few times as it can: each 64 KiB chunk of the wire form is written
// (copied, cast or quantised) and then checksummed while it is still in L2, so a raw tensor costs
// one read of the source and one write of the frame, not a copy followed by a second pass for the
// CRC. Decoding checks the CRC over the whole frame before it reads any data out (hosl/boundary.py
// does that), so the data are read twice there; a corrupt frame is never unpacked.
#include "boundary.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "noise.h"  // float <-> fp16 / bf16, round to nearest even

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HOSL_X86_DISPATCH 1  // SSE4.2 crc32 and F16C conversions, each used only if the CPU has it
#endif

namespace hosl {
namespace boundary {
namespace {

using noise::bits_as_float;
using noise::float_as_bits;

template <typename T>
inline T load(const uint8_t* p, uint64_t i) {
  T v;
  std::memcpy(&v, p + i * sizeof(T), sizeof(T));  // the frame may sit at any address
  return v;
}

template <typename T>
inline void store(uint8_t* p, uint64_t i, T v) {
  std::memcpy(p + i * sizeof(T), &v, sizeof(T));
}

std::string fmt(const char* format, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* format, ...) {
  char buf[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buf, sizeof(buf), format, args);
  va_end(args);
  return buf;
}

// ------------------------------------------------------------------------------------------ CRC32C

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC-32C, bit-reflected
// The hardware loop runs three independent crc32 chains over adjacent blocks of this many bytes
// (the instruction's latency is 3 cycles and it issues once per cycle, so one chain would leave
// two thirds of the unit idle), then folds them together with the shift tables below.
constexpr std::size_t kLongBlock = 8192;
constexpr std::size_t kShortBlock = 256;

uint32_t gf2_times(const uint32_t* matrix, uint32_t vec) {
  uint32_t sum = 0;
  for (int i = 0; vec != 0; ++i, vec >>= 1)
    if (vec & 1u) sum ^= matrix[i];
  return sum;
}

// The linear map (column i = image of bit i) that feeds n zero bytes through a CRC register:
// crc(a || b) = zeros(len(b)) applied to crc(a), xor the crc of b started from a zero register.
void zeros_operator(uint64_t n, uint32_t* op) {
  uint32_t bit[32];  // one zero bit: bit 0 folds in the polynomial, bit i moves down to bit i - 1
  bit[0] = kPoly;
  for (int i = 1; i < 32; ++i) bit[i] = 1u << (i - 1);
  uint32_t power[32];  // 2^k zero bytes at step k of the loop below
  for (int i = 0; i < 32; ++i) {
    uint32_t v = 1u << i;
    for (int k = 0; k < 8; ++k) v = gf2_times(bit, v);
    power[i] = v;
  }
  for (int i = 0; i < 32; ++i) op[i] = 1u << i;
  while (n != 0) {
    if (n & 1u)
      for (int i = 0; i < 32; ++i) op[i] = gf2_times(power, op[i]);
    n >>= 1;
    uint32_t squared[32];
    for (int i = 0; i < 32; ++i) squared[i] = gf2_times(power, power[i]);
    std::memcpy(power, squared, sizeof(power));
  }
}

struct CrcTables {
  uint32_t slice[8][256];        // slice[k][b]: byte b followed by k zero bytes, from a zero register
  uint32_t shift_long[4][256];   // zeros_operator(kLongBlock), one table per byte of the register
  uint32_t shift_short[4][256];  // zeros_operator(kShortBlock)

  CrcTables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      slice[0][b] = c;
    }
    for (int k = 1; k < 8; ++k)
      for (uint32_t b = 0; b < 256; ++b) slice[k][b] = (slice[k - 1][b] >> 8) ^ slice[0][slice[k - 1][b] & 0xFFu];
    fill_shift(kLongBlock, shift_long);
    fill_shift(kShortBlock, shift_short);
  }

  static void fill_shift(uint64_t n, uint32_t table[4][256]) {
    uint32_t op[32];
    zeros_operator(n, op);
    for (int k = 0; k < 4; ++k)
      for (uint32_t b = 0; b < 256; ++b) table[k][b] = gf2_times(op, b << (8 * k));
  }
};

const CrcTables& tables() {
  static const CrcTables t;  // built once, thread-safely, on first use
  return t;
}

inline uint32_t shift(const uint32_t table[4][256], uint32_t crc) {
  return table[0][crc & 0xFFu] ^ table[1][(crc >> 8) & 0xFFu] ^ table[2][(crc >> 16) & 0xFFu] ^ table[3][crc >> 24];
}

// Slicing-by-8 (Intel's 2006 scheme): eight table lookups per 8 bytes. The crc argument and result
// are the raw register (no pre/post inversion), as in the hardware loop.
uint32_t crc_register_tables(uint32_t crc, const uint8_t* p, std::size_t n) {
  const CrcTables& t = tables();
  while (n != 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    crc = (crc >> 8) ^ t.slice[0][(crc ^ *p++) & 0xFFu];
    --n;
  }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (; n >= 8; n -= 8, p += 8) {
    const uint64_t w = load<uint64_t>(p, 0) ^ crc;
    crc = t.slice[7][w & 0xFFu] ^ t.slice[6][(w >> 8) & 0xFFu] ^ t.slice[5][(w >> 16) & 0xFFu] ^
          t.slice[4][(w >> 24) & 0xFFu] ^ t.slice[3][(w >> 32) & 0xFFu] ^ t.slice[2][(w >> 40) & 0xFFu] ^
          t.slice[1][(w >> 48) & 0xFFu] ^ t.slice[0][w >> 56];
  }
#endif
  while (n-- != 0) crc = (crc >> 8) ^ t.slice[0][(crc ^ *p++) & 0xFFu];
  return crc;
}

#ifdef HOSL_X86_DISPATCH
__attribute__((target("sse4.2"))) uint32_t crc_register_sse42(uint32_t crc, const uint8_t* p, std::size_t n) {
  const CrcTables& t = tables();
  uint64_t c0 = crc;
  while (n != 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    c0 = _mm_crc32_u8(static_cast<uint32_t>(c0), *p++);
    --n;
  }
  for (const std::size_t block : {kLongBlock, kShortBlock}) {
    const auto& table = block == kLongBlock ? t.shift_long : t.shift_short;
    for (; n >= 3 * block; n -= 3 * block, p += 3 * block) {
      uint64_t c1 = 0, c2 = 0;
      for (std::size_t i = 0; i < block; i += 8) {
        c0 = _mm_crc32_u64(c0, load<uint64_t>(p + i, 0));
        c1 = _mm_crc32_u64(c1, load<uint64_t>(p + block + i, 0));
        c2 = _mm_crc32_u64(c2, load<uint64_t>(p + 2 * block + i, 0));
      }
      c0 = shift(table, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
      c0 = shift(table, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c2);
    }
  }
  for (; n >= 8; n -= 8, p += 8) c0 = _mm_crc32_u64(c0, load<uint64_t>(p, 0));
  while (n-- != 0) c0 = _mm_crc32_u8(static_cast<uint32_t>(c0), *p++);
  return static_cast<uint32_t>(c0);
}
#endif

// -------------------------------------------------------------------------- element types on the wire

// Each floating type: load as float, whether a value is finite in its own type (a float64 can be
// finite and still overflow float), and the rounding store from float.
struct F32 {
  using T = float;
  static float to_float(T v) { return v; }
  static double to_double(T v) { return v; }
  static bool finite(T v) { return (float_as_bits(v) & 0x7F800000u) != 0x7F800000u; }
  static T from_float(float f) { return f; }
  static constexpr const char* name = "float32";
};
struct F64 {
  using T = double;
  static float to_float(T v) { return static_cast<float>(v); }  // nearest even; beyond float's range: inf
  static double to_double(T v) { return v; }
  static bool finite(T v) {
    uint64_t b;
    std::memcpy(&b, &v, sizeof(b));
    return (b & 0x7FF0000000000000ull) != 0x7FF0000000000000ull;
  }
  static T from_float(float f) { return f; }
  static constexpr const char* name = "float64";
};
struct F16 {
  using T = uint16_t;
  static float to_float(T v) { return noise::fp16_to_float(v); }
  static double to_double(T v) { return to_float(v); }
  static bool finite(T v) { return (v & 0x7C00u) != 0x7C00u; }
  static T from_float(float f) { return noise::float_to_fp16(f); }
  static constexpr const char* name = "float16";
  static constexpr double max = 65504.0;
};
struct BF16 {
  using T = uint16_t;
  static float to_float(T v) { return noise::bf16_to_float(v); }
  static double to_double(T v) { return to_float(v); }
  static bool finite(T v) { return (v & 0x7F80u) != 0x7F80u; }
  static T from_float(float f) { return noise::float_to_bf16(f); }
  static constexpr const char* name = "bfloat16";
  static constexpr double max = 0x1.fep127;
};

bool is_floating(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat64 || d == DType::kFloat16 || d == DType::kBFloat16;
}

// Calls f with a value of the trait type for a floating dtype.
template <typename F>
void visit_floating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(F32{});
    case DType::kFloat64:
      return f(F64{});
    case DType::kFloat16:
      return f(F16{});
    case DType::kBFloat16:
      return f(BF16{});
    default:
      throw std::invalid_argument("hosl._C: not a floating dtype code: " + std::to_string(static_cast<int>(dtype)));
  }
}

#ifdef HOSL_X86_DISPATCH
bool f16c_available() {
  static const bool available = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return available;
}

// float32 -> float16 eight at a time with vcvtps2ph, rounding to nearest even: the same bits as
// noise::float_to_fp16 for every input but nan, whose payload it keeps (both give a quiet nan).
// The scalar helper's three-way branch keeps GCC from vectorising it (with FP traps on, it will not
// speculate the float add of the subnormal branch), which left it 3x slower than bf16. Converts
// n - n % 8 elements and returns how many; ORs into *overflow whether a finite value reached inf.
__attribute__((target("avx,f16c"))) uint64_t f32_to_f16_f16c(const float* src, uint8_t* out, uint64_t n,
                                                             uint32_t* overflow) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 lowest_inf = _mm256_set1_ps(65520.0f);  // float16's max + half an ulp: rounds up to inf
  const __m256 max_finite = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 over = _mm256_setzero_ps();
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    const __m256 a = _mm256_andnot_ps(sign, v);
    over = _mm256_or_ps(
        over, _mm256_and_ps(_mm256_cmp_ps(a, lowest_inf, _CMP_GE_OQ), _mm256_cmp_ps(a, max_finite, _CMP_LE_OQ)));
  }
  *overflow |= static_cast<uint32_t>(_mm256_movemask_ps(over) != 0);
  return i;
}

// float16 -> float32 eight at a time with vcvtph2ps (exact, like noise::fp16_to_float).
__attribute__((target("avx,f16c"))) uint64_t f16_to_f32_f16c(const uint8_t* in, float* dst, uint64_t n) {
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i))));
  return i;
}
#endif

// Rounds n source elements into the wire type. A finite value that comes out infinite is an error,
// never a silent inf: the check is an or-reduction in the loop (so it vectorises) and the offending
// element is looked up only when there is one.
template <typename Src, typename Wire>
__attribute__((always_inline)) inline void encode_cast(const typename Src::T* __restrict src, uint8_t* __restrict out,
                                                       uint64_t n, uint64_t first, bool portable) {
  uint32_t overflow = 0;
  uint64_t start = 0;
#ifdef HOSL_X86_DISPATCH
  if constexpr (std::is_same<Src, F32>::value && std::is_same<Wire, F16>::value)
    if (!portable && f16c_available()) start = f32_to_f16_f16c(src, out, n, &overflow);
#endif
  for (uint64_t i = start; i < n; ++i) {
    const typename Wire::T w = Wire::from_float(Src::to_float(src[i]));
    store(out, i, w);
    overflow |= static_cast<uint32_t>(Src::finite(src[i])) & static_cast<uint32_t>(!Wire::finite(w));
  }
  if (overflow == 0) return;
  for (uint64_t i = 0; i < n; ++i) {
    if (Src::finite(src[i]) && !Wire::finite(Wire::from_float(Src::to_float(src[i]))))
      throw std::invalid_argument(fmt("value %.9g at flat index %llu overflows %s (largest finite %.9g)",
                                      Src::to_double(src[i]), static_cast<unsigned long long>(first + i), Wire::name,
                                      Wire::max));
  }
}

// float32 -> bfloat16, the other cast activations take, built for AVX2 too (see quantize_rows_f32).
#ifdef HOSL_X86_DISPATCH
__attribute__((target_clones("avx2", "default")))
#endif
void f32_to_bf16(const float* src, uint8_t* out, uint64_t n, uint64_t first) {
  encode_cast<F32, BF16>(src, out, n, first, /*portable=*/false);  // the flag only selects F16C, unused for bf16
}

template <typename Wire, typename Dst>
void decode_cast(const uint8_t* __restrict in, typename Dst::T* __restrict dst, uint64_t n, bool portable) {
  uint64_t start = 0;
#ifdef HOSL_X86_DISPATCH
  if constexpr (std::is_same<Wire, F16>::value && std::is_same<Dst, F32>::value)
    if (!portable && f16c_available()) start = f16_to_f32_f16c(in, dst, n);
#endif
  for (uint64_t i = start; i < n; ++i) dst[i] = Dst::from_float(Wire::to_float(load<typename Wire::T>(in, i)));
}

// int8, one scale per row: scale = absmax / 127 (at least FLT_MIN, so that x / scale stays finite
// and the error bound below holds for tiny rows; 0 for an all-zero row), q = x / scale rounded to
// nearest even. With every step rounded in float32: |x - q * scale| <= scale * (1/2 + 2^-16).
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (v + m) - m rounds v to nearest even for |v| < 2^22

template <typename Src>
__attribute__((always_inline)) inline void quantize_rows(const typename Src::T* __restrict src, uint64_t rows,
                                                         uint64_t row_len, uint8_t* __restrict q_out,
                                                         uint8_t* __restrict scales_out, uint64_t first_row) {
  for (uint64_t r = 0; r < rows; ++r) {
    const typename Src::T* x = src + r * row_len;
    // For non-negative floats the bit patterns order like the values, so the row's absmax is an
    // integer max (which vectorises), and any inf or nan shows as bits above FLT_MAX's.
    uint32_t amax_bits = 0;
    for (uint64_t i = 0; i < row_len; ++i)
      amax_bits = std::max(amax_bits, float_as_bits(Src::to_float(x[i])) & 0x7FFFFFFFu);
    if (amax_bits > 0x7F7FFFFFu)
      throw std::invalid_argument(fmt("row %llu holds inf or nan%s; int8 quantisation needs finite rows",
                                      static_cast<unsigned long long>(first_row + r),
                                      std::is_same<Src, F64>::value ? " (as float32)" : ""));
    const float amax = bits_as_float(amax_bits);
    int8_t* q = reinterpret_cast<int8_t*>(q_out) + r * row_len;
    if (amax_bits == 0) {
      store(scales_out, r, 0.0f);
      std::memset(q, 0, row_len);
      continue;
    }
    const float scale = std::max(amax / 127.0f, std::numeric_limits<float>::min());
    store(scales_out, r, scale);
    for (uint64_t i = 0; i < row_len; ++i) {
      const float v = (Src::to_float(x[i]) / scale + kRoundMagic) - kRoundMagic;
      q[i] = static_cast<int8_t>(std::min(127, std::max(-127, static_cast<int32_t>(v))));
    }
  }
}

// The float32 case, which activations take, also built for AVX2 and picked at load time: baseline
// x86-64 (SSE2) has no 32-bit integer min/max or 8-wide conversions, and the AVX2 build quantises
// about 1.7x faster. The operations are the same IEEE ones (no FMA: -ffp-contract=off), so the
// bytes are too.
#ifdef HOSL_X86_DISPATCH
__attribute__((target_clones("avx2", "default")))
#endif
void quantize_rows_f32(const float* src, uint64_t rows, uint64_t row_len, uint8_t* q_out, uint8_t* scales_out,
                       uint64_t first_row) {
  quantize_rows<F32>(src, rows, row_len, q_out, scales_out, first_row);
}

template <typename Dst>
int64_t dequantize_rows(const uint8_t* __restrict q_in, const uint8_t* __restrict scales_in, uint64_t rows,
                        uint64_t row_len, typename Dst::T* __restrict dst) {
  for (uint64_t r = 0; r < rows; ++r) {
    const float scale = load<float>(scales_in, r);
    if (!(scale >= 0.0f && scale <= std::numeric_limits<float>::max())) return static_cast<int64_t>(r);
    const int8_t* q = reinterpret_cast<const int8_t*>(q_in) + r * row_len;
    typename Dst::T* y = dst + r * row_len;
    for (uint64_t i = 0; i < row_len; ++i) y[i] = Dst::from_float(static_cast<float>(q[i]) * scale);
  }
  return -1;
}

constexpr uint64_t kChunkBytes = 64 << 10;  // wire bytes per write-then-checksum step: fits in L2

DType checked_dtype(DType dtype) {
  dtype_size(dtype);  // throws for an unknown code
  return dtype;
}

void check_range(uint64_t frame_len, uint64_t offset, uint64_t nbytes, const char* what) {
  if (offset > frame_len || nbytes > frame_len - offset)
    throw std::invalid_argument(fmt("hosl._C: %s [%llu, +%llu) runs past the frame's %llu bytes", what,
                                    static_cast<unsigned long long>(offset), static_cast<unsigned long long>(nbytes),
                                    static_cast<unsigned long long>(frame_len)));
}

// Checks what encode_tensor and decode_tensor share; returns the number of rows for kInt8.
uint64_t check_tensor(uint64_t frame_len, uint64_t offset, Encoding encoding, DType dtype, uint64_t numel,
                      uint64_t row_len, uint64_t scales_offset, bool has_data) {
  checked_dtype(dtype);
  if (encoding != Encoding::kRaw && !is_floating(dtype))
    throw std::invalid_argument(fmt("hosl._C: encoding %d applies to floating dtypes only, got dtype code %d",
                                    static_cast<int>(encoding), static_cast<int>(dtype)));
  if (numel > frame_len)
    throw std::invalid_argument(fmt("hosl._C: %llu elements cannot fit in a %llu-byte frame",
                                    static_cast<unsigned long long>(numel),
                                    static_cast<unsigned long long>(frame_len)));
  if (numel > 0 && !has_data) throw std::invalid_argument("hosl._C: null tensor data pointer");
  const uint64_t nbytes = wire_bytes(encoding, dtype, numel);
  check_range(frame_len, offset, nbytes, "tensor data");
  if (encoding != Encoding::kInt8) return 0;
  if (row_len == 0 || numel % row_len != 0)
    throw std::invalid_argument(fmt("hosl._C: row length %llu does not divide %llu elements",
                                    static_cast<unsigned long long>(row_len), static_cast<unsigned long long>(numel)));
  const uint64_t rows = numel / row_len;
  if (scales_offset < offset + nbytes) throw std::invalid_argument("hosl._C: int8 scales must follow the data");
  check_range(frame_len, scales_offset, rows * sizeof(float), "int8 scales");
  return rows;
}

}  // namespace

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
    case DType::kInt64:
      return 8;
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kInt16:
      return 2;
    case DType::kInt8:
    case DType::kUInt8:
    case DType::kBool:
      return 1;
  }
  throw std::invalid_argument("hosl._C: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

uint64_t wire_bytes(Encoding encoding, DType dtype, uint64_t numel) {
  uint64_t size;
  switch (encoding) {
    case Encoding::kRaw:
      size = dtype_size(dtype);
      break;
    case Encoding::kFloat16:
    case Encoding::kBFloat16:
      size = 2;
      break;
    case Encoding::kInt8:
      size = 1;
      break;
    default:
      throw std::invalid_argument("hosl._C: unknown encoding code " + std::to_string(static_cast<int>(encoding)));
  }
  uint64_t nbytes;
  if (__builtin_mul_overflow(numel, size, &nbytes)) throw std::invalid_argument("hosl._C: tensor byte size overflows");
  return nbytes;
}

bool crc32c_hardware() {
#ifdef HOSL_X86_DISPATCH
  static const bool available = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") != 0;
  }();
  return available;
#else
  return false;
#endif
}

uint32_t crc32c_portable(uint32_t crc, const void* data, std::size_t n) {
  return ~crc_register_tables(~crc, static_cast<const uint8_t*>(data), n);
}

uint32_t crc32c(uint32_t crc, const void* data, std::size_t n) {
#ifdef HOSL_X86_DISPATCH
  if (crc32c_hardware()) return ~crc_register_sse42(~crc, static_cast<const uint8_t*>(data), n);
#endif
  return crc32c_portable(crc, data, n);
}

uint32_t encode_tensor(uint8_t* frame, uint64_t frame_len, uint32_t crc, uint64_t crc_from, uint64_t offset,
                       Encoding encoding, const void* src, DType dtype, uint64_t numel, uint64_t row_len,
                       uint64_t scales_offset, bool portable) {
  if (frame == nullptr) throw std::invalid_argument("hosl._C: null frame pointer");
  const uint64_t rows =
      check_tensor(frame_len, offset, encoding, dtype, numel, row_len, scales_offset, src != nullptr);
  if (crc_from > offset) throw std::invalid_argument("hosl._C: crc_from must not be past the data offset");
  const auto checksum = portable ? crc32c_portable : crc32c;
  crc = checksum(crc, frame + crc_from, offset - crc_from);
  uint8_t* out = frame + offset;
  if (encoding == Encoding::kRaw) {
    const uint8_t* in = static_cast<const uint8_t*>(src);
    const uint64_t nbytes = numel * dtype_size(dtype);
    for (uint64_t done = 0; done < nbytes; done += kChunkBytes) {
      const uint64_t n = std::min(kChunkBytes, nbytes - done);
      std::memcpy(out + done, in + done, n);
      crc = checksum(crc, out + done, n);
    }
  } else if (encoding == Encoding::kInt8) {
    visit_floating(dtype, [&](auto src_type) {
      using S = decltype(src_type);
      const auto* x = static_cast<const typename S::T*>(src);
      const uint64_t rows_per_chunk = std::max<uint64_t>(1, kChunkBytes / row_len);
      for (uint64_t r = 0; r < rows; r += rows_per_chunk) {
        const uint64_t n = std::min(rows_per_chunk, rows - r);
        // The scales region comes after the data, so it is checksummed by a later call, after it
        // has been filled in here.
        uint8_t* scales = frame + scales_offset + r * sizeof(float);
        if constexpr (std::is_same<S, F32>::value)
          quantize_rows_f32(x + r * row_len, n, row_len, out + r * row_len, scales, r);
        else
          quantize_rows<S>(x + r * row_len, n, row_len, out + r * row_len, scales, r);
        crc = checksum(crc, out + r * row_len, n * row_len);
      }
    });
  } else {
    visit_floating(dtype, [&](auto src_type) {
      using S = decltype(src_type);
      const auto* x = static_cast<const typename S::T*>(src);
      constexpr uint64_t per_chunk = kChunkBytes / 2;
      for (uint64_t i = 0; i < numel; i += per_chunk) {
        const uint64_t n = std::min(per_chunk, numel - i);
        if (encoding == Encoding::kFloat16)
          encode_cast<S, F16>(x + i, out + 2 * i, n, i, portable);
        else if constexpr (std::is_same<S, F32>::value)
          f32_to_bf16(x + i, out + 2 * i, n, i);
        else
          encode_cast<S, BF16>(x + i, out + 2 * i, n, i, portable);
        crc = checksum(crc, out + 2 * i, 2 * n);
      }
    });
  }
  return crc;
}

int64_t decode_tensor(const uint8_t* frame, uint64_t frame_len, uint64_t offset, Encoding encoding, DType dtype,
                      uint64_t numel, uint64_t row_len, uint64_t scales_offset, void* dst, bool portable) {
  if (frame == nullptr) throw std::invalid_argument("hosl._C: null frame pointer");
  const uint64_t rows =
      check_tensor(frame_len, offset, encoding, dtype, numel, row_len, scales_offset, dst != nullptr);
  if (numel == 0) return -1;
  const uint8_t* in = frame + offset;
  if (encoding == Encoding::kRaw) {
    std::memcpy(dst, in, numel * dtype_size(dtype));
    return -1;
  }
  int64_t bad_row = -1;
  visit_floating(dtype, [&](auto dst_type) {
    using D = decltype(dst_type);
    auto* y = static_cast<typename D::T*>(dst);
    if (encoding == Encoding::kInt8)
      bad_row = dequantize_rows<D>(in, frame + scales_offset, rows, row_len, y);
    else if (encoding == Encoding::kFloat16)
      decode_cast<F16, D>(in, y, numel, portable);
    else
      decode_cast<BF16, D>(in, y, numel, portable);
  });
  return bad_row;
}

// ---------------------------------------------------------------------------------- BoundaryBuffer

BoundaryBuffer::BoundaryBuffer(int64_t slots, int64_t slot_bytes)
    : slots_(slots), slot_bytes_(slot_bytes), stride_((static_cast<std::size_t>(slot_bytes) + 63) & ~std::size_t{63}) {
  if (slots < 1)
    throw std::invalid_argument("hosl._C.BoundaryBuffer: slots must be >= 1, got " + std::to_string(slots));
  if (slot_bytes < 1)
    throw std::invalid_argument("hosl._C.BoundaryBuffer: slot_bytes must be >= 1, got " + std::to_string(slot_bytes));
  std::size_t total;
  if (__builtin_mul_overflow(stride_, static_cast<std::size_t>(slots), &total) || total > (std::size_t{1} << 48))
    throw std::invalid_argument(fmt("hosl._C.BoundaryBuffer: %lld slots of %lld bytes is too much memory",
                                    static_cast<long long>(slots), static_cast<long long>(slot_bytes)));
  storage_.reset(new uint8_t[total + 63]);  // std::bad_alloc becomes MemoryError
  base_ = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(storage_.get()) + 63) & ~uintptr_t{63});
  lengths_.assign(static_cast<std::size_t>(slots), 0);
  states_.assign(static_cast<std::size_t>(slots), State::kFree);
}

bool BoundaryBuffer::push(const void* src, uint64_t nbytes, double wait_s) {
  if (nbytes > static_cast<uint64_t>(slot_bytes_))
    throw std::invalid_argument(fmt("hosl._C.BoundaryBuffer: a %llu-byte frame does not fit in a %lld-byte slot",
                                    static_cast<unsigned long long>(nbytes), static_cast<long long>(slot_bytes_)));
  if (nbytes > 0 && src == nullptr) throw std::invalid_argument("hosl._C.BoundaryBuffer: null source pointer");
  if (!(wait_s >= 0.0 && wait_s < 1e9)) throw std::invalid_argument("hosl._C.BoundaryBuffer: bad wait time");
  std::unique_lock<std::mutex> lock(mutex_);
  const auto ready = [&] { return closed_ || states_[write_ticket_ % slots_] == State::kFree; };
  if (!can_push_.wait_for(lock, std::chrono::duration<double>(wait_s), ready)) return false;
  if (closed_) throw BufferClosed("hosl._C.BoundaryBuffer: push on a closed buffer (close() was called)");
  const std::size_t i = write_ticket_++ % slots_;
  states_[i] = State::kWriting;
  lock.unlock();
  std::memcpy(slot_data(i), src, nbytes);  // unlocked: pops of older frames and other pushes go on meanwhile
  lock.lock();
  lengths_[i] = nbytes;
  states_[i] = State::kFull;
  ++full_;
  lock.unlock();
  can_pop_.notify_all();  // all: waiters wait for different slots (and for close)
  return true;
}

bool BoundaryBuffer::pop_into(void* dst, uint64_t capacity, double wait_s, uint64_t* nbytes) {
  if (capacity > 0 && dst == nullptr) throw std::invalid_argument("hosl._C.BoundaryBuffer: null destination pointer");
  if (!(wait_s >= 0.0 && wait_s < 1e9)) throw std::invalid_argument("hosl._C.BoundaryBuffer: bad wait time");
  std::unique_lock<std::mutex> lock(mutex_);
  // The oldest frame may still be being written by its push; wait for it rather than skip it, so
  // the order stays that of the reservations. Closed and nothing held (or coming): give up.
  const auto ready = [&] {
    const State s = states_[read_ticket_ % slots_];
    return s == State::kFull || (closed_ && s == State::kFree);
  };
  if (!can_pop_.wait_for(lock, std::chrono::duration<double>(wait_s), ready)) return false;
  const std::size_t i = read_ticket_ % slots_;
  if (states_[i] != State::kFull)
    throw BufferClosed("hosl._C.BoundaryBuffer: pop on a closed buffer with no frames left (close() was called)");
  const uint64_t n = lengths_[i];
  if (n > capacity)
    throw std::invalid_argument(
        fmt("hosl._C.BoundaryBuffer: the next frame is %llu bytes, more than the %llu-byte "
            "destination; it stays in the buffer",
            static_cast<unsigned long long>(n), static_cast<unsigned long long>(capacity)));
  ++read_ticket_;
  states_[i] = State::kReading;
  --full_;
  lock.unlock();
  std::memcpy(dst, slot_data(i), n);
  lock.lock();
  states_[i] = State::kFree;
  const bool wake_pops = closed_;  // a pop on a closed buffer may be waiting for this slot to settle
  lock.unlock();
  can_push_.notify_all();
  if (wake_pops) can_pop_.notify_all();
  *nbytes = n;
  return true;
}

void BoundaryBuffer::close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  can_push_.notify_all();
  can_pop_.notify_all();
}

int64_t BoundaryBuffer::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return full_;
}

bool BoundaryBuffer::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

}  // namespace boundary
}  // namespace hosl
