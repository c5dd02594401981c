"""How the CUDA extension is found (CPU-only checks of the loading logic; the kernels themselves
are tested on the GPU in tests/ops/test_cuda_ops.py)."""

import pytest
import torch

from moba_backend.attention import AUTO_HEAD_DIMS, auto_cuda_ops
from moba_backend.ops import cuda_ext


@pytest.fixture
def fresh_loader(monkeypatch):
    """A process that has a CUDA torch and device (pretended) and has not loaded the extension."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    cuda_ext._load.cache_clear()
    cuda_ext._load_installed_only.cache_clear()
    yield
    cuda_ext._load.cache_clear()
    cuda_ext._load_installed_only.cache_clear()


def test_auto_never_compiles(fresh_loader, monkeypatch):
    """`auto` takes an installed build or one already loaded; it never starts nvcc."""
    def no_build():
        raise AssertionError("auto must not compile the extension")

    monkeypatch.setattr(cuda_ext, "_load_installed", lambda: False)
    monkeypatch.setattr(cuda_ext, "_build", no_build)
    assert not cuda_ext.available_without_build()


def test_installed_build_is_used_without_compiling(fresh_loader, monkeypatch):
    monkeypatch.setattr(cuda_ext, "_load_installed", lambda: True)
    monkeypatch.setattr(cuda_ext, "_build", lambda: (_ for _ in ()).throw(AssertionError("no build")))
    assert cuda_ext.available_without_build()
    assert cuda_ext.available()  # and `cuda` takes the same build


def test_cuda_impl_builds_when_nothing_is_installed(fresh_loader, monkeypatch):
    built = []
    monkeypatch.setattr(cuda_ext, "_load_installed", lambda: False)
    monkeypatch.setattr(cuda_ext, "_build", lambda: built.append(1))
    assert not cuda_ext.available_without_build()
    assert cuda_ext.available() and built == [1]
    assert cuda_ext.available_without_build()  # loaded now: `auto` may use it


def test_a_build_that_fails_to_load_falls_back_with_the_reason(fresh_loader, monkeypatch, caplog):
    def broken():
        raise OSError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(cuda_ext, "_load_installed", broken)
    assert not cuda_ext.available_without_build()
    assert "undefined symbol" in caplog.text and "using the Triton kernels" in caplog.text


def test_auto_leaves_cpu_tensors_and_other_head_dims_alone():
    q = torch.empty(3, 8, 128, dtype=torch.bfloat16)
    kc = torch.empty(4, 16, 2, 128, dtype=torch.bfloat16)
    assert auto_cuda_ops(q, kc, kc) == frozenset()
    assert AUTO_HEAD_DIMS == (64, 128)
