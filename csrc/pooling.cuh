// Block pooling: the summary (gate key) of every MoBA block completed in a step, pooled from the
// paged K cache and written at the page holding the block's last token
// (ops/pooling/naive.py gives the layout and why).
#pragma once

#include "common.cuh"
#include "params.h"

namespace moba {

constexpr int kPoolThreads = 256;

// grid (num_work, HK), 256 threads: each reads 16 bytes (VEC channels) of one key row, D / VEC
// threads a row, 256 / (D / VEC) rows at a time; then the row groups are reduced in shared memory.
template <typename T, typename TS>
__global__ void __launch_bounds__(kPoolThreads) pool_kernel(const PoolParams p) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float s_red[3][kPoolThreads * VEC];
  const int i_w = blockIdx.x, i_hk = blockIdx.y;
  const int D = p.head_dim, B = p.block_size, P = p.page_size;
  const int lanes = D / VEC, groups = kPoolThreads / lanes;
  const int c = (threadIdx.x % lanes) * VEC, g = threadIdx.x / lanes;
  const int64_t i_req = p.work_req[i_w];
  const int j = p.work_blk[i_w];
  if (j < 0) return;  // no work (a static plan's entry for a request that completes no block)
  const int* bt = p.block_table + i_req * p.stride_bt;
  const T* k = static_cast<const T*>(p.k) + i_hk * p.stride_kh + c;

  float sum[VEC], mx[VEC], mn[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) sum[e] = 0.f, mx[e] = -INFINITY, mn[e] = INFINITY;
#pragma unroll 4
  for (int t = g; t < B; t += groups) {
    const int pos = j * B + t;
    const int64_t page = bt[pos / P];
    const uint4 raw = *reinterpret_cast<const uint4*>(k + page * p.stride_kp + (pos % P) * p.stride_ks);
    const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float v = TypeTraits<T>::to_float(x[e]);
      if (p.gate == 3) v *= p.weight[(static_cast<int64_t>(i_hk) * B + t) * D + c + e];
      sum[e] += v;
      mx[e] = fmaxf(mx[e], v);
      mn[e] = fminf(mn[e], v);
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s_red[0][g * D + c + e] = sum[e];
    s_red[1][g * D + c + e] = mx[e];
    s_red[2][g * D + c + e] = mn[e];
  }
  __syncthreads();
  const int last = j * B + B - 1;
  const int64_t page = bt[last / P];
  const int slot = P > B ? (last % P) / B : 0;
  TS* s = static_cast<TS*>(p.summary) + page * p.stride_sp + slot * p.stride_sslot + i_hk * p.stride_sh;
  for (int d = threadIdx.x; d < D; d += kPoolThreads) {
    float a = 0.f, b = -INFINITY, m = INFINITY;
    for (int o = 0; o < groups; ++o) {
      a += s_red[0][o * D + d];
      b = fmaxf(b, s_red[1][o * D + d]);
      m = fminf(m, s_red[2][o * D + d]);
    }
    switch (p.gate) {
      case 0: s[d] = TypeTraits<TS>::from_float(a / B); break;
      case 1: s[d] = TypeTraits<TS>::from_float(b); break;
      case 2:
        s[d] = TypeTraits<TS>::from_float(b);
        s[p.stride_ss + d] = TypeTraits<TS>::from_float(m);
        break;
      default: s[d] = TypeTraits<TS>::from_float(a); break;
    }
  }
}

template <typename T, typename TS>
void launch_pool(const PoolParams& p, cudaStream_t stream) {
  if (p.num_work == 0) return;
  pool_kernel<T, TS><<<dim3(p.num_work, p.num_kv_heads), kPoolThreads, 0, stream>>>(p);
}

}  // namespace moba
