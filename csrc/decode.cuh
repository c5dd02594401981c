// Sparse paged decode on tensor cores: one CTA = one decode token x one KV head x one split of
// the token's block list. The rows of the mma tiles are the GQA group's query heads (padded to 16),
// so every K/V load serves all heads of the group. Keys stream through shared memory 16 x kWarps
// at a time (cp.async, kStages deep); each warp takes 16 keys of a chunk with its own online
// softmax, so a chunk needs one barrier; warps are merged at the end, splits by `merge_kernel`.
//
// Launch shapes depend only on (tokens, KV heads, splits): no host sync, CUDA-graph safe.
#pragma once

#include <limits.h>

#include "common.cuh"
#include "params.h"

namespace moba {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kDecodeMaxGroup = 16;  // query heads per KV head: the 16 rows of an mma tile
// 16 keys (one warp's share of a chunk) never cross a MoBA block (B >= 16) or a page (P a
// multiple of 16): one block-table read places them.
constexpr int kHalf = 16;
constexpr int kDecodeKeys = kHalf * kDecodeWarps;
// quarters (16 keys) whose positions and pages one pass stages in shared memory
constexpr int kDecodeWin = 512;

template <int D>
struct DecodeSmem {
  static constexpr int kStages = D <= 64 ? 4 : D <= 128 ? 3 : 2;
  static constexpr int kRow = D + 8;  // +16 bytes: the 8 rows of an ldmatrix hit distinct banks
  static constexpr size_t kQBytes = size_t(16) * kRow * 2;
  static constexpr size_t kKvBytes = size_t(kStages) * kDecodeKeys * kRow * 2 * 2;
  // after the loop: each warp's O [16][D] and (m, l) [16][2], float
  static constexpr size_t kRedBytes = size_t(kDecodeWarps) * 16 * (D + 2) * 4;
  static constexpr size_t kPoolBytes = kKvBytes > kRedBytes ? kKvBytes : kRedBytes;
  static constexpr size_t kBytes = kQBytes + kPoolBytes + 2 * kDecodeWin * 4;
};

// grid (NT, HK, S), 128 threads.
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(const AttnParams p) {
  using Smem = DecodeSmem<D>;
  constexpr int kStages = Smem::kStages, kRow = Smem::kRow, KN = kDecodeKeys;
  constexpr int DC = D / 8;                         // 16-byte pieces of a row
  constexpr int KT = D / 16;                        // k-steps of Q.K^T
  constexpr int DT = D / 8;                         // n-tiles of O
  constexpr int kLoads = KN * DC / kDecodeThreads;  // K (and V) pieces a thread copies a chunk
  constexpr int kRowsPerLoad = kDecodeThreads / DC;
  static_assert(kLoads >= 1 && kDecodeThreads % DC == 0 && (kRowsPerLoad % kHalf == 0 || kHalf % kRowsPerLoad == 0),
                "head dim must be 64, 128 or 256");

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);                                   // [16][kRow]
  unsigned char* pool = smem + Smem::kQBytes;
  T* sK = reinterpret_cast<T*>(pool);                                   // [stages][KN][kRow]
  T* sV = sK + kStages * KN * kRow;
  float* sRed = reinterpret_cast<float*>(pool);                         // aliases K/V after the loop
  int* sPos = reinterpret_cast<int*>(pool + Smem::kPoolBytes);          // [kDecodeWin] first positions
  int* sPage = sPos + kDecodeWin;                                        // [kDecodeWin] pages

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
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
  const int key0 = it_lo * B, key_end = it_hi * B;
  const int* bt = p.block_table + i_req * p.stride_bt;
  const T* k_base = static_cast<const T*>(p.k) + i_hk * p.stride_kh;
  const T* v_base = static_cast<const T*>(p.v) + i_hk * p.stride_vh;

