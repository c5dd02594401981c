// Torch launchers of the sparse paged attention kernels: checks, then `moba_cuda::prefill` and
// `moba_cuda::decode`; `moba_cuda::hopper_prefill_ready` says whether this device and build can run
// the Hopper prefill.
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <stdlib.h>
#include <string.h>

#include "checks.h"
#include "params.h"

namespace moba {
namespace {

constexpr int kMaxGroup = 16;

// Checks shared by prefill and decode; fills everything but the split buffers.
AttnParams attn_params(const at::Tensor& q,            // [T, H, D]
                       const at::Tensor& k_cache,      // [N, P, HK, D]
                       const at::Tensor& v_cache,      // [N, P, HK, D]
                       const at::Tensor& out,          // [T, H, D]
                       const at::Tensor& block_table,  // [R, max_pages] int32
                       const at::Tensor& tile_req,     // [NT] int32
                       const at::Tensor& tile_q0,      // [NT] int32
                       const at::Tensor& tile_len,     // [NT] int32
                       const at::Tensor& tile_pos0,    // [NT] int32
                       const at::Tensor& tile_index,   // [NT] int64
                       const at::Tensor& blocks,       // [NT_all, HK, LW] int32
                       const at::Tensor& nblocks,      // [NT_all, HK] int32
                       int64_t block_size, double scale, double softcap, int64_t window) {
  MOBA_CHECK_CUDA(q);
  MOBA_CHECK_SAME_DEVICE(k_cache, q);
  MOBA_CHECK_SAME_DEVICE(v_cache, q);
  MOBA_CHECK_SAME_DEVICE(out, q);
  MOBA_CHECK_SAME_DEVICE(block_table, q);
  MOBA_CHECK_SAME_DEVICE(tile_req, q);
  MOBA_CHECK_SAME_DEVICE(tile_q0, q);
  MOBA_CHECK_SAME_DEVICE(tile_len, q);
  MOBA_CHECK_SAME_DEVICE(tile_pos0, q);
  MOBA_CHECK_SAME_DEVICE(tile_index, q);
  MOBA_CHECK_SAME_DEVICE(blocks, q);
  MOBA_CHECK_SAME_DEVICE(nblocks, q);
  MOBA_CHECK_DIM(q, 3);
  MOBA_CHECK_DIM(k_cache, 4);
  MOBA_CHECK_DIM(out, 3);
  MOBA_CHECK_DIM(blocks, 3);
  MOBA_CHECK_DIM(nblocks, 2);
  MOBA_CHECK_DIM(block_table, 2);
  const auto dt = q.scalar_type();
  MOBA_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "q dtype must be bfloat16 or float16, got ", dt);
  MOBA_CHECK_DTYPE(k_cache, dt);
  MOBA_CHECK_DTYPE(v_cache, dt);
  MOBA_CHECK_DTYPE(out, dt);
  MOBA_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(), " != k_cache shape ",
              k_cache.sizes());
  MOBA_CHECK(out.sizes() == q.sizes(), "out shape ", out.sizes(), " != q shape ", q.sizes());
  check_vec16(q, "q");
  check_vec16(k_cache, "k_cache");
  check_vec16(v_cache, "v_cache");
  check_vec16(out, "out");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t P = k_cache.size(1), HK = k_cache.size(2);
  MOBA_CHECK(k_cache.size(3) == D, "head dim of q (", D, ") and k_cache (", k_cache.size(3), ") differ");
  MOBA_CHECK(D == 64 || D == 128 || D == 256, "head dim must be 64, 128 or 256, got ", D);
  MOBA_CHECK(P >= 16 && P % 16 == 0, "page size must be a multiple of 16, got ", P);
  MOBA_CHECK(is_pow2(block_size) && block_size >= 16, "block_size must be a power of two >= 16, got ", block_size);
  MOBA_CHECK(H % HK == 0, "query heads (", H, ") must be a multiple of KV heads (", HK, ")");
  MOBA_CHECK(H / HK <= kMaxGroup, "query heads per KV head must be <= ", kMaxGroup, ", got ", H / HK);
  check_index(block_table, "block_table");
  check_index(tile_req, "tile_req");
  check_index(tile_q0, "tile_q0");
  check_index(tile_len, "tile_len");
  check_index(tile_pos0, "tile_pos0");
  check_index(blocks, "blocks");
  check_index(nblocks, "nblocks");
  MOBA_CHECK_DTYPE(tile_index, at::kLong);
  const int64_t NT = tile_req.numel();
  MOBA_CHECK(tile_q0.numel() == NT && tile_len.numel() == NT && tile_pos0.numel() == NT && tile_index.numel() == NT,
              "tile_req, tile_q0, tile_len, tile_pos0 and tile_index must all be [", NT, "]");
  MOBA_CHECK(tile_index.is_contiguous(), "tile_index must be contiguous");
  MOBA_CHECK(blocks.size(1) == HK && nblocks.size(1) == HK && blocks.size(0) == nblocks.size(0),
              "blocks must be [NT_all, ", HK, ", LW] and nblocks [NT_all, ", HK, "], got ", blocks.sizes(), " and ",
              nblocks.sizes());
  MOBA_CHECK(T < (int64_t(1) << 31), "too many tokens");

  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.block_table = block_table.data_ptr<int>();
  p.tile_req = tile_req.data_ptr<int>();
  p.tile_q0 = tile_q0.data_ptr<int>();
  p.tile_len = tile_len.data_ptr<int>();
  p.tile_pos0 = tile_pos0.data_ptr<int>();
  p.tile_index = tile_index.data_ptr<int64_t>();
  p.blocks = blocks.data_ptr<int>();
  p.nblocks = nblocks.data_ptr<int>();
  p.stride_qt = q.stride(0);
  p.stride_qh = q.stride(1);
  p.stride_kp = k_cache.stride(0);
  p.stride_ks = k_cache.stride(1);
  p.stride_kh = k_cache.stride(2);
  p.stride_vp = v_cache.stride(0);
  p.stride_vs = v_cache.stride(1);
  p.stride_vh = v_cache.stride(2);
  p.stride_ot = out.stride(0);
  p.stride_oh = out.stride(1);
  p.stride_bt = block_table.stride(0);
  p.stride_lt = blocks.stride(0);
  p.stride_lh = blocks.stride(1);
  p.stride_nt = nblocks.stride(0);
  p.num_slots = k_cache.size(0) * P;
  p.num_tiles = static_cast<int>(NT);
  p.num_heads = static_cast<int>(H);
  p.num_kv_heads = static_cast<int>(HK);
  p.group = static_cast<int>(H / HK);
  p.block_size = static_cast<int>(block_size);
  p.page_size = static_cast<int>(P);
  p.num_splits = 1;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.softcap = static_cast<float>(softcap);
  p.window = static_cast<int>(window);
  return p;
}

