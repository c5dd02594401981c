// Input checks of the torch launchers: each names the argument and what it must be.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define MOBA_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define MOBA_CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", dt, ", got ", (x).scalar_type())
#define MOBA_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", n, " dims, got shape ", (x).sizes())
#define MOBA_CHECK_LAST_CONTIG(x) TORCH_CHECK((x).stride(-1) == 1, #x ": the last dim must be contiguous")
#define MOBA_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " is on ", (x).device(), " but " #y " on ", (y).device())

namespace moba {

// 16-byte vector access: the data pointer and every stride but the last are multiples of 8 halves.
inline void check_vec16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": data must be 16-byte aligned");
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    TORCH_CHECK(t.stride(i) % 8 == 0, name, ": stride ", i, " (", t.stride(i),
                ") must be a multiple of 8 elements for 16-byte loads");
}

// int32 index arrays: the last dim dense (a dim of one element may have any stride).
inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && (t.size(-1) <= 1 || t.stride(-1) == 1), name, ": the last dim must be contiguous");
}

inline bool is_pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace moba
