// Input checks of the torch launchers: each names the argument and what it must be.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace moba {
namespace detail {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(at::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string piece(T x) {
  return std::to_string(x);
}
}  // namespace detail

// The message of a failed check, numbers written with std::to_string.
// NOTE: not c10::str: it streams numbers through std::ostringstream, whose locale facets crashed
// the process (SIGSEGV instead of the error) with the extension built on the lent H100 machine
// (nvcc 13, torch 2.11): checks whose messages held only text and dtypes raised, those with a
// number or a shape did not.
template <typename... A>
std::string msg(const A&... a) {
  std::string s;
  ((s += detail::piece(a)), ...);
  return s;
}
}  // namespace moba

#define MOBA_CHECK(cond, ...) TORCH_CHECK(cond, ::moba::msg(__VA_ARGS__).c_str())
#define MOBA_CHECK_CUDA(x) MOBA_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define MOBA_CHECK_DTYPE(x, dt) MOBA_CHECK((x).scalar_type() == (dt), #x " must be ", dt, ", got ", (x).scalar_type())
#define MOBA_CHECK_DIM(x, n) MOBA_CHECK((x).dim() == (n), #x " must have ", n, " dims, got shape ", (x).sizes())
#define MOBA_CHECK_LAST_CONTIG(x) MOBA_CHECK((x).stride(-1) == 1, #x ": the last dim must be contiguous")
#define MOBA_CHECK_SAME_DEVICE(x, y) \
  MOBA_CHECK((x).device() == (y).device(), #x " is on ", (x).device(), " but " #y " on ", (y).device())

namespace moba {

// 16-byte vector access: the data pointer and every stride but the last are multiples of 8 halves.
inline void check_vec16(const at::Tensor& t, const char* name) {
  MOBA_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": data must be 16-byte aligned");
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    MOBA_CHECK(t.stride(i) % 8 == 0, name, ": stride ", i, " (", t.stride(i),
                ") must be a multiple of 8 elements for 16-byte loads");
}

// int32 index arrays: the last dim dense (a dim of one element may have any stride).
inline void check_index(const at::Tensor& t, const char* name) {
  MOBA_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  MOBA_CHECK(t.dim() >= 1 && (t.size(-1) <= 1 || t.stride(-1) == 1), name, ": the last dim must be contiguous");
}

inline bool is_pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace moba
