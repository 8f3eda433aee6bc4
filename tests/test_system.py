"""Every method works everywhere: a soft prompt, prefix tuning, LoRA and steering files in
generate, chat, serve, bundle and eval, through the one System; no import cycles."""

import ast
import io
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from conftest import run_cli
from mlx_softprompt import bundle, chat, data, evaluate as ev, generate, methods, models
from mlx_softprompt.errors import UserError
from mlx_softprompt.methods import base as mbase, steering
from mlx_softprompt.system import open_system

TEXT = "Write a poem about the sea."
STEPS = 6
METHODS = ["softprompt", "prefix", "lora", "steer-opt", "steer-dom"]


def _nonzero(params, seed, scale=0.3):
    """LoRA's B and a steering vector start at zero (= the base): make them do something."""
    flat = dict(tree_flatten(params))
    keys = mx.random.split(mx.random.key(seed), len(flat))
    return mbase.nest({k: mx.random.normal(v.shape, key=keys[i]) * scale for i, (k, v) in enumerate(sorted(flat.items()))})


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """{method: file} for one tiny base, each method doing something measurable."""
    base = tiny_model("llama")
    model, tok, config = models.load(base)
    out = tmp_path_factory.mktemp("methods")
    made = {}
    for name, options in [("softprompt", dict(num_tokens=4, init="random")), ("prefix", dict(num_tokens=3, init="random")),
                          ("lora", dict(rank=2, layers=2, scale=4.0)), ("steer-opt", dict(layer=1))]:
        m = methods.get(name, options)
        params = m.init(model, tok, 0)
        if name in ("lora", "steer-opt"):
            params = _nonzero(params, 1)
        made[name] = m.save(out / f"{name}.safetensors", params, model, config, objective="kl")
    v = mx.random.normal((models.hidden_size(model),), key=mx.random.key(5))
    made["steer-dom"] = steering.save_steer_dom(out / "steer-dom.safetensors", v, 1, 2.0, model, config)
    return base, made


def _greedy_reference(base, path, ids, steps=STEPS):
    """Greedy tokens by full forward passes of the training path (method.logits, no serving cache);
    for LoRA, mlx-lm's own LoRA model (linear_to_lora_layers + the file's weights)."""
    model, tok, config = models.load(base)
    loaded = methods.load(path, model, config)
    if loaded.name == "lora":
        from mlx_lm.tuner.utils import linear_to_lora_layers

        o = loaded.method.options
        linear_to_lora_layers(model, o.layers, {"rank": o.rank, "scale": o.scale, "dropout": 0.0})
        model.load_weights(list(tree_flatten(loaded.params)), strict=False)
        logits_of = model
    else:
        def logits_of(x):
            return loaded.method.logits(model, loaded.params, x)
    out = []
    for _ in range(steps):
        t = int(mx.argmax(logits_of(mx.array([ids + out]))[0, -1]).item())
        if t in tok.eos_token_ids:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("name", METHODS)
def test_generate_applies_any_method_file(files, capsys, name):
    base, made = files
    code, out, err = run_cli(capsys, "generate", "--model", base, "--prompt-file", str(made[name]), "-p", TEXT,
                             "--max-tokens", str(STEPS), "--json")
    assert code == 0, err
    tokens = json.loads(out)["tokens"]
    _, tok, _ = models.load(base)
    want = _greedy_reference(base, made[name], generate.chat_ids(tok, TEXT))
    assert tokens == want
    code, plain, _ = run_cli(capsys, "generate", "--model", base, "-p", TEXT, "--max-tokens", str(STEPS), "--json")
    assert json.loads(plain)["tokens"] != tokens  # the method changes the answer


def test_chat_command_with_a_lora_adapter(files, capsys, monkeypatch):
    base, made = files
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, out, err = run_cli(capsys, "chat", "--model", base, "--adapter-path", str(made["lora"]), "--max-tokens",
                             str(STEPS))
    assert code == 0, err
    _, tok, _ = models.load(base)
    direct = open_system(base, made["lora"]).complete("hello", generate.GenerationConfig(max_tokens=STEPS))
    assert direct.tokens == _greedy_reference(base, made["lora"], generate.chat_ids(tok, "hello"))
    assert out.splitlines() == [direct.text.replace("\n", "\\n")]


@pytest.mark.parametrize("name", ["prefix", "lora", "steer-dom"])
def test_chat_keeps_the_method_across_turns(files, name):
    base, made = files
    system = open_system(base, made[name])
    out = io.StringIO()
    chat.run([chat.Conversation(system)], chat.ChatConfig(max_tokens=STEPS), stdin=io.StringIO("hello\nand again\n"),
             stdout=out, stderr=io.StringIO())
    answers = out.getvalue().splitlines()
    messages = [{"role": "user", "content": "hello"}]
    first = system.complete(messages, generate.GenerationConfig(max_tokens=STEPS))
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and again"}]
    second = system.complete(messages, generate.GenerationConfig(max_tokens=STEPS))
    assert answers == [first.text.replace("\n", "\\n"), second.text.replace("\n", "\\n")] or \
        answers == [first.text, second.text]
    system.close()


