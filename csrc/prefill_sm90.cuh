// Sparse paged prefill for Hopper (sm_90a): warpgroup matrix instructions (wgmma) fed by the tensor
// memory accelerator (TMA), warp-specialised.
//
// A work item = 128 packed rows of one kernel tile x one KV head (row r: token r / G, query head
// r % G of the group, as in prefill.cuh), ordered row blocks fastest, then tiles, then KV heads.
// A CTA takes one item, or with a persistent grid (MOBA_SM90_PERSISTENT=1) one CTA an SM takes
// items in turn. A CTA has 3 warpgroups:
// - warp 0 of warpgroup 0 (the producer) walks the tile's selected keys kBN at a time (128 at
//   head dim 128, else 64) and loads each chunk of K and V into a stage of shared memory with TMA
//   (as many stages as fit), one box per run of `seg` = min(page, block, kBN) keys (such a run
//   never leaves its page), 64 head-dim columns a box, 128-byte swizzled; keys past the last query
//   or the list read as zeros (out-of-range rows); the pages of 32 runs are looked up at a time
//   (a lane each), ahead of the copies;
// - warpgroups 1 and 2 (the consumers) own 64 rows each: S = Q K^T from shared memory, the online
//   softmax in registers, O += P V with P from registers. S of chunk c is issued together with
//   P V of chunk c - 1, and the softmax of chunk c runs while that P V is on the tensor cores.
// Stages are handed over by mbarriers (full: bytes landed; empty: both consumers done with it).
// The two consumers take turns issuing their products (ping-pong, named barriers 3 and 4).
// Causal masking, the soft cap and the sliding window are applied as in prefill.cuh, only on
// chunks that reach past the CTA's first query, hold padding, or under a window; the others fold
// the softmax scale into the exponent.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "common.cuh"
#include "params.h"
#include "prefill_tile.cuh"
#include "sm90.cuh"

