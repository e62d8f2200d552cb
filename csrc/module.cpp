// hosl._C: the compiled half of hosl. Plain C++17 on raw pointers and sizes (no torch headers),
// so an isolated `pip install .` needs only setuptools and pybind11. The Python wrappers in hosl/
// check devices, dtypes and contiguity; this layer re-checks what would corrupt memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "noise.h"

namespace py = pybind11;

namespace {

constexpr int kMaxTerms = 64;
constexpr uint64_t kPositionLimit = uint64_t{1} << 63;

void check_range(int64_t n, uint64_t offset) {
  if (n < 0) throw std::invalid_argument("hosl._C: n must be >= 0, got " + std::to_string(n));
  if (offset >= kPositionLimit || static_cast<uint64_t>(n) > kPositionLimit - offset)
    throw std::invalid_argument("hosl._C: offset + n must be <= 2**63, got offset " + std::to_string(offset) +
                                " and n " + std::to_string(n));
}

void add_noise(uintptr_t x_ptr, int64_t n, int dtype, const std::vector<uint64_t>& seeds,
               const std::vector<float>& scales, uint64_t offset, int num_threads) {
  check_range(n, offset);
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("hosl._C: dtype code must be 0, 1 or 2");
  if (seeds.empty() || seeds.size() > kMaxTerms)
    throw std::invalid_argument("hosl._C: need 1 to 64 seeds, got " + std::to_string(seeds.size()));
  if (seeds.size() != scales.size())
    throw std::invalid_argument("hosl._C: " + std::to_string(seeds.size()) + " seeds but " +
                                std::to_string(scales.size()) + " scales");
  for (uint64_t s : seeds)
    if (s >= kPositionLimit) throw std::invalid_argument("hosl._C: seeds must be in [0, 2**63)");
  if (n > 0 && x_ptr == 0) throw std::invalid_argument("hosl._C: null data pointer");
  py::gil_scoped_release release;
  hosl::noise::add_noise(reinterpret_cast<void*>(x_ptr), n, static_cast<hosl::noise::DType>(dtype), seeds.data(),
                         scales.data(), static_cast<int>(seeds.size()), offset, /*accumulate=*/true, num_threads);
}

void gaussian(uintptr_t out_ptr, int64_t n, uint64_t seed, uint64_t offset, int num_threads) {
  check_range(n, offset);
  if (seed >= kPositionLimit) throw std::invalid_argument("hosl._C: seed must be in [0, 2**63)");
  if (n > 0 && out_ptr == 0) throw std::invalid_argument("hosl._C: null data pointer");
  const float one = 1.0f;
  py::gil_scoped_release release;
  hosl::noise::add_noise(reinterpret_cast<void*>(out_ptr), n, hosl::noise::DType::kFloat32, &seed, &one, 1, offset,
                         /*accumulate=*/false, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hosl's compiled kernels: CPU noise (Philox4x32-10 + Box-Muller) and, later, the split boundary.";
  m.def("add_noise", &add_noise, py::arg("x_ptr"), py::arg("n"), py::arg("dtype"), py::arg("seeds"), py::arg("scales"),
        py::arg("offset"), py::arg("num_threads"),
        "x[i] += sum_k scales[k] * z(seeds[k], offset + i) in place on n contiguous elements at x_ptr "
        "(dtype 0 float32, 1 bfloat16, 2 float16), accumulated in float32 and rounded once.");
  m.def("gaussian", &gaussian, py::arg("out_ptr"), py::arg("n"), py::arg("seed"), py::arg("offset"),
        py::arg("num_threads"), "Writes z(seed, offset + i) for i < n into n float32 elements at out_ptr.");
  m.attr("MAX_TERMS") = kMaxTerms;
}