  // Q rows: the group's heads, zeros past G.
  const T* q = static_cast<const T*>(p.q) + i_q * p.stride_qt + int64_t(i_hk) * G * p.stride_qh;
  for (int v = tid; v < 16 * DC; v += kDecodeThreads) {
    const int g = v / DC, col = (v % DC) * 8;
    cp_async16(sQ + g * kRow + col, q + (g < G ? g : 0) * p.stride_qh + col, g < G);
  }

  cp_async_commit();  // Q: the oldest group, complete once the first chunk's wait returns

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  // ldmatrix A operand (Q): matrix m = lane / 8 covers rows (m % 2) * 8, cols (m / 2) * 8.
  const T* q_frag = sQ + ((lane % 8) + ((lane / 8) % 2) * 8) * kRow + (lane / 16) * 8;
  const int ld_col = (tid % DC) * 8, ld_row = tid / DC;
  // The split's keys in quarters of 16 (a chunk is one quarter per warp), kDecodeWin quarters a
  // pass: each pass first stages its quarters' first positions (INT_MAX: wholly after the token)
  // and pages in shared memory, so the copy pipeline never waits on a list or block-table read.
  const int n_quarters = (key_end - key0) / kHalf;
  for (int w0 = 0; w0 < n_quarters; w0 += kDecodeWin) {
    const int nq = min(kDecodeWin, n_quarters - w0);
    const int n_chunks = (nq + kDecodeWarps - 1) / kDecodeWarps;
    __syncthreads();  // the previous pass no longer reads sPos / sPage
    for (int i = tid; i < n_chunks * kDecodeWarps; i += kDecodeThreads) {
      int pos = INT_MAX, page = 0;
      if (i < nq) {
        const int k = key0 + (w0 + i) * kHalf;
        pos = list[k / B] * B + k % B;
        if (pos > pos_q) pos = INT_MAX;
        else page = bt[pos / P];
      }
      sPos[i] = pos;
      sPage[i] = page;
    }
    __syncthreads();

    auto issue = [&](int c) {  // chunk c into stage c % kStages (past the pass: zero-fill)
      const int stage = c % kStages;
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int r = ld_row + i * kRowsPerLoad;
        const int qi = c * kDecodeWarps + r / kHalf;
        const int rh = r % kHalf;
        const int hp = c < n_chunks ? sPos[qi] : INT_MAX;
        // NOTE: zero-fill keys past the token (never NaN into P.V)
        const bool ok = hp != INT_MAX && hp + rh <= pos_q;
        const int64_t slot = ok ? int64_t(hp % P + rh) : 0;
        const int64_t page = ok ? sPage[qi] : 0;
        cp_async16(sK + (stage * KN + r) * kRow + ld_col, k_base + page * p.stride_kp + slot * p.stride_ks + ld_col, ok);
        cp_async16(sV + (stage * KN + r) * kRow + ld_col, v_base + page * p.stride_vp + slot * p.stride_vs + ld_col, ok);
      }
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      issue(s);
      cp_async_commit();
    }
    for (int c = 0; c < n_chunks; ++c) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      const int stage = c % kStages;
      issue(c + kStages - 1);
      cp_async_commit();
      const int hp = sPos[c * kDecodeWarps + warp];
      if (hp == INT_MAX) continue;  // this warp's 16 keys are past the split or after the token

