"""Shared fixtures: tiny random checkpoints of real architectures, built once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch="llama", tie=None, q_bits=None, **kw) -> path of a loadable model dir."""
    from mlx_softprompt.tiny import make_tiny_checkpoint

    made = {}

    def make(arch="llama", tie=None, q_bits=None, **kw):
        key = (arch, tie, q_bits, tuple(sorted(kw.items())))
        if key not in made:
            name = f"{arch}-{tie}-{q_bits}-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
            made[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), arch=arch, tie=tie, q_bits=q_bits, **kw)
        return str(made[key])

    return make