namespace moba {

// BN: keys a stage; as many stages as fit in shared memory beside Q (at most 8). At D 128, 128K,
// page 16 on the H100, attention alone: 128 keys x 3 stages 33.1-33.4 ms, 64 keys x 6 stages
// 38.5-39.6 ms (Triton 35.1-36.0 in the same process); before the batched lookups the order was
// the other way (53.6 against 51.5 ms).
template <int D, int BN = 64>
struct Sm90Prefill {
  static constexpr int kBM = 128;      // rows a CTA: 2 consumer warpgroups x 64
  static constexpr int kBN = BN;
  static constexpr int kThreads = 384;
  static constexpr uint32_t kQBytes = kBM * D * 2;
  static constexpr uint32_t kKvBytes = kBN * D * 2;  // one stage of K (or V)
  static constexpr int kFit = int((227 * 1024 - 1024 - 128 - kQBytes) / (2 * kKvBytes));
  static constexpr int kStages = kFit < 8 ? kFit : 8;
  // 1024 bytes of slack: the swizzled tiles start on a 1024-byte boundary.
  static constexpr size_t kSmemBytes = 1024 + kQBytes + 2 * kStages * kKvBytes + 2 * kStages * sizeof(uint64_t);
};

template <typename T, int D, int BN>
__global__ void __launch_bounds__(384, 1)
    prefill_sm90_kernel(const __grid_constant__ AttnParams p, const __grid_constant__ CUtensorMap tmap_k,
                        const __grid_constant__ CUtensorMap tmap_v, const int seg, const int oob_row,
                        const bool heads_inner, const int n_rb, const int n_work) {
#if MOBA_SM90
  using Cfg = Sm90Prefill<D, BN>;
  using namespace sm90;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, NS = Cfg::kStages;
  static_assert(NS >= 2, "two stages of K and V must fit beside Q");
  constexpr uint32_t kQBytes = Cfg::kQBytes, kKvBytes = Cfg::kKvBytes;
  constexpr int NA = D / 64;  // 64-column atoms of a row

  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* sQ = smem;
  unsigned char* sK = sQ + kQBytes;       // [NS][kKvBytes]
  unsigned char* sV = sK + NS * kKvBytes; // [NS][kKvBytes]
  uint64_t* full = reinterpret_cast<uint64_t*>(sV + NS * kKvBytes);
  uint64_t* empty = full + NS;

  const int tid = threadIdx.x;
  const int G = p.group, P = p.page_size;
  // Work item w: row block w % n_rb, tile (w / n_rb) % NT, KV head w / (n_rb NT); row blocks
  // fastest, so that the CTAs that share a tile's K/V run side by side and find it in L2, and the
  // CTAs in flight read one KV head's cache. A CTA takes items blockIdx.x, blockIdx.x + gridDim.x,
  // ... (one, or with a persistent grid of one CTA an SM several: the producer then loads the
  // next item's keys while the consumers finish the last one).
  auto work = [&](int w, PrefillTile& t, int& row0, int& i_hk) {
    const int i_t = (w / n_rb) % p.num_tiles;
    i_hk = w / (n_rb * p.num_tiles);
    row0 = (w % n_rb) * kBM;
    return prefill_tile(p, i_t, i_hk, row0, kBM, t);
  };

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = tid / 128;
  if (wg == 0) {
    // Producer warpgroup: warp 0 issues the loads, the other three have nothing to do.
    setmaxnreg_dec<40>();
    if (tid >= 32) return;
    const int lane = tid;
    const int n_seg = kBN / seg;
    const int p_shift = __ffs(P) - 1;  // pages are powers of two
    static_assert(kBN / 16 <= 32, "one run a lane");
    const int cpl = 32 / n_seg;
    int g = 0;  // chunks loaded so far: chunk g goes to stage g % NS
    for (int w = blockIdx.x; w < n_work; w += gridDim.x) {
      PrefillTile t;
      int row0, i_hk;
      if (!work(w, t, row0, i_hk)) continue;
      const int n_live = t.live_chunks(kBN);
      // Cache rows of the runs of keys, looked up a batch of `cpl` chunks at a time: lane l holds
      // run l % n_seg of chunk c0 + l / n_seg and issues its copies. The next batch is looked up
      // when a batch starts, so its list and block table reads wait beside `cpl` chunks of copies.
      auto lookup = [&](int c0) {
        const int c = c0 + lane / n_seg;
        const int k = c * kBN + (lane % n_seg) * seg;
        int row = oob_row;
        if (c < n_live && k < t.n_keys) {
          const int pos = t.key_pos(k);
          // NOTE: keys past the CTA's last query may lie in pages the request does not own yet.
          if (pos <= t.max_pos) row = t.bt[pos / P] * P + pos % P;
        }
        return row;
      };
      int row = lookup(0), row_next = lookup(cpl);
      for (int c = 0; c < n_live; ++c, ++g) {
        const int s = g % NS;
        const int i = c % cpl;
        if (c > 0 && i == 0) {
          row = row_next;
          row_next = lookup(c + cpl);
        }
        mbar_wait(&empty[s], ((g / NS) & 1) ^ 1);
        if (lane == 0) mbar_arrive_expect_tx(&full[s], 2 * kKvBytes);
        __syncwarp();
        if (lane / n_seg == i) {
          // Cache row -> (page, slot in the page); the out-of-range row is page N, read as zeros.
          const int page = row >> p_shift, slot = row & (P - 1);
#pragma unroll
          for (int a = 0; a < NA; ++a) {
            const uint32_t off = s * kKvBytes + a * kBN * 128 + (lane % n_seg) * seg * 128;
            const int c1 = heads_inner ? i_hk : slot, c2 = heads_inner ? slot : i_hk;
            tma_load_4d(sK + off, &tmap_k, &full[s], a * 64, c1, c2, page);
            tma_load_4d(sV + off, &tmap_v, &full[s], a * 64, c1, c2, page);
          }
        }
      }
    }
    return;
  }

  // Consumers.
  setmaxnreg_inc<232>();
  const int cw = wg - 1;                 // consumer 0 or 1: CTA rows [64 cw, 64 cw + 64)
  const int ct = tid - 128 * wg;
  const int wi = ct / 32, lane = ct % 32;
  const int r_lo = 64 * cw + 16 * wi + lane / 4;  // this thread's rows: r_lo and r_lo + 8
  const uint32_t q_addr = smem_addr(sQ) + 64 * cw * 128;
  const uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV);

  // The current item (set at the top of the loop below, read by the lambdas).
  PrefillTile t;
  int row0 = 0, i_hk = 0, n_keys = 0, c_mask = 0;
  int qpos[2];

  float o[D / 2];
  float s[kBN / 2];
  uint32_t pf[kBN / 4];
  float m_run[2], l_run[2];

