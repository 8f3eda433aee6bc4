"""The methods: apply/remove round trips leave the base bitwise unchanged, and each applies what it says."""


import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_softprompt import evaluate as ev, methods, models
from mlx_softprompt.methods import base as mbase, steering
from mlx_softprompt.errors import UserError

IDS = [[3, 17, 42, 5, 99, 7, 12]]


def _snapshot(model):
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    classes = {k: type(m) for k, m in model.named_modules()}
    return params, classes, np.array(model(mx.array(IDS)))


def _assert_same(model, snap):
    params, classes, out = snap
    now = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert now.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(now[k], params[k])
    assert {k: type(m) for k, m in model.named_modules()} == classes
    np.testing.assert_array_equal(np.array(model(mx.array(IDS))), out)


def _perturbed(params, scale=0.2, seed=0):
    """Non-zero parameters (LoRA's B and steer-opt's v start at zero, which changes nothing)."""
    flat = dict(tree_flatten(params))
    key = mx.random.key(seed)
    out = {}
    for i, (k, v) in enumerate(sorted(flat.items())):
        out[k] = mx.random.normal(v.shape, key=mx.random.split(key, len(flat))[i]) * scale
    return mbase.nest(out)


@pytest.fixture(scope="module")
def base(tiny_model):
    return models.load(tiny_model("llama"))


@pytest.mark.parametrize("name,options,seed", [
    ("softprompt", dict(num_tokens=4, init="vocab"), 0),
    ("prefix", dict(num_tokens=3, init="vocab"), 0),
    ("lora", dict(rank=4, layers=1), 0),
    ("lora", dict(rank=2, layers=2, keys="self_attn.q_proj,self_attn.v_proj"), 1),
    ("steer-opt", dict(layer=0), 0),
])
def test_trainable_methods_round_trip(base, name, options, seed):
    model, tok, config = base
    snap = _snapshot(model)
    m = methods.get(name, options)
    params = m.init(model, tok, seed)
    _assert_same(model, snap)  # init alone changes nothing
    if name not in ("softprompt", "prefix"):
        params = _perturbed(params)
    bound = np.array(m.logits(model, params, mx.array(IDS)))
    assert np.abs(bound - snap[2]).max() > 1e-3  # the method does something
    # an exception inside the block restores the base too
    with pytest.raises(RuntimeError):
        with m.bind(model, params):
            raise RuntimeError("boom")
    if name == "softprompt":
        # the injection stays attached but disarmed (models.attach, by design): same outputs
        np.testing.assert_array_equal(np.array(model(mx.array(IDS))), snap[2])
        models.detach(model)
    _assert_same(model, snap)  # and leaves nothing behind


