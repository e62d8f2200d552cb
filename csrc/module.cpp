// hosl._C: the compiled half of hosl. Plain C++17 on raw pointers and sizes (no torch headers),
// so an isolated `pip install .` needs only setuptools and pybind11. The Python wrappers in hosl/
// check devices, dtypes and contiguity; this layer re-checks what would corrupt memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "codec.h"
#include "crc32c.h"
#include "noise.h"
#include "ring.h"

namespace py = pybind11;
namespace hb = hosl::boundary;

namespace {

constexpr int kMaxTerms = 64;
constexpr uint64_t kPositionLimit = uint64_t{1} << 63;

void check_range(int64_t n, uint64_t offset) {
  if (n < 0) throw std::invalid_argument("hosl._C: n must be >= 0, got " + std::to_string(n));
  if (offset >= kPositionLimit || static_cast<uint64_t>(n) > kPositionLimit - offset)
    throw std::invalid_argument("hosl._C: offset + n must be <= 2**63, got offset " + std::to_string(offset) +
                                " and n " + std::to_string(n));
}

void check_terms(int dtype, const std::vector<uint64_t>& seeds, const std::vector<float>& scales) {
  using hosl::DType;
  const auto d = static_cast<DType>(dtype);
  if (d != DType::kFloat32 && d != DType::kFloat16 && d != DType::kBFloat16)
    throw std::invalid_argument("hosl._C: the noise's dtype code must be 1 (float32), 3 (float16) or 4 (bfloat16)");
  if (seeds.empty() || seeds.size() > kMaxTerms)
    throw std::invalid_argument("hosl._C: need 1 to 64 seeds, got " + std::to_string(seeds.size()));
  if (seeds.size() != scales.size())
    throw std::invalid_argument("hosl._C: " + std::to_string(seeds.size()) + " seeds but " +
                                std::to_string(scales.size()) + " scales");
  for (uint64_t s : seeds)
    if (s >= kPositionLimit) throw std::invalid_argument("hosl._C: seeds must be in [0, 2**63)");
}

hosl::noise::Dist checked_dist(int dist) {
  if (dist != 0 && dist != 1)
    throw std::invalid_argument("hosl._C: dist must be 0 (gaussian) or 1 (rademacher), got " + std::to_string(dist));
  return static_cast<hosl::noise::Dist>(dist);
}

void add_noise(uintptr_t x_ptr, int64_t n, int dtype, const std::vector<uint64_t>& seeds,
               const std::vector<float>& scales, uint64_t offset, int num_threads, int dist) {
  const hosl::noise::Dist d = checked_dist(dist);
  check_range(n, offset);
  check_terms(dtype, seeds, scales);
  if (n > 0 && x_ptr == 0) throw std::invalid_argument("hosl._C: null data pointer");
  py::gil_scoped_release release;
  hosl::noise::add_noise(reinterpret_cast<void*>(x_ptr), n, static_cast<hosl::noise::DType>(dtype), seeds.data(),
                         scales.data(), static_cast<int>(seeds.size()), offset, /*accumulate=*/true, num_threads, d);
}

void add_noise_rows(uintptr_t x_ptr, int64_t num_rows, int64_t width, uintptr_t rows_ptr, int64_t num_given, int dtype,
                    const std::vector<uint64_t>& seeds, const std::vector<float>& scales, uint64_t offset,
                    int num_threads, int dist) {
  const hosl::noise::Dist d = checked_dist(dist);
  if (num_rows < 0 || width < 0 || num_given < 0)
    throw std::invalid_argument("hosl._C: num_rows, width and num_given must be >= 0, got " +
                                std::to_string(num_rows) + ", " + std::to_string(width) + " and " +
                                std::to_string(num_given));
  if (width > 0 && num_rows > std::numeric_limits<int64_t>::max() / width)
    throw std::invalid_argument("hosl._C: num_rows * width overflows int64");
  check_range(num_rows * width, offset);
  check_terms(dtype, seeds, scales);
  if (num_given > 0 && (x_ptr == 0 || rows_ptr == 0)) throw std::invalid_argument("hosl._C: null data pointer");
  // A row outside the table writes outside it, and a repeated row would be written by two threads.
  const int64_t* rows = reinterpret_cast<const int64_t*>(rows_ptr);
  for (int64_t i = 0; i < num_given; ++i) {
    if (rows[i] < 0 || rows[i] >= num_rows)
      throw std::invalid_argument("hosl._C: row " + std::to_string(rows[i]) + " is outside a table of " +
                                  std::to_string(num_rows) + " rows");
    if (i > 0 && rows[i] <= rows[i - 1])
      throw std::invalid_argument("hosl._C: rows must be sorted and distinct, got " + std::to_string(rows[i - 1]) +
                                  " then " + std::to_string(rows[i]));
  }
  py::gil_scoped_release release;
  hosl::noise::add_noise_rows(reinterpret_cast<void*>(x_ptr), width, rows, num_given,
                              static_cast<hosl::noise::DType>(dtype), seeds.data(), scales.data(),
                              static_cast<int>(seeds.size()), offset, num_threads, d);
}

void gaussian(uintptr_t out_ptr, int64_t n, uint64_t seed, uint64_t offset, int num_threads, int dist) {
  const hosl::noise::Dist d = checked_dist(dist);
  check_range(n, offset);
  if (seed >= kPositionLimit) throw std::invalid_argument("hosl._C: seed must be in [0, 2**63)");
  if (n > 0 && out_ptr == 0) throw std::invalid_argument("hosl._C: null data pointer");
  const float one = 1.0f;
  py::gil_scoped_release release;
  hosl::noise::add_noise(reinterpret_cast<void*>(out_ptr), n, hosl::noise::DType::kFloat32, &seed, &one, 1, offset,
                         /*accumulate=*/false, num_threads, d);
}

// ------------------------------------------------------------------------------------ split boundary

uint32_t crc32c(uintptr_t ptr, uint64_t nbytes, uint32_t crc, bool portable) {
  if (nbytes > 0 && ptr == 0) throw std::invalid_argument("hosl._C: null data pointer");
  py::gil_scoped_release release;
  const void* data = reinterpret_cast<const void*>(ptr);
  return portable ? hb::crc32c_portable(crc, data, nbytes) : hb::crc32c(crc, data, nbytes);
}

uint32_t encode_tensor(uintptr_t frame_ptr, uint64_t frame_len, uint32_t crc, uint64_t crc_from, uint64_t offset,
                       int encoding, uintptr_t src_ptr, int dtype, uint64_t numel, uint64_t row_len,
                       uint64_t scales_offset, bool portable) {
  py::gil_scoped_release release;
  return hb::encode_tensor(reinterpret_cast<uint8_t*>(frame_ptr), frame_len, crc, crc_from, offset,
                           static_cast<hb::Encoding>(encoding), reinterpret_cast<const void*>(src_ptr),
                           static_cast<hb::DType>(dtype), numel, row_len, scales_offset, portable);
}

int64_t decode_tensor(uintptr_t frame_ptr, uint64_t frame_len, uint64_t offset, int encoding, int dtype,
                      uint64_t numel, uint64_t row_len, uint64_t scales_offset, uintptr_t dst_ptr, bool portable) {
  py::gil_scoped_release release;
  return hb::decode_tensor(reinterpret_cast<const uint8_t*>(frame_ptr), frame_len, offset,
                           static_cast<hb::Encoding>(encoding), static_cast<hb::DType>(dtype), numel, row_len,
                           scales_offset, reinterpret_cast<void*>(dst_ptr), portable);
}

// A blocked push or pop waits in slices of this many seconds, taking the GIL back between slices to
// let Python handle signals: without it, Ctrl-C could not stop a thread waiting forever.
constexpr double kWaitSlice = 0.05;
// Timeouts above this (about 30 years), and inf, mean wait forever: a deadline that far out would
// overflow the clock's representation.
constexpr double kForever = 1e9;

// Runs attempt(wait_s) -> bool with the GIL released until it returns true, the timeout (seconds,
// None = forever) passes (TimeoutError) or a signal handler raises.
template <typename Attempt>
void wait_in_slices(std::optional<double> timeout, const char* what, Attempt attempt) {
  if (timeout && !(*timeout >= 0.0))
    throw std::invalid_argument(std::string("hosl._C.BoundaryBuffer: timeout must be None or >= 0 seconds, got ") +
                                std::to_string(*timeout));
  using Clock = std::chrono::steady_clock;
  const bool forever = !timeout || *timeout >= kForever;
  const Clock::time_point deadline =
      forever ? Clock::time_point::max()
              : Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(*timeout));
  while (true) {
    double wait_s = kWaitSlice;
    if (!forever) wait_s = std::clamp(std::chrono::duration<double>(deadline - Clock::now()).count(), 0.0, kWaitSlice);
    bool done;
    {
      py::gil_scoped_release release;
      done = attempt(wait_s);
    }
    if (done) return;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!forever && Clock::now() >= deadline) {
      PyErr_Format(PyExc_TimeoutError, "hosl._C.BoundaryBuffer: %s timed out after %g s", what, *timeout);
      throw py::error_already_set();
    }
  }
}

