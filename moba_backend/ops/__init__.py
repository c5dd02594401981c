"""MoBA ops. Each op folder holds `naive.py` (the torch reference written from SPEC.md, also the
CPU path) and `triton_impl.py` (the GPU kernel, also run on CPU under TRITON_INTERPRET=1)."""