  auto s_gemm = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t sub = (kk % 4) * 32;
      const uint64_t da = desc_sw128(q_addr + (kk / 4) * kBM * 128 + sub, 16, 1024);
      const uint64_t db = desc_sw128(k_addr + stage * kKvBytes + (kk / 4) * kBN * 128 + sub, 16, 1024);
      Wgmma<kBN, T>::template ss<0>(s, da, db, kk > 0);
    }
  };
  // O += P V, at most 128 columns of O an instruction (head dim 256: two halves, each two
  // 64-column atoms of V).
  constexpr int NV = D < 128 ? D : 128;
  auto pv_gemm = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3]};
#pragma unroll
      for (int h = 0; h < D / NV; ++h) {
        const uint32_t off = h * (NV / 64) * kBN * 128 + kk * 16 * 128;
        const uint64_t db = desc_sw128(v_addr + stage * kKvBytes + off, kBN * 128, 1024);
        Wgmma<NV, T>::template rs<1>(*reinterpret_cast<float(*)[NV / 2]>(o + h * (NV / 2)), a, db, 1);
      }
    }
  };
  // The online softmax of chunk c in the log2 domain; exponentials left in s. Chunks that need
  // no mask and no soft cap keep the raw products: their scale is folded into the exponent's
  // multiply-add (and into the row max, the scale being positive).
  auto softmax = [&](int c, float (&alpha)[2]) {
    const bool masked = p.window > 0 || c >= c_mask;
    const bool plain = !masked && p.softcap <= 0.f && p.scale_log2 > 0.f;
    if (!plain) {
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = logit_log2(s[4 * i + e], p.scale_log2, p.softcap);
          if (masked) {
            const int k = c * kBN + 8 * i + 2 * (lane % 4) + (e & 1);
            const int kp = k < n_keys ? t.key_pos(k) : INT_MAX;
            const int qp = qpos[e >> 1];
            const bool ok = kp <= qp && (p.window <= 0 || qp - kp < p.window);
            x = ok ? x : -INFINITY;
          }
          s[4 * i + e] = x;
        }
      }
    }
    const float sc = plain ? p.scale_log2 : 1.f;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * h2], s[4 * i + 2 * h2 + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(m_run[h2], mx * sc);
      const float ms = mx == -INFINITY ? 0.f : mx;
      alpha[h2] = exp2f(m_run[h2] - ms);
      m_run[h2] = mx;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kBN / 8; ++i) {
        s[4 * i + 2 * h2] = exp2f(fmaf(s[4 * i + 2 * h2], sc, -ms));
        s[4 * i + 2 * h2 + 1] = exp2f(fmaf(s[4 * i + 2 * h2 + 1], sc, -ms));
        sum += s[4 * i + 2 * h2] + s[4 * i + 2 * h2 + 1];
      }
      l_run[h2] = l_run[h2] * alpha[h2] + sum;
    }
  };
  // P (the exponentials) as the A fragments of P V: 16 keys = two 8-column groups of S.
  auto to_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      pf[4 * kk] = pack2<T>(s[8 * kk], s[8 * kk + 1]);
      pf[4 * kk + 1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pf[4 * kk + 2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pf[4 * kk + 3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  auto release = [&](int stage) {
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[stage]);
  };

  // Ping-pong: the two consumers take turns issuing their matrix work (named barriers 3 and 4), so
  // that one's softmax runs while the other's products are on the tensor cores.
  auto turn_wait = [&]() { bar_sync(3 + cw, 256); };
  auto turn_pass = [&]() { bar_arrive(3 + (1 - cw), 256); };
  if (cw == 1) turn_pass();  // consumer 0 goes first
  int g = 0;  // chunks consumed so far: chunk g lies in stage g % NS
  for (int w = blockIdx.x; w < n_work; w += gridDim.x) {
    if (!work(w, t, row0, i_hk)) continue;
    n_keys = t.n_keys;
    const int n_live = t.live_chunks(kBN);
    c_mask = t.first_masked_chunk(kBN, n_live);
    const int n_rows = t.n_rows;
    {
      // This warpgroup's 64 Q rows (zeros past the tile), once its last item no longer reads them.
      bar_sync(1 + cw, 128);
      const T* q_base = static_cast<const T*>(p.q);
      constexpr int DC = D / 8;
      for (int v = ct; v < 64 * DC; v += 128) {
        const int r = 64 * cw + v / DC, col = (v % DC) * 8;
        const int rr = row0 + r;
        const bool ok = rr < n_rows;
        const int64_t tq = ok ? t.i_q0 + rr / G : 0;
        const int h = i_hk * G + (ok ? rr % G : 0);
        cp_async16(sQ + sw128_offset(r, col, kBM), q_base + tq * p.stride_qt + h * p.stride_qh + col, ok);
      }
      cp_async_commit();
      cp_async_wait<0>();
      fence_proxy_async();
      bar_sync(1 + cw, 128);
    }
    qpos[0] = t.pos0 + (row0 + r_lo) / G;
    qpos[1] = t.pos0 + (row0 + r_lo + 8) / G;
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    m_run[0] = m_run[1] = -INFINITY;
    l_run[0] = l_run[1] = 0.f;

    if (n_live > 0) {
      float alpha[2];
      mbar_wait(&full[g % NS], (g / NS) & 1);
      turn_wait();
      wgmma_fence();
      s_gemm(g % NS);
      wgmma_commit();
      turn_pass();
      wgmma_wait<0>();
      fence_regs(s);
      softmax(0, alpha);
      to_p();
      for (int c = 1; c < n_live; ++c) {
        const int st = (g + c) % NS, prev = (g + c - 1) % NS;
        mbar_wait(&full[st], ((g + c) / NS) & 1);
        fence_regs(o);
        fence_regs(pf);
        turn_wait();
        wgmma_fence();
        s_gemm(st);
        wgmma_commit();
        pv_gemm(prev);
        wgmma_commit();
        turn_pass();
        wgmma_wait<1>();
        fence_regs(s);
        softmax(c, alpha);
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pf);
        release(prev);
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[4 * i] *= alpha[0];
          o[4 * i + 1] *= alpha[0];
          o[4 * i + 2] *= alpha[1];
          o[4 * i + 3] *= alpha[1];
        }
        to_p();
      }
      const int last = (g + n_live - 1) % NS;
      fence_regs(o);
      fence_regs(pf);
      turn_wait();
      wgmma_fence();
      pv_gemm(last);
      wgmma_commit();
      turn_pass();
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(pf);
      release(last);
    }
    g += n_live;

    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      float l = l_run[h2];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int rr = row0 + r_lo + h2 * 8;
      if (rr >= n_rows) continue;
      T* dst = out + (t.i_q0 + rr / G) * p.stride_ot + (i_hk * G + rr % G) * p.stride_oh + 2 * (lane % 4);
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<typename TypeTraits<T>::pair*>(dst + i * 8) =
            TypeTraits<T>::from_float2(o[4 * i + 2 * h2] * inv, o[4 * i + 2 * h2 + 1] * inv);
    }
  }