#define MOBA_DISPATCH(FN)                                                              \
  auto FN##_dispatch(const AttnParams& p, at::ScalarType dt, int64_t D, cudaStream_t s) { \
    if (dt == at::kBFloat16) {                                                         \
      if (D == 64) return FN<__nv_bfloat16, 64>(p, s);                                 \
      if (D == 128) return FN<__nv_bfloat16, 128>(p, s);                               \
      return FN<__nv_bfloat16, 256>(p, s);                                             \
    }                                                                                  \
    if (D == 64) return FN<__half, 64>(p, s);                                          \
    if (D == 128) return FN<__half, 128>(p, s);                                        \
    return FN<__half, 256>(p, s);                                                      \
  }
MOBA_DISPATCH(launch_prefill)
MOBA_DISPATCH(launch_decode)

// Prefill tiles: up to `tokens_per_tile` tokens each, rows packed token x GQA group.
void prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out,
             const at::Tensor& block_table, const at::Tensor& tile_req, const at::Tensor& tile_q0,
             const at::Tensor& tile_len, const at::Tensor& tile_pos0, const at::Tensor& tile_index,
             const at::Tensor& blocks, const at::Tensor& nblocks, int64_t block_size, int64_t tokens_per_tile,
             double scale, double softcap, int64_t window) {
  AttnParams p = attn_params(q, k_cache, v_cache, out, block_table, tile_req, tile_q0, tile_len, tile_pos0,
                             tile_index, blocks, nblocks, block_size, scale, softcap, window);
  MOBA_CHECK(tokens_per_tile >= 1, "tokens_per_tile must be >= 1, got ", tokens_per_tile);
  p.rows_per_tile = static_cast<int>(tokens_per_tile * p.group);
  if (p.num_tiles == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const bool hopper = launch_prefill_dispatch(p, q.scalar_type(), q.size(2), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const char* want = getenv("MOBA_CUDA_WGMMA");
  MOBA_CHECK(hopper || want == nullptr || strcmp(want, "require") != 0,
             "MOBA_CUDA_WGMMA=require: the Hopper prefill kernel cannot take this call (it needs an SM90 "
             "device, a build for sm_90a, head dim 64/128/256, power-of-two pages and 16-byte aligned "
             "strides); head dim ", q.size(2), ", page size ", p.page_size);
}

// Decode tiles: one token each; `num_splits` parts of each token's list, merged by log-sum-exp.
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out,
            const at::Tensor& block_table, const at::Tensor& tile_req, const at::Tensor& tile_q0,
            const at::Tensor& tile_len, const at::Tensor& tile_pos0, const at::Tensor& tile_index,
            const at::Tensor& blocks, const at::Tensor& nblocks, int64_t block_size, int64_t num_splits,
            double scale, double softcap, int64_t window) {
  AttnParams p = attn_params(q, k_cache, v_cache, out, block_table, tile_req, tile_q0, tile_len, tile_pos0,
                             tile_index, blocks, nblocks, block_size, scale, softcap, window);
  MOBA_CHECK(num_splits >= 1 && num_splits <= 1024, "num_splits must be in [1, 1024], got ", num_splits);
  p.num_splits = static_cast<int>(num_splits);
  if (p.num_tiles == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor o_part, lse;
  if (num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    o_part = at::empty({p.num_tiles, p.num_heads, num_splits, q.size(2)}, f32);
    lse = at::empty({p.num_tiles, p.num_heads, num_splits}, f32);
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse.data_ptr<float>();
  }
  launch_decode_dispatch(p, q.scalar_type(), q.size(2), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool hopper_ready() { return hopper_prefill_ready(at::cuda::getCurrentCUDAStream()); }

}  // namespace

// Catch-all kernels: tensors on the wrong device reach the checks above and get their message.
TORCH_LIBRARY_FRAGMENT(moba_cuda, m) {
  m.def("prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor(a!) out, Tensor block_table, "
        "Tensor tile_req, Tensor tile_q0, Tensor tile_len, Tensor tile_pos0, Tensor tile_index, "
        "Tensor blocks, Tensor nblocks, int block_size, int tokens_per_tile, float scale, float softcap, "
        "int window) -> ()",
        TORCH_FN(prefill));
  m.def("decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor(a!) out, Tensor block_table, "
        "Tensor tile_req, Tensor tile_q0, Tensor tile_len, Tensor tile_pos0, Tensor tile_index, "
        "Tensor blocks, Tensor nblocks, int block_size, int num_splits, float scale, float softcap, "
        "int window) -> ()",
        TORCH_FN(decode));
  m.def("hopper_prefill_ready() -> bool", TORCH_FN(hopper_ready));
}

}  // namespace moba
