// Block pooling: the summary (gate key) of every MoBA block completed in a step, pooled from the
// paged K cache and written at the page holding the block's last token
// (ops/pooling/naive.py gives the layout and why).
#pragma once

#include "common.cuh"
#include "params.h"

namespace moba {

constexpr int kPoolThreads = 256;

// grid (num_work, HK); 256 threads = D channels x (256 / D) key groups.
template <typename T, typename TS>
__global__ void __launch_bounds__(kPoolThreads) pool_kernel(const PoolParams p) {
  __shared__ float s_red[3][kPoolThreads];
  const int i_w = blockIdx.x, i_hk = blockIdx.y;
  const int D = p.head_dim, B = p.block_size, P = p.page_size;
  const int groups = kPoolThreads / D;
  const int c = threadIdx.x % D, g = threadIdx.x / D;
  const int64_t i_req = p.work_req[i_w];
  const int j = p.work_blk[i_w];
  const int* bt = p.block_table + i_req * p.stride_bt;
  const T* k = static_cast<const T*>(p.k);

  float sum = 0.f, mx = -INFINITY, mn = INFINITY;
  for (int t = g; t < B; t += groups) {
    const int pos = j * B + t;
    const int64_t page = bt[pos / P];
    float x = TypeTraits<T>::to_float(k[page * p.stride_kp + (pos % P) * p.stride_ks + i_hk * p.stride_kh + c]);
    if (p.gate == 3) x *= p.weight[(static_cast<int64_t>(i_hk) * B + t) * D + c];
    sum += x;
    mx = fmaxf(mx, x);
    mn = fminf(mn, x);
  }
  s_red[0][threadIdx.x] = sum;
  s_red[1][threadIdx.x] = mx;
  s_red[2][threadIdx.x] = mn;
  __syncthreads();
  if (g != 0) return;
  for (int o = 1; o < groups; ++o) {
    sum += s_red[0][o * D + c];
    mx = fmaxf(mx, s_red[1][o * D + c]);
    mn = fminf(mn, s_red[2][o * D + c]);
  }
  const int last = j * B + B - 1;
  const int64_t page = bt[last / P];
  const int slot = P > B ? (last % P) / B : 0;
  TS* s = static_cast<TS*>(p.summary) + page * p.stride_sp + slot * p.stride_sslot + i_hk * p.stride_sh + c;
  switch (p.gate) {
    case 0: s[0] = TypeTraits<TS>::from_float(sum / B); break;
    case 1: s[0] = TypeTraits<TS>::from_float(mx); break;
    case 2:
      s[0] = TypeTraits<TS>::from_float(mx);
      s[p.stride_ss] = TypeTraits<TS>::from_float(mn);
      break;
    default: s[0] = TypeTraits<TS>::from_float(sum); break;
  }
}

template <typename T, typename TS>
void launch_pool(const PoolParams& p, cudaStream_t stream) {
  if (p.num_work == 0) return;
  pool_kernel<T, TS><<<dim3(p.num_work, p.num_kv_heads), kPoolThreads, 0, stream>>>(p);
}

}  // namespace moba