#endif
}

// ---- host side ----

// Whether the Hopper kernel is allowed: MOBA_CUDA_WGMMA=0 keeps every GPU on the mma.sync kernel
// (=require: a prefill call the Hopper kernel cannot take is an error, attention.cpp).
inline bool sm90_prefill_enabled() {
  const char* v = getenv("MOBA_CUDA_WGMMA");
  return v == nullptr || strcmp(v, "0") != 0;
}

// Whether this build holds the Hopper kernels' code: an extension built without sm_90a (say for
// 8.0 alone, its PTX compiled for the H100 by the driver) has them empty. Asked once a process, on
// the first launch that is not inside a CUDA graph capture.
template <int Unused = 0>
__global__ void sm90_probe_kernel(int* built) {
#if MOBA_SM90
  *built = 1;
#else
  *built = 0;
#endif
}

inline bool sm90_kernels_built(cudaStream_t stream) {
  static int built = -1;
  if (built >= 0) return built == 1;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess || capturing != cudaStreamCaptureStatusNone)
    return false;
  int* flag = nullptr;
  int host = 0;
  if (cudaMalloc(&flag, sizeof(int)) != cudaSuccess) return false;
  sm90_probe_kernel<<<1, 1, 0, stream>>>(flag);
  // A launch error (no image for this device) is taken here, not left for the caller's check.
  const bool ok = cudaGetLastError() == cudaSuccess &&
                  cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, stream) == cudaSuccess &&
                  cudaStreamSynchronize(stream) == cudaSuccess;
  cudaFree(flag);
  built = ok && host == 1 ? 1 : 0;
  return built == 1;
}

