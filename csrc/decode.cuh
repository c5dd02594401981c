// Sparse paged decode: one CTA = one decode token x one KV head x one split of the token's block
// list. The GQA group's heads share every K/V load (one CTA serves all G <= 8 query heads of the
// KV head); keys stream through shared memory 16 at a time with cp.async, kDecodeStages deep.
// Split partials are merged by their log2-sum-exp in `merge_kernel`.
//
// Launch shapes depend only on (tokens, KV heads, splits): no host sync, CUDA-graph safe.
#pragma once

#include "common.cuh"
#include "params.h"

namespace moba {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeKeys = 16;     // keys per chunk: a chunk never crosses a MoBA block or a page
constexpr int kDecodeStages = 4;
constexpr int kDecodeMaxGroup = 8;  // query heads per KV head

template <int D>
struct DecodeSmem {
  static constexpr int kRow = D + 8;  // +16 bytes: rows start in distinct banks
  static constexpr int kKvElems = kDecodeStages * kDecodeKeys * kRow;
  static constexpr int kGroups = kDecodeThreads / (D / 8);  // key groups of the P.V step
  static constexpr size_t kKvBytes = 2 * kKvElems * 2;
  static constexpr size_t kRedBytes = size_t(kGroups) * kDecodeMaxGroup * D * 4;
  static constexpr size_t kPoolBytes = kKvBytes > kRedBytes ? kKvBytes : kRedBytes;
  static constexpr size_t kQBytes = size_t(kDecodeMaxGroup) * D * 4;
  static constexpr size_t kBytes = kPoolBytes + kQBytes + kDecodeMaxGroup * (kDecodeKeys + 3) * 4;
};

// grid (NT, HK, S), 128 threads.
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(const AttnParams p) {
  using Smem = DecodeSmem<D>;
  constexpr int kRow = Smem::kRow;
  constexpr int DC = D / 8;                       // 16-byte chunks of a row
  constexpr int NKG = Smem::kGroups;              // key groups in P.V
  constexpr int KPG = kDecodeKeys / NKG;          // keys per key group and chunk
  constexpr int kLoads = kDecodeKeys * DC / kDecodeThreads;
  static_assert(kLoads >= 1 && kDecodeKeys % NKG == 0, "head dim must be 64, 128 or 256");

  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Smem::kKvElems;
  float* sRed = reinterpret_cast<float*>(smem);  // aliases K/V once the loop is done
  float* sQ = reinterpret_cast<float*>(smem + Smem::kPoolBytes);
  float* sP = sQ + kDecodeMaxGroup * D;           // [8][16]
  float* sAlpha = sP + kDecodeMaxGroup * kDecodeKeys;
  float* sM = sAlpha + kDecodeMaxGroup;
  float* sL = sM + kDecodeMaxGroup;

  const int tid = threadIdx.x;
  const int i_t = blockIdx.x, i_hk = blockIdx.y, i_s = blockIdx.z;
  const int G = p.group, B = p.block_size, P = p.page_size;
  const int64_t i_req = p.tile_req[i_t];
  const int64_t i_q = p.tile_q0[i_t];
  const int pos_q = p.tile_pos0[i_t];
  const int64_t i_row = p.tile_index[i_t];
  const int* list = p.blocks + i_row * p.stride_lt + i_hk * p.stride_lh;
  const int n_blk = p.nblocks[i_row * p.stride_nt + i_hk];
  const int per_split = (n_blk + p.num_splits - 1) / p.num_splits;
  const int it_lo = min(i_s * per_split, n_blk);
  const int it_hi = min(it_lo + per_split, n_blk);
  const int key0 = it_lo * B;
  const int n_chunks = (it_hi - it_lo) * B / kDecodeKeys;
  const int* bt = p.block_table + i_req * p.stride_bt;
  const T* k_base = static_cast<const T*>(p.k) + i_hk * p.stride_kh;
  const T* v_base = static_cast<const T*>(p.v) + i_hk * p.stride_vh;

  // Queries of the group as float, zero rows past G.
  const T* q = static_cast<const T*>(p.q) + i_q * p.stride_qt + int64_t(i_hk) * G * p.stride_qh;
  for (int e = tid; e < kDecodeMaxGroup * D; e += kDecodeThreads) {
    const int g = e / D, d = e % D;
    sQ[e] = g < G ? TypeTraits<T>::to_float(q[g * p.stride_qh + d]) : 0.f;
  }

  // First position of chunk c (16 keys inside one block and one page); > pos_q: nothing to read.
  auto chunk_pos = [&](int c) {
    const int k = key0 + c * kDecodeKeys;
    return list[k / B] * B + k % B;
  };
  auto load_chunk = [&](int c, int stage) {
    if (c < n_chunks) {
      const int pos0 = chunk_pos(c);
      if (pos0 <= pos_q) {
        const int64_t page = bt[pos0 / P];
        const int64_t off_k = page * p.stride_kp + int64_t(pos0 % P) * p.stride_ks;
        const int64_t off_v = page * p.stride_vp + int64_t(pos0 % P) * p.stride_vs;
#pragma unroll
        for (int i = 0; i < kLoads; ++i) {
          const int v = tid + i * kDecodeThreads;
          const int r = v / DC, col = (v % DC) * 8;
          const bool ok = pos0 + r <= pos_q;  // NOTE: zero-fill keys past the token: never NaN
          const int rr = ok ? r : 0;
          cp_async16(sK + (stage * kDecodeKeys + r) * kRow + col, k_base + off_k + rr * p.stride_ks + col, ok);
          cp_async16(sV + (stage * kDecodeKeys + r) * kRow + col, v_base + off_v + rr * p.stride_vs + col, ok);
        }
      }
    }
    cp_async_commit();
  };

  // QK role: head g = tid / 16 (two heads a warp), key n = tid % 16.
  const int qk_g = tid / kDecodeKeys, qk_n = tid % kDecodeKeys;
  // P.V role: 8 channels at dc, keys kg, kg + NKG, ...
  const int dc = tid % DC, kg = tid / DC;
  float m_run = -INFINITY, l_run = 0.f;
  float acc[kDecodeMaxGroup][8];
#pragma unroll
  for (int g = 0; g < kDecodeMaxGroup; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kDecodeStages - 1; ++s) load_chunk(s, s);

  for (int c = 0; c < n_chunks; ++c) {
    cp_async_wait<kDecodeStages - 2>();
    __syncthreads();
    load_chunk(c + kDecodeStages - 1, (c + kDecodeStages - 1) % kDecodeStages);
    const int pos0 = chunk_pos(c);
    if (pos0 > pos_q) continue;  // uniform: this chunk and the rest of its block are after the token
    const int stage = c % kDecodeStages;

    float s = -INFINITY;
    const int pos_k = pos0 + qk_n;
    if (qk_g < G && pos_k <= pos_q && (p.window <= 0 || pos_q - pos_k < p.window)) {
      const T* kr = sK + (stage * kDecodeKeys + qk_n) * kRow;
      const float* qr = sQ + qk_g * D;
      float dot = 0.f;
#pragma unroll
      for (int d = 0; d < D; d += 8) {
        float kf[8];
        unpack8<T>(*reinterpret_cast<const uint4*>(kr + d), kf);
        const float4 q0 = *reinterpret_cast<const float4*>(qr + d);
        const float4 q1 = *reinterpret_cast<const float4*>(qr + d + 4);
        dot += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] +
               q1.x * kf[4] + q1.y * kf[5] + q1.z * kf[6] + q1.w * kf[7];
      }
      s = logit_log2(dot, p.scale_log2, p.softcap);
    }
    float mx = s;
#pragma unroll
    for (int o = kDecodeKeys / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float m_new = fmaxf(m_run, mx);
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;
    const float pr = exp2f(s - m_safe);
    const float alpha = exp2f(m_run - m_safe);
    float sum = pr;
#pragma unroll
    for (int o = kDecodeKeys / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    sP[qk_g * kDecodeKeys + qk_n] = pr;
    if (qk_n == 0) sAlpha[qk_g] = alpha;
    __syncthreads();

#pragma unroll
    for (int g = 0; g < kDecodeMaxGroup; ++g) {
      if (g < G) {
        const float a = sAlpha[g];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] *= a;
      }
    }
#pragma unroll
    for (int i = 0; i < KPG; ++i) {
      const int n = kg + i * NKG;
      float vf[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(sV + (stage * kDecodeKeys + n) * kRow + dc * 8), vf);
#pragma unroll
      for (int g = 0; g < kDecodeMaxGroup; ++g) {
        if (g < G) {
          const float pg = sP[g * kDecodeKeys + n];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] += pg * vf[e];
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Sum the key groups' partial outputs, then normalise.
#pragma unroll
  for (int g = 0; g < kDecodeMaxGroup; ++g) {
    if (g < G) {
      float* r = sRed + (kg * kDecodeMaxGroup + g) * D + dc * 8;
      *reinterpret_cast<float4*>(r) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      *reinterpret_cast<float4*>(r + 4) = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
  }
  if (qk_n == 0) {
    sM[qk_g] = m_run;
    sL[qk_g] = l_run;
  }
  __syncthreads();
  for (int e = tid; e < G * D; e += kDecodeThreads) {
    const int g = e / D, d = e % D;
    float o = 0.f;
#pragma unroll
    for (int k = 0; k < NKG; ++k) o += sRed[(k * kDecodeMaxGroup + g) * D + d];
    const float l = sL[g];
    o = l > 0.f ? o / l : 0.f;
    const int h = i_hk * G + g;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + i_q * p.stride_ot + h * p.stride_oh;
      out[d] = TypeTraits<T>::from_float(o);
    } else {
      const int64_t part = (int64_t(i_t) * p.num_heads + h) * p.num_splits + i_s;
      p.o_part[part * D + d] = o;
      if (d == 0) p.lse_part[part] = l > 0.f ? sM[g] + log2f(l) : -INFINITY;
    }
  }
}

// grid (NT, H), D threads: out[q0, h] = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse).
template <typename T, int D>
__global__ void __launch_bounds__(D) merge_kernel(const AttnParams p) {
  const int i_t = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int S = p.num_splits;
  const int64_t base = (int64_t(i_t) * p.num_heads + h) * S;
  float mx = -INFINITY;
  for (int s = 0; s < S; ++s) mx = fmaxf(mx, p.lse_part[base + s]);
  const float m_safe = mx == -INFINITY ? 0.f : mx;
  float num = 0.f, den = 0.f;
  for (int s = 0; s < S; ++s) {
    const float w = exp2f(p.lse_part[base + s] - m_safe);
    num += w * p.o_part[(base + s) * D + d];
    den += w;
  }
  T* out = static_cast<T*>(p.out) + int64_t(p.tile_q0[i_t]) * p.stride_ot + h * p.stride_oh;
  out[d] = TypeTraits<T>::from_float(den > 0.f ? num / den : 0.f);
}

template <typename T, int D>
void launch_decode(const AttnParams& p, cudaStream_t stream) {
  if (p.num_tiles == 0) return;
  constexpr size_t smem = DecodeSmem<D>::kBytes;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(decode_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  decode_kernel<T, D><<<dim3(p.num_tiles, p.num_kv_heads, p.num_splits), kDecodeThreads, smem, stream>>>(p);
  if (p.num_splits > 1) merge_kernel<T, D><<<dim3(p.num_tiles, p.num_heads), D, 0, stream>>>(p);
}

}  // namespace moba
