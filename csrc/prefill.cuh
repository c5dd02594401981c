// Sparse paged prefill over per-tile block lists, on tensor cores (mma.sync m16n8k16: SM80+).
//
// One CTA = kBM packed rows of one kernel tile x one KV head. Row r of a tile is token r / G,
// query head r % G of the group, so every K/V chunk is loaded once for all heads of the group.
// The tile's selected blocks are read as one sequence of keys (block list[k / B], offset k % B),
// kBN keys a chunk, each key's page found through the block table: blocks may span pages and a
// page may hold several blocks. Chunks wholly before the CTA's first query skip the causal mask;
// chunks wholly after its last query are never loaded (lists are ascending).
#pragma once

#include <limits.h>

#include "common.cuh"
#include "params.h"

namespace moba {

template <int D> struct PrefillConfig;
template <> struct PrefillConfig<64> { static constexpr int kWarps = 8, kBN = 64; static constexpr bool kQRegs = true; };
template <> struct PrefillConfig<128> { static constexpr int kWarps = 8, kBN = 64; static constexpr bool kQRegs = true; };
template <> struct PrefillConfig<256> { static constexpr int kWarps = 4, kBN = 32; static constexpr bool kQRegs = false; };

template <int D>
struct PrefillSmem {
  static constexpr int kWarps = PrefillConfig<D>::kWarps, kBN = PrefillConfig<D>::kBN;
  static constexpr int kBM = 16 * kWarps;
  static constexpr int kRow = D + 8;  // +16 bytes: the 8 rows of an ldmatrix hit distinct banks
  static constexpr size_t kQElems = size_t(kBM) * kRow;
  static constexpr size_t kKvElems = size_t(kBN) * kRow;  // one stage of K (or V)
  static constexpr size_t kBytes = (kQElems + 4 * kKvElems) * 2 + 2 * kBN * sizeof(int);
};

template <typename T, int D>
__global__ void __launch_bounds__(PrefillConfig<D>::kWarps * 32) prefill_kernel(const AttnParams p) {
  using Cfg = PrefillConfig<D>;
  using Smem = PrefillSmem<D>;
  constexpr int kThreads = Cfg::kWarps * 32, kBN = Cfg::kBN, kBM = Smem::kBM, kRow = Smem::kRow;
  constexpr int DC = D / 8;
  constexpr int KT = D / 16;    // k-steps of Q.K^T
  constexpr int NT = kBN / 8;   // n-tiles of S
  constexpr int DT = D / 8;     // n-tiles of O

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + Smem::kQElems;               // [2][kBN][kRow]
  T* sV = sK + 2 * Smem::kKvElems;          // [2][kBN][kRow]
  int* sPos = reinterpret_cast<int*>(sV + 2 * Smem::kKvElems);  // [2][kBN] key positions

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int i_t = blockIdx.x, i_hk = blockIdx.y;
  const int G = p.group, B = p.block_size, P = p.page_size;
  const int n_tok = p.tile_len[i_t];
  const int row0 = blockIdx.z * kBM;          // first tile row of this CTA
  const int n_rows = n_tok * G;
  if (row0 >= n_rows) return;
  const int64_t i_req = p.tile_req[i_t];
  const int64_t i_q0 = p.tile_q0[i_t];
  const int pos0 = p.tile_pos0[i_t];
  const int64_t i_row = p.tile_index[i_t];
  const int* list = p.blocks + i_row * p.stride_lt + i_hk * p.stride_lh;
  const int n_keys = p.nblocks[i_row * p.stride_nt + i_hk] * B;
  const int n_chunks = (n_keys + kBN - 1) / kBN;
  const int* bt = p.block_table + i_req * p.stride_bt;
  const int min_pos = pos0 + row0 / G;
  const int max_pos = pos0 + min(n_rows - 1, row0 + kBM - 1) / G;
  const T* k_base = static_cast<const T*>(p.k) + i_hk * p.stride_kh;
  const T* v_base = static_cast<const T*>(p.v) + i_hk * p.stride_vh;
  const T* q_base = static_cast<const T*>(p.q);

  auto key_pos = [&](int k) { return list[k / B] * B + k % B; };

  // Q rows of this CTA (zeros past the tile).
  for (int v = tid; v < kBM * DC; v += kThreads) {
    const int r = v / DC, col = (v % DC) * 8;
    const int rr = row0 + r;
    const bool ok = rr < n_rows;
    const int64_t tq = ok ? i_q0 + rr / G : 0;
    const int h = i_hk * G + (ok ? rr % G : 0);
    cp_async16(sQ + r * kRow + col, q_base + tq * p.stride_qt + h * p.stride_qh + col, ok);
  }
  auto load_chunk = [&](int c, int stage) {
    T* dk = sK + stage * Smem::kKvElems;
    T* dv = sV + stage * Smem::kKvElems;
    for (int v = tid; v < kBN * DC; v += kThreads) {
      const int r = v / DC, col = (v % DC) * 8;
      const int k = c * kBN + r;
      int pos = k < n_keys ? key_pos(k) : INT_MAX;
      // NOTE: keys past the CTA's last query may lie in pages the request does not own yet.
      const bool ok = pos <= max_pos;
      int64_t page = 0, slot = 0;
      if (ok) {
        page = bt[pos / P];
        slot = pos % P;
      }
      cp_async16(dk + r * kRow + col, k_base + page * p.stride_kp + slot * p.stride_ks + col, ok);
      cp_async16(dv + r * kRow + col, v_base + page * p.stride_vp + slot * p.stride_vs + col, ok);
      if (col == 0) sPos[stage * kBN + r] = ok ? pos : INT_MAX;
    }
  };
  auto chunk_live = [&](int c) { return c < n_chunks && key_pos(c * kBN) <= max_pos; };

  // Rows of this thread in its warp's 16-row slab (mma C layout): r_a = lane / 4, r_b = r_a + 8.
  const int r_a = warp * 16 + lane / 4, r_b = r_a + 8;
  const int qpos_a = pos0 + (row0 + r_a) / G, qpos_b = pos0 + (row0 + r_b) / G;

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  uint32_t qf[Cfg::kQRegs ? KT : 1][4];

  const bool live0 = chunk_live(0);
  if (live0) load_chunk(0, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // ldmatrix A operand: matrix m = lane / 8 covers rows (m % 2) * 8, cols (m / 2) * 8.
  const T* q_frag_base = sQ + (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kRow + (lane / 16) * 8;
  if constexpr (Cfg::kQRegs) {
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) ldmatrix_x4(qf[kt], q_frag_base + kt * 16);
  }

  for (int c = 0; live0; ++c) {
    const int stage = c & 1;
    const bool next = chunk_live(c + 1);
    if (next) load_chunk(c + 1, stage ^ 1);
    cp_async_commit();

    const T* k_s = sK + stage * Smem::kKvElems;
    const T* v_s = sV + stage * Smem::kKvElems;
    const int* pos_s = sPos + stage * kBN;

    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    // B operand from K [key][d]: matrix m covers keys (m / 2) * 8, d (m % 2) * 8.
    const T* k_frag = k_s + ((lane % 8) + (lane / 16) * 8) * kRow + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      uint32_t a[4];
      if constexpr (Cfg::kQRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = qf[kt][i];
      } else {
        ldmatrix_x4(a, q_frag_base + kt * 16);
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_frag + np * 16 * kRow + kt * 16);
        mma_16816<T>(s[2 * np], a, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], a, b[2], b[3]);
      }
    }

