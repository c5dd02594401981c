// Instantiations of the pooling kernel (torch-free): K cache dtype x summary dtype.
#include "pooling.cuh"

namespace moba {
#define MOBA_POOL(T, TS) template void launch_pool<T, TS>(const PoolParams&, cudaStream_t);
#define MOBA_POOL_ALL(T) MOBA_POOL(T, __nv_bfloat16) MOBA_POOL(T, __half) MOBA_POOL(T, float)
MOBA_POOL_ALL(__nv_bfloat16)
MOBA_POOL_ALL(__half)
MOBA_POOL_ALL(float)
}  // namespace moba