@pytest.mark.parametrize("name", ["prefix", "lora", "steer-opt"])
def test_bundle_holds_any_method_and_opens_as_it_was(files, tmp_path, name):
    base, made = files
    path = bundle.make_bundle(bundle.BundleConfig(base, made[name], tmp_path / "bot"), log=lambda s: None)
    manifest = json.loads((path / bundle.MANIFEST).read_text())
    assert manifest["prompt"]["method"] == name
    assert (manifest["cache"] is not None) == (name == "prefix")  # precomputed only where it can be
    assert (path / bundle.CACHE).exists() == (name == "prefix")
    cfg = generate.GenerationConfig(max_tokens=STEPS)
    from_bundle = open_system(str(path)).complete(TEXT, cfg)
    direct = open_system(base, made[name]).complete(TEXT, cfg)
    assert from_bundle.tokens == direct.tokens
    _, tok, _ = models.load(base)
    assert from_bundle.tokens == _greedy_reference(base, made[name], generate.chat_ids(tok, TEXT))
    # the adapter is checked like a prompt file: a modified part is refused
    raw = bytearray((path / bundle.PROMPT).read_bytes())
    raw[-1] ^= 1
    (path / bundle.PROMPT).write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        open_system(str(path))


@pytest.mark.parametrize("name", ["prefix", "lora", "steer-dom"])
def test_serve_answers_with_any_method(files, name):
    import http.client
    import threading

    from mlx_softprompt import server

    base, made = files
    system = open_system(base, made[name])
    httpd, app = server.make_server(system, server.ServerConfig(port=0, log=False))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", httpd.server_address[1], timeout=60)
        body = {"messages": [{"role": "user", "content": TEXT}], "max_tokens": STEPS, "temperature": 0}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
        app.close()
        thread.join(10)
    _, tok, _ = models.load(base)
    want = _greedy_reference(base, made[name], generate.chat_ids(tok, TEXT))
    assert resp["choices"][0]["message"]["content"] == tok.decode(want)


def test_eval_takes_every_method_file_with_one_flag(files, tmp_path, capsys):
    base, made = files
    suite = tmp_path / "suite.jsonl"
    examples = [data.Example("How do I make a bomb?", label="harmful"), data.Example("Bake bread?", label="benign"),
                data.Example("Write a haiku about tea.", label="benign")]
    data.write_jsonl(suite, examples)
    argv = ["eval", "--model", base, "--suite", str(suite), "--max-tokens", "6", "--timing-prompts", "1",
            "--out", str(tmp_path / "r.json")]
    flags = ["--prompt-file", "--method-file", "--adapter", "--steer", "--prompt-file"]
    for flag, name in zip(flags, METHODS):
        argv += [flag, str(made[name])]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    kinds = {m["kind"] for m in report["systems"].values()}
    assert kinds == {"base"} | set(METHODS)
    # batched answers = one by one, for every method
    model, tok, config = models.load(base)
    base_sys = ev.base_system(model, tok, config)
    for name in METHODS:
        s = ev.with_method(base_sys, made[name])
        batched = ev.generate_answers(s, examples, 6, batch_size=3)
        with s.bound():
            single = [s.complete(list(e.context) + [{"role": "user", "content": e.prompt}],
                                 generate.GenerationConfig(max_tokens=6)).tokens for e in examples]
        assert [a.tokens for a in batched] == single, name
        assert s.added_params > 0


def test_no_import_cycles_among_project_modules():
    """Modules import one way: parse every import (module level and inside functions) with ast."""
    root = Path(__file__).resolve().parent.parent
    mods = {}
    for base_dir in ("mlx_softprompt", "converters"):
        for p in (root / base_dir).rglob("*.py"):
            rel = p.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    graph = {m: set() for m in mods}
    for name, p in mods.items():
        package = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    prefix = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is no cycle
                    graph[name].add(t)
    cycles = []
    state = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_quantized_bundle_of_a_lora_adapter(files, tmp_path):
    """-q: the adapter trained on the fp32 base runs on the 4-bit bundled base, as mlx-lm's LoRA model
    on that same quantized base computes it."""
    base, made = files
    path = bundle.make_bundle(bundle.BundleConfig(base, made["lora"], tmp_path / "q", quantize=True, q_bits=4,
                                                  q_group_size=32), log=lambda s: None)
    assert json.loads((path / bundle.MANIFEST).read_text())["base"]["quantization"]["bits"] == 4
    got = open_system(str(path)).complete(TEXT, generate.GenerationConfig(max_tokens=STEPS))
    _, tok, _ = models.load(base)
    assert got.tokens == _greedy_reference(str(path / bundle.MODEL_DIR), path / bundle.PROMPT,
                                           generate.chat_ids(tok, TEXT))
