"""moba-serve's argument handling without an engine: the CPU dtype default and its flags."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from moba_backend.integrations.vllm import serve  # noqa: E402

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("info, fast", [
    pytest.param(X86_AVX2, False, id="x86_avx2"),
    pytest.param(X86_BF16, True, id="x86_avx512_bf16"),
    pytest.param("flags : fpu amx_bf16 amx_tile\n", True, id="x86_amx"),
    pytest.param(ARM_BF16, True, id="arm_bf16"),
    pytest.param("", True, id="unreadable_flags_keep_vllm_choice"),
])
def test_cpu_has_fast_bf16(info, fast):
    assert serve.cpu_has_fast_bf16(info) is fast


@pytest.fixture
def restore_env():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("argv, fast_bf16, dtype", [
    pytest.param([], False, "float32", id="no_bf16_cpu_float32"),
    pytest.param([], True, "auto", id="bf16_cpu_vllm_auto"),
    pytest.param(["--dtype", "bfloat16"], False, "bfloat16", id="flag_wins"),
    pytest.param(["--dtype=auto"], False, "auto", id="explicit_auto_wins"),
])
def test_cpu_dtype_default(argv, fast_bf16, dtype, monkeypatch, tmp_path, restore_env):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the dtype default applies on CPU")
    monkeypatch.setattr(serve, "cpu_has_fast_bf16", lambda: fast_bf16)
    args = serve.prepare([str(tmp_path)] + argv)
    assert args.dtype == dtype
