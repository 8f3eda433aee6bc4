"""Soft-prompt injection through the embedding layer, on every architecture we claim."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_softprompt import models

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "starcoder2"]


def _case(tiny_model, arch, tie, q_bits):
    model, tok, config = models.load(tiny_model(arch, tie=tie, q_bits=q_bits))
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a poem about the sea."}],
                                  add_generation_prompt=True)
    return model, config, ids


@pytest.mark.parametrize("q_bits", [None, 4])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_of_token_rows_equals_plain_tokens(tiny_model, arch, tie, q_bits):
    """With P = embedding rows of t_1..t_n, logits of [P; x] == logits of [t_1..t_n, x]."""
    model, config, ids = _case(tiny_model, arch, tie, q_bits)
    t = [17, 5, 200, 42, 9]
    P = models.embed_rows(model, t)
    with_p = models.forward(model, ids, P)
    plain = models.forward(model, t + list(ids))
    tol = 1e-4 if q_bits is None else 1e-3
    np.testing.assert_allclose(np.array(with_p), np.array(plain), atol=tol, rtol=tol)
    # and the embedding is the model's own class again outside the context
    assert type(models.find_embedding(model)).__name__.startswith("SoftPrompt")
    models.detach(model)
    assert not type(models.find_embedding(model)).__name__.startswith("SoftPrompt")
    np.testing.assert_allclose(np.array(models.forward(model, t + list(ids))), np.array(plain), atol=tol)


@pytest.mark.parametrize("q_bits", [None, 4])
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_gradients_reach_only_the_prompt(tiny_model, arch, q_bits):
    model, config, ids = _case(tiny_model, arch, None, q_bits)
    model.freeze()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    P = models.embed_rows(model, [3, 4, 5, 6]) + 0.01
    target = mx.array(ids[1:] + [1])

    def loss(P):
        logits = models.forward(model, ids, P)[0, P.shape[0]:]
        return nn.losses.cross_entropy(logits, target).mean()

    value, g = mx.value_and_grad(loss)(P)
    assert g.shape == P.shape
    assert float(mx.abs(g).sum()) > 0
    # the frozen model has no trainable parameters and was not changed
    assert tree_flatten(model.trainable_parameters()) == []
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), before[k])
    # and a step along -g lowers the loss: the gradient is right, not just non-zero
    assert float(loss(P - 0.5 * g / (mx.linalg.norm(g) + 1e-9))) < float(value)


def test_prefix_cache_matches_full_sequence(tiny_model):
    model, config, ids = _case(tiny_model, "llama", None, None)
    P = mx.random.normal((6, models.hidden_size(model))) * 0.1
    full = models.forward(model, ids, P)[0, -1]
    cache = models.prefix_cache(model, P)
    assert cache[0].offset == 6
    cached = model(mx.array([ids]), cache=cache)[0, -1]
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=1e-4)


def test_fingerprint_survives_quantization_and_separates_models(tiny_model):
    m32, _, c32 = models.load(tiny_model("llama"))
    m4, _, c4 = models.load(tiny_model("llama", q_bits=4))
    other, _, co = models.load(tiny_model("llama", seed=1))
    f32, f4, fo = models.fingerprint(m32, c32), models.fingerprint(m4, c4), models.fingerprint(other, co)
    assert models.fingerprints_match(f32, f4)
    assert not models.fingerprints_match(f32, fo)
