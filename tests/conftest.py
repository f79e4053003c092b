"""Shared pytest setup: CPU only, no network, quiet logs."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs tools in subprocesses (seconds to minutes)")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny LLaMA-style sentencepiece tokenizer.model (384 ids), one per test module."""
    from owl_jax.testing.spm import train_tiny_tokenizer
    d = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(str(d), vocab_size=384)
    return str(d)


@pytest.fixture
def broken_compiler(monkeypatch, tmp_path):
    """An x86-64 CPU with AVX2 and AVX-512 whose C++ compiler always fails, and an empty
    `owl_jax.native` cache (tmp_path): for the build-failure fallbacks of the C++ kernels."""
    import platform

    from owl_jax import native
    monkeypatch.setenv("OWL_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setattr(native, "cpu_flags", lambda: "flags : avx2 avx512f")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    return tmp_path
