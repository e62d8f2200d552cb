// Element types, numbered as the dtype byte of a tensor descriptor on the wire (hosl/boundary.py).
// The noise kernels take the same codes and accept the floating types they write (float32,
// bfloat16, float16): one numbering for every entry point of hosl._C.
#pragma once

namespace hosl {

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

}  // namespace hosl
