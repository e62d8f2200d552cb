// BoundaryBuffer (see ring.h): slots reserved by ticket under the lock, copies outside it.
#include "ring.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "bytes.h"

namespace hosl {
namespace boundary {

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
