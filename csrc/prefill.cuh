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
#include "prefill_tile.cuh"
#include "prefill_sm90.cuh"

namespace moba {

// Tile shapes a head dim: warps, 16-row m-tiles a warp (2: each K/V fragment read from shared
// memory feeds twice the mma work), keys a chunk, pipeline stages, Q fragments kept in registers.
// On the H100 (D 128, 128K, page 16) 8 warps of 16 rows with 64-key chunks measured 10% slower,
// and 4 stages no faster than 3.
template <int D, int V = 0> struct PrefillConfig;
template <> struct PrefillConfig<64, 0> { static constexpr int kWarps = 4, kMT = 2, kBN = 64, kStages = 3; static constexpr bool kQRegs = true; };
template <> struct PrefillConfig<128, 0> { static constexpr int kWarps = 4, kMT = 2, kBN = 32, kStages = 3; static constexpr bool kQRegs = false; };
template <> struct PrefillConfig<256, 0> { static constexpr int kWarps = 4, kMT = 1, kBN = 32, kStages = 2; static constexpr bool kQRegs = false; };

template <int D, int V = 0>
struct PrefillSmem {
  using Cfg = PrefillConfig<D, V>;
  static constexpr int kBM = 16 * Cfg::kMT * Cfg::kWarps, kBN = Cfg::kBN;
  static constexpr int kRow = D + 8;  // +16 bytes: the 8 rows of an ldmatrix hit distinct banks
  static constexpr size_t kQElems = size_t(kBM) * kRow;
  static constexpr size_t kKvElems = size_t(kBN) * kRow;  // one stage of K (or V)
  static constexpr size_t kBytes = (kQElems + 2 * Cfg::kStages * kKvElems) * 2 + Cfg::kStages * kBN * sizeof(int);
};

template <typename T, int D, int V>
__global__ void __launch_bounds__(PrefillConfig<D, V>::kWarps * 32) prefill_kernel(const AttnParams p) {
  using Cfg = PrefillConfig<D, V>;
  using Smem = PrefillSmem<D, V>;
  constexpr int kThreads = Cfg::kWarps * 32, kBN = Cfg::kBN, kBM = Smem::kBM, kRow = Smem::kRow;
  constexpr int MT = Cfg::kMT;
  constexpr int DC = D / 8;
  constexpr int KT = D / 16;    // k-steps of Q.K^T
  constexpr int NT = kBN / 8;   // n-tiles of S
  constexpr int DT = D / 8;     // n-tiles of O

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  constexpr int NS = Cfg::kStages;
  T* sK = sQ + Smem::kQElems;               // [NS][kBN][kRow]
  T* sV = sK + NS * Smem::kKvElems;         // [NS][kBN][kRow]
  int* sPos = reinterpret_cast<int*>(sV + NS * Smem::kKvElems);  // [NS][kBN] key positions

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int i_t = blockIdx.x, i_hk = blockIdx.y;
  const int G = p.group, P = p.page_size;
  const int row0 = blockIdx.z * kBM;          // first tile row of this CTA
  PrefillTile t;
  if (!prefill_tile(p, i_t, i_hk, row0, kBM, t)) return;
  const int n_rows = t.n_rows, n_keys = t.n_keys, max_pos = t.max_pos;
  const int n_live = t.live_chunks(kBN);
  const int c_mask = t.first_masked_chunk(kBN, n_live);
  const T* k_base = static_cast<const T*>(p.k) + i_hk * p.stride_kh;
  const T* v_base = static_cast<const T*>(p.v) + i_hk * p.stride_vh;
  const T* q_base = static_cast<const T*>(p.q);

  // Q rows of this CTA (zeros past the tile).
  for (int v = tid; v < kBM * DC; v += kThreads) {
    const int r = v / DC, col = (v % DC) * 8;
    const int rr = row0 + r;
    const bool ok = rr < n_rows;
    const int64_t tq = ok ? t.i_q0 + rr / G : 0;
    const int h = i_hk * G + (ok ? rr % G : 0);
    cp_async16(sQ + r * kRow + col, q_base + tq * p.stride_qt + h * p.stride_qh + col, ok);
  }
  // K/V rows this thread copies: rows (tid + i * kThreads) / DC, 16 bytes at column (tid % DC) * 8.
  // Their pages are looked up one chunk ahead (`fetch`) so that the dependent list and block
  // table reads never stall the copies (`issue`) or the mma work between them.
  constexpr int NL = kBN * DC / kThreads;
  static_assert(NL >= 1 && kThreads % DC == 0, "tile shape");
  const int ld_col = (tid % DC) * 8;
  int nx_pos[NL], nx_page[NL];
  auto fetch = [&](int c) {
#pragma unroll
    for (int i = 0; i < NL; ++i) {
      const int k = c * kBN + (tid + i * kThreads) / DC;
      int pos = k < n_keys ? t.key_pos(k) : INT_MAX;
      // NOTE: keys past the CTA's last query may lie in pages the request does not own yet.
      pos = pos <= max_pos ? pos : INT_MAX;
      nx_pos[i] = pos;
      nx_page[i] = pos != INT_MAX ? t.bt[pos / P] : 0;
    }
  };
  auto issue = [&](int stage) {
    T* dk = sK + stage * Smem::kKvElems;
    T* dv = sV + stage * Smem::kKvElems;
#pragma unroll
    for (int i = 0; i < NL; ++i) {
      const int r = (tid + i * kThreads) / DC;
      const bool ok = nx_pos[i] != INT_MAX;
      const int64_t page = nx_page[i], slot = ok ? nx_pos[i] % P : 0;
      cp_async16(dk + r * kRow + ld_col, k_base + page * p.stride_kp + slot * p.stride_ks + ld_col, ok);
      cp_async16(dv + r * kRow + ld_col, v_base + page * p.stride_vp + slot * p.stride_vs + ld_col, ok);
      if (ld_col == 0) sPos[stage * kBN + r] = nx_pos[i];
    }
  };

  // Rows of this thread (mma C layout): per m-tile, lane / 4 and lane / 4 + 8 of the warp's slab.
  const int warp_row = warp * 16 * MT;
  int qpos[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) qpos[mt][h2] = t.pos0 + (row0 + warp_row + mt * 16 + lane / 4 + h2 * 8) / G;

  float o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < DT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m_run[mt][0] = m_run[mt][1] = -INFINITY, l_run[mt][0] = l_run[mt][1] = 0.f;
  uint32_t qf[Cfg::kQRegs ? MT : 1][Cfg::kQRegs ? KT : 1][4];

  // Pipeline: chunks c + 1 .. c + NS - 1 are in flight while chunk c is computed.
#pragma unroll
  for (int c = 0; c < NS - 1; ++c) {
    if (c < n_live) {
      fetch(c);
      issue(c);
    }
    cp_async_commit();  // the first group holds Q too
  }
  fetch(NS - 1);
  // ldmatrix A operand: matrix m = lane / 8 covers rows (m % 2) * 8, cols (m / 2) * 8.
  const T* q_frag_base = sQ + (warp_row + (lane % 8) + ((lane / 8) % 2) * 8) * kRow + (lane / 16) * 8;

  for (int c = 0; c < n_live; ++c) {
    cp_async_wait<NS - 2>();
    __syncthreads();
    if constexpr (Cfg::kQRegs) {
      if (c == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kt = 0; kt < KT; ++kt) ldmatrix_x4(qf[mt][kt], q_frag_base + mt * 16 * kRow + kt * 16);
      }
    }
    const int stage = c % NS;
    if (c + NS - 1 < n_live) issue((c + NS - 1) % NS);
    cp_async_commit();
    fetch(c + NS);

    const T* k_s = sK + stage * Smem::kKvElems;
    const T* v_s = sV + stage * Smem::kKvElems;
    const int* pos_s = sPos + stage * kBN;

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
    // B operand from K [key][d]: matrix m covers keys (m / 2) * 8, d (m % 2) * 8.
    const T* k_frag = k_s + ((lane % 8) + (lane / 16) * 8) * kRow + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Cfg::kQRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[mt][i] = qf[mt][kt][i];
        } else {
          ldmatrix_x4(a[mt], q_frag_base + mt * 16 * kRow + kt * 16);
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_frag + np * 16 * kRow + kt * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // Mask only chunks that reach past the CTA's first query, hold padding, or under a window.
    const bool masked = p.window > 0 || c >= c_mask;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int i = 0; i < NT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = logit_log2(s[mt][i][e], p.scale_log2, p.softcap);
          if (masked) {
            const int kp = pos_s[i * 8 + 2 * (lane % 4) + (e & 1)];
            const int qp = qpos[mt][e >> 1];
            const bool ok = kp <= qp && (p.window <= 0 || qp - kp < p.window);
            x = ok ? x : -INFINITY;
          }
          s[mt][i][e] = x;
        }
      }
    }

    // Online softmax: a row's 4 threads are one quad.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        float mx = m_run[mt][h2];
