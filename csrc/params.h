// Launch parameters of the kernels: plain pointers, strides in elements and ints, filled by the
// torch launchers (*.cpp) and read by the torch-free kernels (*.cuh). Host and device safe.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace moba {

// Block pooling: one work item = one (request, completed MoBA block).
struct PoolParams {
  const void* k;          // [N, P, HK, D]
  void* summary;          // [N, SLOTS, S, HK, D]
  const float* weight;    // [HK, B, D] float32 (gate 3, learned)
  const int* block_table; // [R, max_pages]
  const int* work_req;    // [W]
  const int* work_blk;    // [W]
  int64_t stride_kp, stride_ks, stride_kh;
  int64_t stride_sp, stride_sslot, stride_ss, stride_sh;
  int64_t stride_bt;
  int num_work, num_kv_heads, head_dim, block_size, page_size;
  int gate;               // 0 mean, 1 max, 2 minmax, 3 learned
};

// Sparse paged attention over per-tile block lists (prefill tiles, or one-token decode tiles).
struct AttnParams {
  const void* q;           // [T, H, D]
  const void* k;           // [N, P, HK, D]
  const void* v;           // [N, P, HK, D]
  void* out;               // [T, H, D]
  float* o_part;           // [NT, H, S, D] float32 split partials (decode, S > 1)
  float* lse_part;         // [NT, H, S] float32 log2-sum-exp of each partial
  const int* block_table;  // [R, max_pages]
  const int* tile_req;     // [NT]
  const int* tile_q0;      // [NT] first query row
  const int* tile_len;     // [NT] tokens
  const int* tile_pos0;    // [NT] position of the first token
  const int64_t* tile_index; // [NT] row of the tile in blocks/nblocks
  const int* blocks;       // [NT_all, HK, LW] ascending block lists
  const int* nblocks;      // [NT_all, HK]
  int64_t stride_qt, stride_qh;
  int64_t stride_kp, stride_ks, stride_kh;
  int64_t stride_vp, stride_vs, stride_vh;
  int64_t stride_ot, stride_oh;
  int64_t stride_bt;
  int64_t stride_lt, stride_lh, stride_nt;
  int64_t num_slots;       // N * P: token slots of the cache
  int num_tiles, num_heads, num_kv_heads, group, block_size, page_size;
  int rows_per_tile;       // prefill: tokens per tile x group (rows of one tile)
  int num_splits;          // decode split-K parts
  float scale_log2;        // softmax scale * log2(e)
  float softcap;           // > 0: logits = softcap * tanh(logits / softcap)
  int window;              // > 0: keys with pos_q - pos_k < window only
};

template <typename T, typename TS> void launch_pool(const PoolParams& p, cudaStream_t stream);
template <typename T, int D> void launch_decode(const AttnParams& p, cudaStream_t stream);
// Returns whether the Hopper kernel ran the call (else the mma.sync kernel did).
template <typename T, int D> bool launch_prefill(const AttnParams& p, cudaStream_t stream);
// Whether prefill calls on the current device can run the Hopper kernel (prefill_sm90.cuh): an SM90
// device, a build holding its code, MOBA_CUDA_WGMMA not 0. The call's shapes decide the rest.
bool hopper_prefill_ready(cudaStream_t stream);

}  // namespace moba