void buffer_push(hb::BoundaryBuffer& buffer, uintptr_t ptr, uint64_t nbytes, std::optional<double> timeout) {
  wait_in_slices(timeout, "push",
                 [&](double wait_s) { return buffer.push(reinterpret_cast<const void*>(ptr), nbytes, wait_s); });
}

uint64_t buffer_pop_into(hb::BoundaryBuffer& buffer, uintptr_t ptr, uint64_t capacity, std::optional<double> timeout) {
  uint64_t nbytes = 0;
  wait_in_slices(timeout, "pop_into", [&](double wait_s) {
    return buffer.pop_into(reinterpret_cast<void*>(ptr), capacity, wait_s, &nbytes);
  });
  return nbytes;
}

std::string buffer_repr(const hb::BoundaryBuffer& buffer) {
  return "BoundaryBuffer(slots=" + std::to_string(buffer.slots()) +
         ", slot_bytes=" + std::to_string(buffer.slot_bytes()) + ", size=" + std::to_string(buffer.size()) +
         ", closed=" + (buffer.closed() ? "True" : "False") + ")";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "hosl's compiled kernels: CPU noise (Philox4x32-10 + Box-Muller, or one Philox bit a sign) and the split "
      "boundary's byte work "
      "(CRC32C, wire casts, BoundaryBuffer).";
  m.def("add_noise", &add_noise, py::arg("x_ptr"), py::arg("n"), py::arg("dtype"), py::arg("seeds"), py::arg("scales"),
        py::arg("offset"), py::arg("num_threads"), py::arg("dist") = 0,
        "x[i] += sum_k scales[k] * z(seeds[k], offset + i) in place on n contiguous elements at x_ptr "
        "(dtype: the code of csrc/dtype.h, 1 float32, 3 float16 or 4 bfloat16), accumulated in float32 and rounded "
        "once. dist: 0 Gaussian z, 1 Rademacher r.");
  m.def("add_noise_rows", &add_noise_rows, py::arg("x_ptr"), py::arg("num_rows"), py::arg("width"),
        py::arg("rows_ptr"), py::arg("num_given"), py::arg("dtype"), py::arg("seeds"), py::arg("scales"),
        py::arg("offset"), py::arg("num_threads"), py::arg("dist") = 0,
        "For each of the num_given sorted, distinct int64 rows at rows_ptr, x[r, j] += sum_k scales[k] * "
        "z(seeds[k], offset + r * width + j) in place on a contiguous num_rows x width table at x_ptr (dtype: as in "
        "add_noise, 1 float32, 3 float16 or 4 bfloat16): the bits add_noise gives those rows, the other rows "
        "untouched.");
  m.def("gaussian", &gaussian, py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("offset"),
        py::arg("num_threads"), py::arg("dist") = 0,
        "Writes z(seed, offset + i) (dist 0) or r(seed, offset + i) (dist 1) for i < n into n float32 elements at "
        "out_ptr.");
  m.attr("MAX_TERMS") = kMaxTerms;
  m.def("noise_isas", &hosl::noise::noise_isas,
        "The instruction-set copies of the CPU noise kernel this CPU runs, widest first (same bits in each).");
  m.def("noise_isa", &hosl::noise::noise_isa, "The copy of the CPU noise kernel in use.");
  m.def("set_noise_isa", &hosl::noise::set_noise_isa, py::arg("name"),
        "Use another copy of the CPU noise kernel (one of noise_isas()).");

  m.def("crc32c", &crc32c, py::arg("ptr"), py::arg("nbytes"), py::arg("crc") = 0, py::arg("portable") = false,
        "CRC-32C of nbytes at ptr, continuing from crc (0 to start); portable=True forces the table code.");
  m.def("crc32c_hardware", &hb::crc32c_hardware, "Whether crc32c runs on the CPU's SSE4.2 crc32 instruction.");
  m.def("encode_tensor", &encode_tensor, py::arg("frame_ptr"), py::arg("frame_len"), py::arg("crc"),
        py::arg("crc_from"), py::arg("offset"), py::arg("encoding"), py::arg("src_ptr"), py::arg("dtype"),
        py::arg("numel"), py::arg("row_len"), py::arg("scales_offset"), py::arg("portable") = false,
        "Writes a tensor's wire form at frame offset (int8 scales at scales_offset); returns crc extended over "
        "frame[crc_from, end of the data). ValueError for overflow to inf and for non-finite int8 rows. "
        "portable=True avoids the crc32 and F16C instructions.");
  m.def("decode_tensor", &decode_tensor, py::arg("frame_ptr"), py::arg("frame_len"), py::arg("offset"),
        py::arg("encoding"), py::arg("dtype"), py::arg("numel"), py::arg("row_len"), py::arg("scales_offset"),
        py::arg("dst_ptr"), py::arg("portable") = false,
        "Reads a tensor's wire form into numel elements at dst_ptr; returns -1, or the first "
        "int8 row whose scale is negative or not finite.");

  py::register_exception<hb::BufferClosed>(m, "BufferClosedError", PyExc_RuntimeError);
  py::class_<hb::BoundaryBuffer>(
      m, "BoundaryBuffer",
      "A bounded FIFO ring of `slots` preallocated slots of `slot_bytes` bytes for frames "
      "between threads: push blocks while full, pop_into while empty, both without the GIL.")
      .def(py::init<int64_t, int64_t>(), py::arg("slots"), py::arg("slot_bytes"))
      .def("push", &buffer_push, py::arg("ptr"), py::arg("nbytes"), py::arg("timeout") = py::none(),
           "Copies nbytes at ptr into the next free slot, waiting up to timeout seconds (None: forever; then "
           "TimeoutError). ValueError if nbytes > slot_bytes; BufferClosedError once closed.")
      .def("pop_into", &buffer_pop_into, py::arg("ptr"), py::arg("capacity"), py::arg("timeout") = py::none(),
           "Copies the oldest frame to ptr and returns its length, waiting up to timeout seconds (None: forever; "
           "then TimeoutError). ValueError if it is longer than capacity (it stays); BufferClosedError when closed "
           "and drained.")
      .def("close", &hb::BoundaryBuffer::close,
           "Refuses further pushes and wakes every waiter; held frames can still be popped.")
      .def_property_readonly("slots", &hb::BoundaryBuffer::slots, "Number of slots.")
      .def_property_readonly("slot_bytes", &hb::BoundaryBuffer::slot_bytes, "Bytes per slot: the largest frame.")
      .def_property_readonly("size", &hb::BoundaryBuffer::size, "Frames pushed and not yet popped.")
      .def_property_readonly("closed", &hb::BoundaryBuffer::closed, "Whether close() was called.")
      .def("__len__", &hb::BoundaryBuffer::size)
      .def("__repr__", &buffer_repr);
}
