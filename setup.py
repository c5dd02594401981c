"""Build of the optional CUDA extension (csrc/); everything else is in pyproject.toml.

The extension is compiled only where torch is a CUDA build and nvcc is found (build with
`pip install --no-build-isolation .` so that the installed torch is seen); elsewhere the package
installs without it and runs the Triton kernels. Targets: TORCH_CUDA_ARCH_LIST, default
"8.0;9.0a" (Ampere, Hopper with its own instructions). MOBA_NO_CUDA_BUILD=1 skips the build.
"""

import os

from setuptools import setup

SOURCES = ["csrc/pooling.cpp", "csrc/attention.cpp", "csrc/kernels_pool.cu", "csrc/kernels_decode.cu",
           "csrc/kernels_prefill_bf16.cu", "csrc/kernels_prefill_fp16.cu"]


def cuda_extensions():
    if os.environ.get("MOBA_NO_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    here = os.path.dirname(os.path.abspath(__file__))
    ext = CUDAExtension(
        "moba_backend._moba_cuda", SOURCES, include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__",
                                     "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
