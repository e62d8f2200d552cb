// The wire casts and quantisation (see codec.h).
//
// Encoding touches the data as few times as it can: each 64 KiB chunk of the wire form is written
// (copied, cast or quantised) and then checksummed while it is still in L2, so a raw tensor costs
// one read of the source and one write of the frame, not a copy followed by a second pass for the
// CRC. Decoding checks the CRC over the whole frame before it reads any data out (hosl/boundary.py
// does that), so the data are read twice there; a corrupt frame is never unpacked.
#include "codec.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "bytes.h"
#include "noise.h"  // float <-> fp16 / bf16, round to nearest even

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HOSL_X86_DISPATCH 1  // F16C conversions, used only if the CPU has them
#endif

namespace hosl {
namespace boundary {
namespace {

using noise::bits_as_float;
using noise::float_as_bits;

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

}  // namespace boundary
}  // namespace hosl
