// Small device helpers shared by the kernels: element types, 16-byte copies (cp.async), warp
// matrix fragments (ldmatrix, mma.sync m16n8k16). Torch-free: built by the extension and, alone,
// by the CI compile check.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define MOBA_DEVICE __device__ __forceinline__

namespace moba {

constexpr float kLog2e = 1.4426950408889634f;
// Padding value of sorted block lists (ops/common.py SENTINEL).
constexpr int kSentinel = 1 << 30;

template <typename T> struct TypeTraits;
template <> struct TypeTraits<__nv_bfloat16> {
  using pair = __nv_bfloat162;
  static MOBA_DEVICE float2 to_float2(pair v) { return __bfloat1622float2(v); }
  static MOBA_DEVICE pair from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static MOBA_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static MOBA_DEVICE __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
};
template <> struct TypeTraits<__half> {
  using pair = __half2;
  static MOBA_DEVICE float2 to_float2(pair v) { return __half22float2(v); }
  static MOBA_DEVICE pair from_float2(float a, float b) { return __floats2half2_rn(a, b); }
  static MOBA_DEVICE float to_float(__half v) { return __half2float(v); }
  static MOBA_DEVICE __half from_float(float v) { return __float2half(v); }
};
template <> struct TypeTraits<float> {
  static MOBA_DEVICE float to_float(float v) { return v; }
  static MOBA_DEVICE float from_float(float v) { return v; }
};

// 8 half-precision values (16 bytes) to float.
template <typename T>
MOBA_DEVICE void unpack8(const uint4& v, float (&f)[8]) {
  const auto* p = reinterpret_cast<const typename TypeTraits<T>::pair*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 x = TypeTraits<T>::to_float2(p[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

MOBA_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `valid == false` writes zeros (src-size 0).
MOBA_DEVICE void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
MOBA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
MOBA_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

MOBA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
MOBA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// D = A[16x16] * B[16x8] + D, fp32 accumulators.
template <typename T>
MOBA_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
MOBA_DEVICE void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
MOBA_DEVICE void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
MOBA_DEVICE uint32_t pack2(float a, float b) {
  auto v = TypeTraits<T>::from_float2(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Logits in the log2 domain: scale * log2(e) * s, or the soft-capped form.
MOBA_DEVICE float logit_log2(float s, float scale_log2, float softcap) {
  if (softcap > 0.f) return softcap * tanhf(s * (scale_log2 / kLog2e) / softcap) * kLog2e;
  return s * scale_log2;
}

}  // namespace moba