      // S = Q K^T over the warp's 16 keys: B operand from K [key][d], matrix m covers keys
      // (m / 2) * 8, d (m % 2) * 8.
      const T* k_s = sK + (stage * KN + warp * kHalf) * kRow;
      const T* k_frag = k_s + ((lane % 8) + (lane / 16) * 8) * kRow + ((lane / 8) % 2) * 8;
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kt = 0; kt < KT; ++kt) {
        uint32_t a[4], b[4];
        ldmatrix_x4(a, q_frag + kt * 16);
        ldmatrix_x4(b, k_frag + kt * 16);
        mma_16816<T>(s[0], a, b[0], b[1]);
        mma_16816<T>(s[1], a, b[2], b[3]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int pos_k = hp + i * 8 + 2 * (lane % 4) + (e & 1);
          const bool ok = pos_k <= pos_q && (p.window <= 0 || pos_q - pos_k < p.window);
          s[i][e] = ok ? logit_log2(s[i][e], p.scale_log2, p.softcap) : -INFINITY;
        }
      }
      // Online softmax of rows lane / 4 and lane / 8 + 8 (one quad a row).
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        float mx = fmaxf(m_run[h2], fmaxf(fmaxf(s[0][2 * h2], s[0][2 * h2 + 1]), fmaxf(s[1][2 * h2], s[1][2 * h2 + 1])));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float ms = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m_run[h2] - ms);
        m_run[h2] = mx;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          s[i][2 * h2] = exp2f(s[i][2 * h2] - ms);
          s[i][2 * h2 + 1] = exp2f(s[i][2 * h2 + 1] - ms);
          sum += s[i][2 * h2] + s[i][2 * h2 + 1];
        }
        l_run[h2] = l_run[h2] * alpha + sum;
#pragma unroll
        for (int i = 0; i < DT; ++i) {
          o[i][2 * h2] *= alpha;
          o[i][2 * h2 + 1] *= alpha;
        }
      }
      // O += P V: P's C fragments are the A fragment; B from V [key][d] transposed, matrix m covers
      // keys (m % 2) * 8, d (m / 2) * 8.
      uint32_t a[4];
      a[0] = pack2<T>(s[0][0], s[0][1]);
      a[1] = pack2<T>(s[0][2], s[0][3]);
      a[2] = pack2<T>(s[1][0], s[1][1]);
      a[3] = pack2<T>(s[1][2], s[1][3]);
      const T* v_frag = sV + (stage * KN + warp * kHalf + (lane % 8) + ((lane / 8) % 2) * 8) * kRow + (lane / 16) * 8;
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_frag + dp * 16);
        mma_16816<T>(o[2 * dp], a, b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    cp_async_wait<0>();  // the pass's trailing (zero-fill) copies
  }
  cp_async_wait<0>();  // Q, when the split has no key (no pass waited for it)
  __syncthreads();

  // Merge the warps: each writes its O rows and (m, l); rows past G are never read.
  float* red_o = sRed + warp * 16 * D;                         // [warps][16][D]
  float* red_ml = sRed + kDecodeWarps * 16 * D + warp * 32;    // [warps][16][2]
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int row = lane / 4 + h2 * 8;
    float l = l_run[h2];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
#pragma unroll
    for (int i = 0; i < DT; ++i)
      *reinterpret_cast<float2*>(red_o + row * D + i * 8 + 2 * (lane % 4)) = make_float2(o[i][2 * h2], o[i][2 * h2 + 1]);
    if (lane % 4 == 0) {
      red_ml[row * 2] = m_run[h2];
      red_ml[row * 2 + 1] = l;
    }
  }
  __syncthreads();
  const float* ml = sRed + kDecodeWarps * 16 * D;
  for (int e = tid; e < G * D; e += kDecodeThreads) {
    const int g = e / D, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, ml[w * 32 + g * 2]);
    const float ms = mx == -INFINITY ? 0.f : mx;
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float sc = exp2f(ml[w * 32 + g * 2] - ms);
      num += sc * sRed[(w * 16 + g) * D + d];
      den += sc * ml[w * 32 + g * 2 + 1];
    }
    const float o_gd = den > 0.f ? num / den : 0.f;
    const int h = i_hk * G + g;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + i_q * p.stride_ot + h * p.stride_oh;
      out[d] = TypeTraits<T>::from_float(o_gd);
    } else {
      const int64_t part = (int64_t(i_t) * p.num_heads + h) * p.num_splits + i_s;
      p.o_part[part * D + d] = o_gd;
      if (d == 0) p.lse_part[part] = den > 0.f ? mx + log2f(den) : -INFINITY;
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
