// Instantiations of the prefill kernel for bf16 (torch-free), one file a dtype so they build in parallel.
#include "prefill.cuh"

namespace moba {
template bool launch_prefill<__nv_bfloat16, 64>(const AttnParams&, cudaStream_t);
template bool launch_prefill<__nv_bfloat16, 128>(const AttnParams&, cudaStream_t);
template bool launch_prefill<__nv_bfloat16, 256>(const AttnParams&, cudaStream_t);

bool hopper_prefill_ready(cudaStream_t stream) {
  return sm90_prefill_enabled() && device_major() == 9 && sm90_kernels_built(stream);
}
}  // namespace moba
