// Hopper (SM90a) device helpers: warpgroup matrix multiply-accumulate (wgmma) on 128-byte
// swizzled shared memory, the tensor memory accelerator (TMA) and mbarriers. Torch-free; every
// function compiles to nothing outside sm_90a, where the kernels that call them are not run.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOBA_SM90 1
#else
#define MOBA_SM90 0
#endif

namespace moba {
namespace sm90 {

// Shared-memory matrix descriptor of a 128-byte swizzled tile: rows of 64 16-bit elements
// (128 bytes), 8-row atoms of 1024 bytes, the 16-byte chunks of row r XOR-ed with r % 8.
// K-major operands (Q and K: rows = M or N, 64 elements of K a row): `lbo` unused, `sbo` = 1024
// (the next 8 rows). MN-major B (V: rows = keys = K, 64 elements of N = the head dim a row):
// `lbo` = bytes to the next 64 columns of N, `sbo` = 1024 (the next 8 keys).
MOBA_DEVICE uint64_t desc_sw128(uint32_t smem_byte_addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((smem_byte_addr & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32) |
         (uint64_t(1) << 62);
}

// Byte offset of element (row, col) in a 128-byte swizzled tile of `rows` rows and 64-column atoms.
MOBA_DEVICE uint32_t sw128_offset(int row, int col, int rows) {
  const int atom = col / 64, chunk = (col % 64) / 8;
  return uint32_t(atom * rows * 128 + row * 128 + ((chunk ^ (row % 8)) * 16) + (col % 8) * 2);
}

MOBA_DEVICE void wgmma_fence() {
#if MOBA_SM90
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
MOBA_DEVICE void wgmma_commit() {
#if MOBA_SM90
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
MOBA_DEVICE void wgmma_wait() {
#if MOBA_SM90
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving reads or writes of accumulator registers across wgmma calls.
template <int N>
MOBA_DEVICE void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
MOBA_DEVICE void fence_regs(uint32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// Generic-proxy writes to shared memory (st.shared, cp.async) made visible to wgmma/TMA.
MOBA_DEVICE void fence_proxy_async() {
#if MOBA_SM90
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

template <int N>
MOBA_DEVICE void setmaxnreg_inc() {
#if MOBA_SM90
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
MOBA_DEVICE void setmaxnreg_dec() {
#if MOBA_SM90
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Named barrier over `count` threads (ids 1..15; 0 is __syncthreads).
MOBA_DEVICE void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// Arrives at a named barrier without waiting for it.
MOBA_DEVICE void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

MOBA_DEVICE void mbar_init(uint64_t* bar, int count) {
#if MOBA_SM90
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
MOBA_DEVICE void mbar_init_fence() {
#if MOBA_SM90
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
MOBA_DEVICE void mbar_arrive(uint64_t* bar) {
#if MOBA_SM90
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
MOBA_DEVICE void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if MOBA_SM90
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
// Waits until the barrier's phase with this parity has completed.
MOBA_DEVICE void mbar_wait(uint64_t* bar, uint32_t parity) {
#if MOBA_SM90
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// TMA: a 4-D box of the tensor map into shared memory, completing `bytes` on the barrier.
// Coordinates past the tensor's extent read as zeros (and still count their bytes).
MOBA_DEVICE void tma_load_4d(void* smem_dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                             int c3) {
#if MOBA_SM90
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n"
      ::"r"(smem_addr(smem_dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2),
        "r"(c3)
      : "memory");
#endif
}

// wgmma.mma_async m64nNk16, fp32 accumulators, for N = 64 and 128 (one warpgroup, 128 threads).
// Accumulator layout (per thread): warp w of the group owns rows 16w..16w+15; register 4i + e
// holds row 16w + lane/4 + 8 (e >= 2), column 8i + 2 (lane % 4) + (e % 2).
template <int N, typename T> struct Wgmma;

// The accumulator operands (N / 2 floats) and their PTX register list.
#define MOBA_WGMMA_ACC32 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define MOBA_WGMMA_ACC64 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define MOBA_WGMMA_REGS32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MOBA_WGMMA_REGS64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#if MOBA_SM90
#define MOBA_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define MOBA_WGMMA_ASM(...)
#endif

// Wgmma<N, T>, TY its PTX element type; NR = N / 2 accumulator registers, numbered 0..NR-1 in
// the asm, so the other operands are NR, NR + 1, ... (I0..I6, spelled out for the preprocessor).
//   ss: D[64 x N] (+)= A[64 x 16] (shared, K-major) * B[16 x N] (shared; K-major, or MN-major if
//       TRANS_B); operands desc_a I0, desc_b I1, accumulate I2, TRANS_B I3.
//   rs: D[64 x N] (+)= A[64 x 16] (registers: the accumulator layout of a 64 x 16 slice) * B;
//       operands a I0..I3, desc_b I4, accumulate I5, TRANS_B I6.
#define MOBA_WGMMA(N, NR, T, TY, I0, I1, I2, I3, I4, I5, I6)                                            \
  template <> struct Wgmma<N, T> {                                                                       \
    template <int TRANS_B>                                                                               \
    static MOBA_DEVICE void ss(float (&d)[NR], uint64_t desc_a, uint64_t desc_b, int accumulate) {       \
      MOBA_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %" #I2 ", 0;\n"                                    \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " MOBA_WGMMA_REGS##NR   \
                     ", %" #I0 ", %" #I1 ", p, 1, 1, 0, %" #I3 ";\n}\n"                                    \
                     : MOBA_WGMMA_ACC##NR                                                                \
                     : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));                         \
    }                                                                                                    \
    template <int TRANS_B>                                                                               \
    static MOBA_DEVICE void rs(float (&d)[NR], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) { \
      MOBA_WGMMA_ASM("{\n.reg .pred p;\nsetp.ne.b32 p, %" #I5 ", 0;\n"                                    \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " MOBA_WGMMA_REGS##NR   \
                     ", {%" #I0 ", %" #I1 ", %" #I2 ", %" #I3 "}, %" #I4 ", p, 1, 1, %" #I6 ";\n}\n"         \
                     : MOBA_WGMMA_ACC##NR                                                                \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),         \
                       "n"(TRANS_B));                                                                    \
    }                                                                                                    \
  };

MOBA_WGMMA(64, 32, __nv_bfloat16, "bf16", 32, 33, 34, 35, 36, 37, 38)
MOBA_WGMMA(64, 32, __half, "f16", 32, 33, 34, 35, 36, 37, 38)
MOBA_WGMMA(128, 64, __nv_bfloat16, "bf16", 64, 65, 66, 67, 68, 69, 70)
MOBA_WGMMA(128, 64, __half, "f16", 64, 65, 66, 67, 68, 69, 70)
#undef MOBA_WGMMA
#undef MOBA_WGMMA_ASM
#undef MOBA_WGMMA_ACC32
#undef MOBA_WGMMA_ACC64
#undef MOBA_WGMMA_REGS32
#undef MOBA_WGMMA_REGS64

}  // namespace sm90
}  // namespace moba
