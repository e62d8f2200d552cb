// CRC-32C: slicing-by-8 tables everywhere, and on x86-64 CPUs with SSE4.2 three interleaved chains
// of the crc32 instruction folded together with shift tables (see crc32c.h).
#include "crc32c.h"

#include <cstring>
#include <initializer_list>

#include "bytes.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HOSL_X86_DISPATCH 1  // the SSE4.2 crc32 instruction, used only if the CPU has it
#endif

namespace hosl {
namespace boundary {
namespace {

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

}  // namespace

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

}  // namespace boundary
}  // namespace hosl