    // Mask only chunks that reach past the CTA's first query, hold padding, or under a window.
    const int last_k = min((c + 1) * kBN, n_keys) - 1;
    const bool masked = p.window > 0 || (c + 1) * kBN > n_keys || key_pos(last_k) > min_pos;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = logit_log2(s[i][e], p.scale_log2, p.softcap);
        if (masked) {
          const int kp = pos_s[i * 8 + 2 * (lane % 4) + (e & 1)];
          const int qp = e < 2 ? qpos_a : qpos_b;
          const bool ok = kp <= qp && (p.window <= 0 || qp - kp < p.window);
          x = ok ? x : -INFINITY;
        }
        s[i][e] = x;
      }
    }

    // Online softmax, two rows a thread; a row's 4 threads are one quad.
    float mx_a = m_a, mx_b = m_b;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      mx_a = fmaxf(mx_a, fmaxf(s[i][0], s[i][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[i][2], s[i][3]));
    }
#pragma unroll
    for (int o_ = 1; o_ < 4; o_ <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, o_));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, o_));
    }
    const float ms_a = mx_a == -INFINITY ? 0.f : mx_a, ms_b = mx_b == -INFINITY ? 0.f : mx_b;
    const float al_a = exp2f(m_a - ms_a), al_b = exp2f(m_b - ms_b);
    m_a = mx_a;
    m_b = mx_b;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      s[i][0] = exp2f(s[i][0] - ms_a);
      s[i][1] = exp2f(s[i][1] - ms_a);
      s[i][2] = exp2f(s[i][2] - ms_b);
      s[i][3] = exp2f(s[i][3] - ms_b);
      sum_a += s[i][0] + s[i][1];
      sum_b += s[i][2] + s[i][3];
    }
    l_a = l_a * al_a + sum_a;
    l_b = l_b * al_b + sum_b;
