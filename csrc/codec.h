// The wire forms of a tensor: raw bytes, fp16/bf16 casts and per-row int8 quantisation, each
// checksummed (CRC32C, crc32c.h) as it is written. The ring between threads is ring.h.
//
// The frame layout (header, descriptors, padding) is defined and parsed in hosl/boundary.py, whose
// docstring is the contract. This layer writes and reads one tensor's data at offsets it is given and
// re-checks every range against the frame's length, so a wrong offset is an exception, never a stray
// read or write. No torch headers: tensors arrive as raw pointers, element counts and dtype codes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "crc32c.h"
#include "dtype.h"

namespace hosl {
namespace boundary {

using DType = hosl::DType;  // the wire numbering (dtype.h)

// How a tensor's data travel, numbered as the encoding byte of a descriptor.
enum class Encoding : int { kRaw = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3 };

// Bytes per element of `dtype`; throws std::invalid_argument for an unknown code.
std::size_t dtype_size(DType dtype);

// Wire bytes of `numel` elements of `dtype` sent with `encoding` (int8: the int8 values; the
// per-row float32 scales live in their own region).
uint64_t wire_bytes(Encoding encoding, DType dtype, uint64_t numel);

// Writes the wire form of `numel` contiguous elements at `src` (dtype `dtype`) into
// frame[offset, offset + wire_bytes), and for kInt8 the numel / row_len float32 row scales into
// frame[scales_offset, ...). Returns crc extended over frame[crc_from, offset + wire_bytes): the
// bytes before the data (already written by the caller) and then the data, each chunk checksummed
// right after it is written, while it is still in cache.
// Throws std::invalid_argument for bad arguments, for a finite value that would become infinite
// in fp16/bf16, and for a row holding a non-finite value under kInt8. portable = true uses the
// table CRC and noise.h's scalar float16 casts instead of the CPU's crc32 and F16C instructions;
// the bytes are the same (up to nan payloads), which the tests check. (The AVX2 builds of the
// float32 bf16 and int8 loops are chosen at load time either way; they are the same C++ code.)
uint32_t encode_tensor(uint8_t* frame, uint64_t frame_len, uint32_t crc, uint64_t crc_from, uint64_t offset,
                       Encoding encoding, const void* src, DType dtype, uint64_t numel, uint64_t row_len,
                       uint64_t scales_offset, bool portable = false);

// The inverse: reads the wire form at frame[offset, ...) (and the scales for kInt8) and writes
// `numel` elements of `dtype` to dst. `frame` needs no alignment. Returns -1, or for kInt8 the
// first row whose scale is negative or not finite (dst is then partly written and must be dropped).
int64_t decode_tensor(const uint8_t* frame, uint64_t frame_len, uint64_t offset, Encoding encoding, DType dtype,
                      uint64_t numel, uint64_t row_len, uint64_t scales_offset, void* dst, bool portable = false);

}  // namespace boundary
}  // namespace hosl
