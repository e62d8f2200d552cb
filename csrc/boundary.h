// The split boundary's byte work: CRC32C, the wire forms of a tensor (raw bytes, fp16/bf16 casts,
// per-row int8 quantisation) and BoundaryBuffer, the bounded ring of frames between threads.
//
// The frame layout (header, descriptors, padding) is defined and parsed in hosl/boundary.py, whose
// docstring is the contract. This layer writes and reads one tensor's data at offsets it is given and
// re-checks every range against the frame's length, so a wrong offset is an exception, never a stray
// read or write. No torch headers: tensors arrive as raw pointers, element counts and dtype codes.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace hosl {
namespace boundary {

// Element types, numbered as the dtype byte of a tensor descriptor on the wire.
enum class DType : int {
  kFloat32 = 1,
  kFloat64 = 2,
  kFloat16 = 3,
  kBFloat16 = 4,
  kInt8 = 5,
  kUInt8 = 6,
  kInt16 = 7,
  kInt32 = 8,
  kInt64 = 9,
  kBool = 10,
};

// How a tensor's data travel, numbered as the encoding byte of a descriptor.
enum class Encoding : int { kRaw = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3 };

// Bytes per element of `dtype`; throws std::invalid_argument for an unknown code.
std::size_t dtype_size(DType dtype);

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF).
// Chains: crc32c(crc32c(0, a), b) is the CRC of a followed by b. crc32c("123456789") = 0xE3069283.
// Uses the SSE4.2 crc32 instruction when the CPU has it (checked once, at run time), else the
// portable slicing-by-8 tables; crc32c_portable always uses the tables. Both give the same value.
uint32_t crc32c(uint32_t crc, const void* data, std::size_t n);
uint32_t crc32c_portable(uint32_t crc, const void* data, std::size_t n);
bool crc32c_hardware();  // whether crc32c runs on the crc32 instruction

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

// Raised by BoundaryBuffer for a push after close() and for a pop from a closed, empty buffer.
class BufferClosed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bounded FIFO ring of `slots` preallocated slots of `slot_bytes` bytes each, for frames moving
// between threads. All memory is allocated by the constructor. push and pop_into copy outside the
// lock, so a producer and a consumer copy at the same time; slots are reserved in order (tickets),
// so frames come out in the order their pushes reserved a slot even with several producers.
class BoundaryBuffer {
 public:
  BoundaryBuffer(int64_t slots, int64_t slot_bytes);

  // Copies nbytes from src into the next slot, waiting up to wait_s seconds (finite, >= 0) for one
  // to be free. Returns false if none was free in time. Throws std::invalid_argument when nbytes >
  // slot_bytes, BufferClosed once closed (a waiting push is woken by close()).
  bool push(const void* src, uint64_t nbytes, double wait_s);

  // Copies the oldest frame into dst and stores its length in *nbytes, waiting up to wait_s seconds
  // for one. Returns false if none came in time. After close() it still returns the frames held
  // (drain), then throws BufferClosed. Throws std::invalid_argument, leaving the frame in place,
  // when the frame is longer than capacity.
  bool pop_into(void* dst, uint64_t capacity, double wait_s, uint64_t* nbytes);

  // Refuses further pushes and wakes every waiter. Idempotent.
  void close();

  int64_t slots() const { return slots_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  int64_t size() const;  // frames pushed and not yet popped
  bool closed() const;

 private:
  enum class State : uint8_t { kFree, kWriting, kFull, kReading };

  uint8_t* slot_data(std::size_t i) { return base_ + i * stride_; }

  const int64_t slots_;
  const int64_t slot_bytes_;
  const std::size_t stride_;  // slot_bytes rounded up to a cache line, so slots do not share lines
  std::unique_ptr<uint8_t[]> storage_;
  uint8_t* base_;  // storage_ aligned to 64 bytes
  std::vector<uint64_t> lengths_;
  std::vector<State> states_;
  uint64_t write_ticket_ = 0;  // the next push takes slot write_ticket_ % slots_
  uint64_t read_ticket_ = 0;   // the next pop takes slot read_ticket_ % slots_
  int64_t full_ = 0;
  bool closed_ = false;
  mutable std::mutex mutex_;
  std::condition_variable can_push_;
  std::condition_variable can_pop_;
};

}  // namespace boundary
}  // namespace hosl
