// Instantiations of the prefill kernel for fp16 (torch-free), one file a dtype so they build in parallel.
#include "prefill.cuh"

namespace moba {
template bool launch_prefill<__half, 64>(const AttnParams&, cudaStream_t);
template bool launch_prefill<__half, 128>(const AttnParams&, cudaStream_t);
template bool launch_prefill<__half, 256>(const AttnParams&, cudaStream_t);
}  // namespace moba