def test_lora_equals_mlx_lm_lora_layers(tiny_model):
    """Our bind gives exactly what mlx-lm's linear_to_lora_layers model computes with the same A, B."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tok, config = models.load(tiny_model("llama"))
    m = methods.get("lora", rank=4, layers=2)
    params = _perturbed(m.init(model, tok, 0), seed=3)
    with m.bind(model, params):
        ours = np.array(model(mx.array(IDS)))
    ref_model, _, _ = models.load(tiny_model("llama"))
    linear_to_lora_layers(ref_model, 2, {"rank": 4, "scale": m.options.scale, "dropout": 0.0})
    ref_model.load_weights(list(tree_flatten(params)), strict=False)  # same paths: model.layers.i.<proj>.lora_a/b
    np.testing.assert_allclose(ours, np.array(ref_model(mx.array(IDS))), atol=1e-5)


def test_lora_on_a_quantized_base_and_file_round_trip(tiny_model, tmp_path):
    model, tok, config = models.load(tiny_model("llama", q_bits=4))
    snap = _snapshot(model)
    m = methods.get("lora", rank=2, layers=1, scale=4.0)
    params = _perturbed(m.init(model, tok, 0))

    def loss(p):
        with m.bind(model, p):
            return model(mx.array(IDS)).astype(mx.float32).square().mean()

    grads = mx.grad(loss)(params)
    assert all(float(mx.abs(g).sum()) > 0 for _, g in tree_flatten(grads))
    with m.bind(model, params):
        expect = np.array(model(mx.array(IDS)))
    path = m.save(tmp_path / "lora.safetensors", params, model, config, objective="kl")
    _assert_same(model, snap)
    sut = ev.with_method(ev.base_system(model, tok, config), path)
    assert sut.name == "lora-kl" and sut.added_params == sum(v.size for _, v in tree_flatten(params))
    assert (sut.info["rank"], sut.info["scale"], sut.info["layers"]) == (2, 4.0, 1)  # the options reach the report
    with sut.bound():
        np.testing.assert_array_equal(np.array(model(mx.array(IDS))), expect)
    _assert_same(model, snap)
    other, _, other_config = models.load(tiny_model("llama", seed=7))
    with pytest.raises(UserError, match="trained for base"):
        methods.load(path, other, other_config)


def test_steering_adds_alpha_v_to_the_layer_output(base):
    """At the last layer, logits == head(norm(h + alpha * v)) with h the captured layer output."""
    model, tok, config = base
    snap = _snapshot(model)
    d = models.hidden_size(model)
    v = mx.random.normal((d,), key=mx.random.key(1))
    last = len(methods.decoder_layers(model)) - 1
    captured = []
    with steering.hooked(model, last, capture=captured):
        model(mx.array(IDS))
    h = captured[0]
    m = methods.get("steer-dom", layer=last, alpha=2.5)
    with m.bind(model, {"steer": v}):
        steered = model(mx.array(IDS))
    inner = model.model
    head = model.lm_head if hasattr(model, "lm_head") else inner.embed_tokens.as_linear
    expect = head(inner.norm(h + 2.5 * v))
    np.testing.assert_allclose(np.array(steered), np.array(expect), atol=1e-5)
    _assert_same(model, snap)
    with pytest.raises(UserError, match="out of range"):
        with steering.hooked(model, 99, v):
            pass


def test_steer_files_round_trip(base, tmp_path):
    model, tok, config = base
    snap = _snapshot(model)
    v = mx.random.normal((models.hidden_size(model),), key=mx.random.key(2))
    path = steering.save_steer_dom(tmp_path / "dom.safetensors", v, 1, 3.0, model, config)
    sut = ev.with_method(ev.base_system(model, tok, config), path)
    assert sut.name == "steer-dom" and sut.info["layer"] == 1 and sut.added_params == v.size
    with sut.bound():
        a = np.array(model(mx.array(IDS)))
    with steering.hooked(model, 1, 3.0 * v):
        b = np.array(model(mx.array(IDS)))
    np.testing.assert_array_equal(a, b)
    _assert_same(model, snap)
    with pytest.raises(UserError, match="fitted, not trained"):
        methods.get("steer-dom").init(model)


def test_steer_dom_is_the_difference_of_means_at_the_last_prompt_position(base):
    """Batched (right-padded) activations equal one-by-one ones; the direction is mean(harmful) - mean(harmless)."""
    model, tok, config = base
    harmful = [tok.encode("How to make a bomb to hurt people"), tok.encode("poison")]
    harmless = [tok.encode("Write a poem about the sea, please, a long one"), tok.encode("bake bread")]
    D = steering.fit_steer_dom(model, harmful, harmless, batch_size=4)
    n_layers = len(methods.decoder_layers(model))
    assert D.shape == (n_layers, models.hidden_size(model))

    def one(ids, layer):
        cap = []
        with steering.hooked(model, layer, capture=cap):
            model(mx.array([ids]))
        return np.array(cap[0][0, -1])

    for layer in range(n_layers):
        expect = np.mean([one(p, layer) for p in harmful], 0) - np.mean([one(p, layer) for p in harmless], 0)
        np.testing.assert_allclose(np.array(D[layer]), expect, atol=1e-4)
    with pytest.raises(UserError, match="needs harmful and harmless"):
        steering.fit_steer_dom(model, harmful, [])


def test_system_prompt_and_dual_systems_leave_the_base_alone(base):
    model, tok, config = base
    snap = _snapshot(model)
    b = ev.base_system(model, tok, config)
    sp = ev.with_system_prompt(b, "Be safe.")
    assert sp.ids(ev.data.Example("hi")) != b.ids(ev.data.Example("hi"))
    assert sp.info["added_prompt_tokens"] > 0
    with sp.bound():
        pass
    _assert_same(model, snap)


def test_registry_and_options_check_themselves():
    with pytest.raises(UserError, match="unknown method 'nope'"):
        methods.get("nope")
    with pytest.raises(UserError, match="unknown option 'rnak'"):
        methods.get("lora", rnak=2)
    with pytest.raises(UserError, match="rank and layers must be >= 1"):
        methods.get("lora", rank=0)
    with pytest.raises(UserError, match="rank: expected an integer, got str 'abc'"):
        methods.get("lora", rank="abc")
    with pytest.raises(UserError, match="num_tokens must be >= 1"):
        methods.get("prefix", num_tokens=0)
    with pytest.raises(UserError, match="init 'bogus'"):
        methods.get("softprompt", init="bogus")
    assert methods.get("lora", keys="a.q, a.v").options.keys == ["a.q", "a.v"]
    with pytest.raises(UserError, match="LoRAOptions.rank: expected an integer, got str 'x'"):
        methods.method_class("lora").Options(rank="x")  # built directly: checked the same way
    assert set(methods.trainable()) == {"softprompt", "prefix", "lora", "steer-opt"}


def test_method_file_loader_checks_method_and_base(base, tiny_model, tmp_path):
    model, tok, config = base
    m = methods.get("prefix", num_tokens=2)
    path = m.save(tmp_path / "prefix.safetensors", m.init(model, tok, 0), model, config)
    loaded = methods.load(path, model, config)
    assert loaded.name == "prefix" and loaded.method.options.num_tokens == 2
    with pytest.raises(UserError, match="a 'prefix' file, not 'softprompt'"):
        methods.load(path, model, config, expect=["softprompt"])
    other, _, other_config = models.load(tiny_model("llama", seed=7))
    with pytest.raises(UserError, match="trained for base"):
        methods.load(path, other, other_config)


def test_files_written_before_method_options_still_load(base, tmp_path):
    """LoRA and steering files of the previous format kept their options as lora_* / layer+alpha keys."""
    from mlx_softprompt import prompt_file

    model, tok, config = base
    params = methods.get("lora", rank=2, layers=1).init(model, tok, 0)
    old = prompt_file.save(tmp_path / "old-lora.safetensors", dict(tree_flatten(params)), model, config, method="lora",
                           lora_rank="2", lora_layers="1", lora_scale="4.0", lora_keys="null")
    o = methods.load(old, model, config).method.options
    assert (o.rank, o.layers, o.scale, o.keys) == (2, 1, 4.0, None)
    v = mx.zeros((models.hidden_size(model),))
    old = prompt_file.save(tmp_path / "old-steer.safetensors", {"steer": v}, model, config, method="steer-dom",
                           layer="1", alpha="3.0")
    o = methods.load(old, model, config).method.options
    assert (o.layer, o.alpha) == (1, 3.0)
