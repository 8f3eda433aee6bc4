"""Prefix tuning against PEFT's PREFIX_TUNING: the same key/value prefix gives the same logits,
and prefix tuning is trainable, evaluable, chattable, servable and bundlable like any method."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from converters.hf_to_mlx import convert
from mlx_softprompt import methods, models

ATOL = 1e-4  # max |logit difference|, MLX vs transformers+PEFT


def _peft_weight(params, n_layers):
    """Our per-layer [kv heads, n, head dim] keys/values as PEFT's embedding [n, layers * 2 * kv heads * head dim]."""
    rows = []
    for layer in range(n_layers):
        for kind in ("keys", "values"):
            a = np.array(params["prefix"][str(layer)][kind])  # [H, n, hd]
            rows.append(a.transpose(1, 0, 2))  # [n, H, hd]
    return np.stack(rows, axis=1).reshape(rows[0].shape[0], -1)  # [n, 2L, H, hd] -> [n, 2L*H*hd]


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("qwen2", {})])
def test_prefix_tuning_gives_peft_prefix_tuning_logits(hf_tiny_model, tmp_path, arch, kw):
    from hf_tiny import load_hf
    from peft import PrefixTuningConfig, get_peft_model

    hf_dir = hf_tiny_model(arch, **kw)
    model, tok, config = models.load(str(convert(hf_dir, tmp_path / "mlx")))
    m = methods.get("prefix", num_tokens=5, init="random")
    params = m.init(model, tok, 3)
    n_layers = len(params["prefix"])

    hf, _ = load_hf(hf_dir)
    peft_model = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    emb = peft_model.prompt_encoder["default"].embedding
    theirs_w = _peft_weight(params, n_layers)
    assert tuple(emb.weight.shape) == theirs_w.shape
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(theirs_w))
    ids = tok.encode("Write a poem about the sea.")
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    ours = np.array(m.logits(model, params, mx.array([ids]))[0])
    assert np.abs(ours - theirs).max() < ATOL
    # served: the prefix is the cache every request starts from
    cache = m.prefix_cache(model, params)
    assert {c.offset for c in cache} == {5}
    np.testing.assert_allclose(np.array(model(mx.array([ids]), cache=cache)[0]), ours, atol=1e-5)


def test_prefix_tuning_trains_and_leaves_the_base_alone(tiny_teacher, tmp_path):
    """train --method prefix: the held-out objective drops, the base's weights do not move."""
    from mlx.utils import tree_flatten

    from mlx_softprompt import train

    base, cache = tiny_teacher
    data = train.open_teacher(cache)
    bundle = models.load(base)
    before = {k: np.array(v) for k, v in tree_flatten(bundle[0].parameters())}
    args = train.make_args(None, base=base, teacher=cache, out=str(tmp_path / "prefix.safetensors"), method="prefix",
                           objective="kl", num_tokens=4, iters=20, batch_size=8, learning_rate=1e-2, warmup=2,
                           val_split=0.25, val_every=20, save_every=20, steps_per_report=10)
    train.train(args, data, model_bundle=bundle, log=lambda *a, **k: None)
    after = {k: np.array(v) for k, v in tree_flatten(bundle[0].parameters())}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    m = train.make_method(args)
    p0 = m.init(bundle[0], bundle[1], args.seed)
    p1 = methods.load(args.out, bundle[0], bundle[2]).params
    rows = train.build_rows(data, "kl", topk=True)
    val = [r for r in rows if train.is_val(r.prompt_index, args.seed, args.val_split)]
    loss = train.make_loss(bundle[0], m, "kl", "cache")
    k = int(train.manifest_value(data.manifest, "k") or 16)
    v0, v1 = (train.evaluate_rows(loss, p, val, args, k) for p in (p0, p1))
    assert v1 < v0 - 0.005 * abs(v0), (v0, v1)
