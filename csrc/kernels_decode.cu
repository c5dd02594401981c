// Instantiations of the decode kernels (torch-free): dtype x head dim.
#include "decode.cuh"

namespace moba {
#define MOBA_DECODE(T) \
  template void launch_decode<T, 64>(const AttnParams&, cudaStream_t); \
  template void launch_decode<T, 128>(const AttnParams&, cudaStream_t); \
  template void launch_decode<T, 256>(const AttnParams&, cudaStream_t);
MOBA_DECODE(__nv_bfloat16)
MOBA_DECODE(__half)
}  // namespace moba
