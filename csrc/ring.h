// BoundaryBuffer: the bounded ring of frames between a producer and a consumer thread (the local
// link's two directions).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

namespace hosl {
namespace boundary {

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