#pragma unroll
    for (int i = 0; i < DT; ++i) {
      o[i][0] *= al_a;
      o[i][1] *= al_a;
      o[i][2] *= al_b;
      o[i][3] *= al_b;
    }

    // O += P V: P's C fragments are the A fragments of the next mma; B from V [key][d] transposed,
    // matrix m covers keys (m % 2) * 8, d (m / 2) * 8.
    const T* v_frag = v_s + ((lane % 8) + ((lane / 8) % 2) * 8) * kRow + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_frag + kk * 16 * kRow + dp * 16);
        mma_16816<T>(o[2 * dp], a, b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }

    if (!next) break;
    cp_async_wait<0>();
    __syncthreads();
  }

#pragma unroll
  for (int o_ = 1; o_ < 4; o_ <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, o_);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, o_);
  }
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  T* out = static_cast<T*>(p.out);
  const int rr_a = row0 + r_a, rr_b = row0 + r_b;
  T* out_a = out + (i_q0 + rr_a / G) * p.stride_ot + (i_hk * G + rr_a % G) * p.stride_oh + 2 * (lane % 4);
  T* out_b = out + (i_q0 + rr_b / G) * p.stride_ot + (i_hk * G + rr_b % G) * p.stride_oh + 2 * (lane % 4);
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    if (rr_a < n_rows)
      *reinterpret_cast<typename TypeTraits<T>::pair*>(out_a + i * 8) =
          TypeTraits<T>::from_float2(o[i][0] * inv_a, o[i][1] * inv_a);
    if (rr_b < n_rows)
      *reinterpret_cast<typename TypeTraits<T>::pair*>(out_b + i * 8) =
          TypeTraits<T>::from_float2(o[i][2] * inv_b, o[i][3] * inv_b);
  }
}

template <typename T, int D>
void launch_prefill(const AttnParams& p, cudaStream_t stream) {
  if (p.num_tiles == 0) return;
  constexpr int kBM = PrefillSmem<D>::kBM;
  constexpr size_t smem = PrefillSmem<D>::kBytes;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(prefill_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  const dim3 grid(p.num_tiles, p.num_kv_heads, (p.rows_per_tile + kBM - 1) / kBM);
  prefill_kernel<T, D><<<grid, PrefillConfig<D>::kWarps * 32, smem, stream>>>(p);
}

}  // namespace moba