#pragma unroll
        for (int i = 0; i < NT; ++i) mx = fmaxf(mx, fmaxf(s[mt][i][2 * h2], s[mt][i][2 * h2 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float ms = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m_run[mt][h2] - ms);
        m_run[mt][h2] = mx;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          s[mt][i][2 * h2] = exp2f(s[mt][i][2 * h2] - ms);
          s[mt][i][2 * h2 + 1] = exp2f(s[mt][i][2 * h2 + 1] - ms);
          sum += s[mt][i][2 * h2] + s[mt][i][2 * h2 + 1];
        }
        l_run[mt][h2] = l_run[mt][h2] * alpha + sum;
#pragma unroll
        for (int i = 0; i < DT; ++i) {
          o[mt][i][2 * h2] *= alpha;
          o[mt][i][2 * h2 + 1] *= alpha;
        }
      }
    }

    // O += P V: P's C fragments are the A fragments of the next mma; B from V [key][d] transposed,
    // matrix m covers keys (m % 2) * 8, d (m / 2) * 8.
    const T* v_frag = v_s + ((lane % 8) + ((lane / 8) % 2) * 8) * kRow + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_frag + kk * 16 * kRow + dp * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][2 * dp], a[mt], b[0], b[1]);
          mma_16816<T>(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      float l = l_run[mt][h2];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int rr = row0 + warp_row + mt * 16 + lane / 4 + h2 * 8;
      if (rr >= n_rows) continue;
      T* dst = out + (t.i_q0 + rr / G) * p.stride_ot + (i_hk * G + rr % G) * p.stride_oh + 2 * (lane % 4);
#pragma unroll
      for (int i = 0; i < DT; ++i)
        *reinterpret_cast<typename TypeTraits<T>::pair*>(dst + i * 8) =
            TypeTraits<T>::from_float2(o[mt][i][2 * h2] * inv, o[mt][i][2 * h2 + 1] * inv);
    }
  }
}

template <typename T, int D, int V>
void launch_prefill_variant(const AttnParams& p, cudaStream_t stream) {
  constexpr int kBM = PrefillSmem<D, V>::kBM;
  constexpr size_t smem = PrefillSmem<D, V>::kBytes;
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(prefill_kernel<T, D, V>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  const dim3 grid(p.num_tiles, p.num_kv_heads, (p.rows_per_tile + kBM - 1) / kBM);
  prefill_kernel<T, D, V><<<grid, PrefillConfig<D, V>::kWarps * 32, smem, stream>>>(p);
}

template <typename T, int D>
bool launch_prefill(const AttnParams& p, cudaStream_t stream) {
  if (p.num_tiles == 0) return false;
  if (launch_prefill_sm90<T, D>(p, stream)) return true;
  launch_prefill_variant<T, D, 0>(p, stream);
  return false;
}

}  // namespace moba
