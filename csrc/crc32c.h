// CRC-32C, the checksum of every frame (hosl/boundary.py).
#pragma once

#include <cstddef>
#include <cstdint>

namespace hosl {
namespace boundary {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF).
// Chains: crc32c(crc32c(0, a), b) is the CRC of a followed by b. crc32c("123456789") = 0xE3069283.
// Uses the SSE4.2 crc32 instruction when the CPU has it (checked once, at run time), else the
// portable slicing-by-8 tables; crc32c_portable always uses the tables. Both give the same value.
uint32_t crc32c(uint32_t crc, const void* data, std::size_t n);
uint32_t crc32c_portable(uint32_t crc, const void* data, std::size_t n);
bool crc32c_hardware();  // whether crc32c runs on the crc32 instruction

}  // namespace boundary
}  // namespace hosl