inline int device_major() {
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major;
}

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// A K or V cache [N, P, HK, D] with its own strides (a page may be padded, and hold its slots
// after its heads, as vLLM's [N, HK, P, 2 D] pages do), boxes of `seg` slots of one page x 1 head
// x 64 columns; the map's dimensions run columns, then the finer of slots and heads
// (`heads_inner`: heads), then the coarser, then pages. False where TMA cannot take the layout
// (strides or base not 16-byte aligned).
template <typename T>
bool kv_tensor_map(CUtensorMap* map, const void* base, int64_t pages, int page_size, int hk, int d,
                   int64_t stride_p, int64_t stride_s, int64_t stride_h, int seg, bool heads_inner) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const CUtensorMapDataType dt =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t sz = sizeof(T);
  cuuint64_t dims[4] = {cuuint64_t(d), cuuint64_t(page_size), cuuint64_t(hk), cuuint64_t(pages)};
  cuuint64_t strides[3] = {cuuint64_t(stride_s) * sz, cuuint64_t(stride_h) * sz, cuuint64_t(stride_p) * sz};
  cuuint32_t box[4] = {64, cuuint32_t(seg), 1, 1};
  if (heads_inner) {
    std::swap(dims[1], dims[2]);
    std::swap(strides[0], strides[1]);
    std::swap(box[1], box[2]);
  }
  cuuint32_t elem[4] = {1, 1, 1, 1};
  return encode(map, dt, 4, const_cast<void*>(base), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Whether the grid is persistent (one CTA an SM looping over the work items), with
// MOBA_SM90_PERSISTENT=1; by default one CTA an item. On the H100 (128K, page 16, 64-key stages)
// neither was faster beyond the noise between runs: five alternating rounds gave medians of 37.9 ms (one an
// item) and 37.4 ms (persistent), another call 36.6 against 41.9.
inline bool sm90_persistent_enabled() {
  const char* v = getenv("MOBA_SM90_PERSISTENT");
  return v != nullptr && strcmp(v, "1") == 0;
}

template <typename T, int D, int BN>
bool launch_prefill_sm90_bn(const AttnParams& p, cudaStream_t stream) {
  using Cfg = Sm90Prefill<D, BN>;
  const int P = p.page_size, B = p.block_size;
  const int64_t slots = p.num_slots;
  // Keys a TMA box: a run within one page, one block and one stage (all powers of two).
  const int seg = P < B ? (P < Cfg::kBN ? P : Cfg::kBN) : (B < Cfg::kBN ? B : Cfg::kBN);
  CUtensorMap tk, tv;
  const int64_t pages = slots / P;
  // One order for both maps (the kernel's coordinates): heads inner where K's heads are.
  const bool heads_inner = p.stride_kh < p.stride_ks;
  if (heads_inner != (p.stride_vh < p.stride_vs) ||
      !kv_tensor_map<T>(&tk, p.k, pages, P, p.num_kv_heads, D, p.stride_kp, p.stride_ks, p.stride_kh, seg,
                        heads_inner) ||
      !kv_tensor_map<T>(&tv, p.v, pages, P, p.num_kv_heads, D, p.stride_vp, p.stride_vs, p.stride_vh, seg,
                        heads_inner))
    return false;
  const int n_rb = (p.rows_per_tile + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t n_work = int64_t(n_rb) * p.num_kv_heads * p.num_tiles;
  if (n_work >= INT_MAX) return false;
  if (n_work == 0) return true;
  constexpr size_t smem = Cfg::kSmemBytes;
  const bool persistent = sm90_persistent_enabled();
  int n_sm = 0;
  if (persistent) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
  }
  auto kernel = prefill_sm90_kernel<T, D, BN>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) != cudaSuccess)
    return false;
  const int64_t grid = persistent && n_sm > 0 ? std::min<int64_t>(n_work, n_sm) : n_work;
  kernel<<<dim3(unsigned(grid)), Cfg::kThreads, smem, stream>>>(p, tk, tv, seg, int(slots), heads_inner, n_rb,
                                                                    int(n_work));
  return true;
}

// Launches the Hopper kernel where it applies (an SM90 device, head dim 64, 128 or 256, power-of-two
// pages, strides TMA can take: multiples of 16 bytes); returns false to leave the call to the
// mma.sync kernel.
template <typename T, int D>
bool launch_prefill_sm90(const AttnParams& p, cudaStream_t stream) {
  if constexpr (D != 64 && D != 128 && D != 256) {
    return false;
  } else {
    const int P = p.page_size;
    if (!sm90_prefill_enabled() || device_major() != 9 || !sm90_kernels_built(stream)) return false;
    if ((P & (P - 1)) != 0) return false;
    if (p.num_slots >= INT_MAX) return false;
    // Keys a stage: 128 at head dim 128 (3 stages), 64 otherwise (head dim 64: 8 stages; 256: 2).
    return launch_prefill_sm90_bn<T, D, D == 128 ? 128 : 64>(p, stream);
  }
}

}  // namespace moba
