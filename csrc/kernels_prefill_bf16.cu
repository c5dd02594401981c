// Instantiations of the prefill kernel for bf16 (torch-free), one file a dtype so they build in parallel.
#include "prefill.cuh"

namespace moba {
template void launch_prefill<__nv_bfloat16, 64>(const AttnParams&, cudaStream_t);
template void launch_prefill<__nv_bfloat16, 128>(const AttnParams&, cudaStream_t);
template void launch_prefill<__nv_bfloat16, 256>(const AttnParams&, cudaStream_t);
}  // namespace moba
