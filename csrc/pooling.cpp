// Torch launcher of the block pooling kernel: checks, then `moba_cuda::pool`.
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "params.h"

namespace moba {
namespace {

template <typename T>
void pool_dispatch_summary(const PoolParams& p, at::ScalarType st, cudaStream_t stream) {
  switch (st) {
    case at::kBFloat16: launch_pool<T, __nv_bfloat16>(p, stream); break;
    case at::kHalf: launch_pool<T, __half>(p, stream); break;
    default: launch_pool<T, float>(p, stream); break;
  }
}

// Writes the summary of each (work_req[i], work_blk[i]) block (none where work_blk[i] < 0). gate: 0 mean, 1 max, 2 minmax,
// 3 learned (weight [HK, B, D] float32).
void pool(const at::Tensor& k_cache,        // [N, P, HK, D]
          const at::Tensor& summary_cache,  // [N, SLOTS, S, HK, D]
          const std::optional<at::Tensor>& weight,
          const at::Tensor& block_table,    // [R, max_pages] int32
          const at::Tensor& work_req,       // [W] int32
          const at::Tensor& work_blk,       // [W] int32
          int64_t block_size, int64_t gate) {
  MOBA_CHECK_CUDA(k_cache);
  MOBA_CHECK_SAME_DEVICE(summary_cache, k_cache);
  MOBA_CHECK_SAME_DEVICE(block_table, k_cache);
  MOBA_CHECK_SAME_DEVICE(work_req, k_cache);
  MOBA_CHECK_SAME_DEVICE(work_blk, k_cache);
  MOBA_CHECK_DIM(k_cache, 4);
  MOBA_CHECK_DIM(summary_cache, 5);
  MOBA_CHECK_LAST_CONTIG(k_cache);
  MOBA_CHECK_LAST_CONTIG(summary_cache);
  check_index(block_table, "block_table");
  check_index(work_req, "work_req");
  check_index(work_blk, "work_blk");
  MOBA_CHECK(work_req.dim() == 1 && work_blk.dim() == 1 && work_req.numel() == work_blk.numel() &&
                  (work_req.numel() <= 1 || (work_req.stride(0) == 1 && work_blk.stride(0) == 1)),
              "work_req and work_blk must be contiguous [W] of one length");
  const auto kt = k_cache.scalar_type(), st = summary_cache.scalar_type();
  MOBA_CHECK(kt == at::kBFloat16 || kt == at::kHalf || kt == at::kFloat,
              "k_cache dtype must be bfloat16, float16 or float32, got ", kt);
  MOBA_CHECK(st == at::kBFloat16 || st == at::kHalf || st == at::kFloat,
              "summary_cache dtype must be bfloat16, float16 or float32, got ", st);
  const int64_t P = k_cache.size(1), HK = k_cache.size(2), D = k_cache.size(3);
  MOBA_CHECK(is_pow2(block_size) && block_size >= 16, "block_size must be a power of two >= 16, got ", block_size);
  const int64_t vec = 16 / k_cache.element_size();
  MOBA_CHECK(D % vec == 0 && D / vec <= 256 && 256 % (D / vec) == 0,
              "head dim must be a power of two from ", vec, " to ", 256 * vec, ", got ", D);
  check_vec16(k_cache, "k_cache");
  MOBA_CHECK(gate >= 0 && gate <= 3, "gate must be 0 (mean), 1 (max), 2 (minmax) or 3 (learned), got ", gate);
  const int64_t slots = P > block_size ? P / block_size : 1;
  MOBA_CHECK(summary_cache.size(0) == k_cache.size(0) && summary_cache.size(1) == slots &&
                  summary_cache.size(2) == (gate == 2 ? 2 : 1) && summary_cache.size(3) == HK &&
                  summary_cache.size(4) == D,
              "summary_cache must be [", k_cache.size(0), ", ", slots, ", ", gate == 2 ? 2 : 1, ", ", HK, ", ", D,
              "], got ", summary_cache.sizes());
  const float* w = nullptr;
  if (gate == 3) {
    MOBA_CHECK(weight.has_value(), "gate learned needs weight [HK, B, D]");
    const auto& wt = *weight;
    MOBA_CHECK_SAME_DEVICE(wt, k_cache);
    MOBA_CHECK_DTYPE(wt, at::kFloat);
    MOBA_CHECK(wt.is_contiguous() && wt.dim() == 3 && wt.size(0) == HK && wt.size(1) == block_size &&
                    wt.size(2) == D,
                "weight must be contiguous [", HK, ", ", block_size, ", ", D, "], got ", wt.sizes());
    w = wt.data_ptr<float>();
  }
  if (work_req.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  PoolParams p{};
  p.k = k_cache.data_ptr();
  p.summary = summary_cache.data_ptr();
  p.weight = w;
  p.block_table = block_table.data_ptr<int>();
  p.work_req = work_req.data_ptr<int>();
  p.work_blk = work_blk.data_ptr<int>();
  p.stride_kp = k_cache.stride(0);
  p.stride_ks = k_cache.stride(1);
  p.stride_kh = k_cache.stride(2);
  p.stride_sp = summary_cache.stride(0);
  p.stride_sslot = summary_cache.stride(1);
  p.stride_ss = summary_cache.stride(2);
  p.stride_sh = summary_cache.stride(3);
  p.stride_bt = block_table.stride(0);
  p.num_work = static_cast<int>(work_req.numel());
  p.num_kv_heads = static_cast<int>(HK);
  p.head_dim = static_cast<int>(D);
  p.block_size = static_cast<int>(block_size);
  p.page_size = static_cast<int>(P);
  p.gate = static_cast<int>(gate);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (kt) {
    case at::kBFloat16: pool_dispatch_summary<__nv_bfloat16>(p, st, stream); break;
    case at::kHalf: pool_dispatch_summary<__half>(p, st, stream); break;
    default: pool_dispatch_summary<float>(p, st, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// A catch-all kernel: tensors on the wrong device reach the checks above and get their message.
TORCH_LIBRARY_FRAGMENT(moba_cuda, m) {
  m.def("pool(Tensor k_cache, Tensor(a!) summary_cache, Tensor? weight, Tensor block_table, "
        "Tensor work_req, Tensor work_blk, int block_size, int gate) -> ()",
        TORCH_FN(pool));
}

}  // namespace moba
