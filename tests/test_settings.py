"""One reading of settings: a training config, a method's options, `demo --set` and the world
builder's `--set` all read a value as its dataclass field is annotated (checks.setting), so the
same text means the same thing, and is refused with the same words, wherever it is given."""

import math
from typing import Any, Dict, List, Optional

import pytest

from mlx_softprompt import checks, demo, methods, train
from mlx_softprompt.errors import UserError

from test_demo import _script


@pytest.mark.parametrize("value, hint, want", [
    ("3e-3", float, 0.003),  # YAML 1.1 reads 3e-3 as text
    (2, float, 2.0), (5.0, int, 5), ("5", int, 5), ("5.0", int, 5), (3, str, "3"), (0.5, str, "0.5"),
    ("none", Optional[int], None), ("Null", Optional[str], None), (None, Optional[float], None),
    ("a.q, a.v", Optional[List[str]], ["a.q", "a.v"]), (("x",), List[str], ["x"]),
    (True, bool, True), ({"k": 1}, dict, {"k": 1}), ([1, "a"], Any, [1, "a"]),
])
def test_setting_reads_a_value_as_annotated(value, hint, want):
    got = checks.setting(value, hint, "where")
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value, hint, message", [
    (5.5, int, "expected an integer, got float 5.5"), (True, int, "expected an integer, got bool True"),
    ("many", int, "expected an integer, got str 'many'"), ("x", float, "expected a number, got str 'x'"),
    (math.nan, float, "must be finite"), ("inf", float, "must be finite"), (math.inf, int, "expected an integer"),
    ("yes", bool, "expected true/false"), (1, bool, "expected true/false"), (True, str, "expected a string"),
    ([1], List[str], "expected a list of strings"), ("a", dict, "expected an object"),
    (None, int, "a value is required"), ("none", int, "expected an integer, got str 'none'"),
])
def test_setting_refuses_with_one_line_naming_where(value, hint, message):
    with pytest.raises(UserError, match=message) as e:
        checks.setting(value, hint, "cfg.yaml: iters")
    assert str(e.value).startswith("cfg.yaml: iters: ") and "\n" not in str(e.value)


def test_setting_text_keeps_a_path_as_text():
    assert checks.setting_text(" 0.10 ", Optional[str], "w") == "0.10"  # not the float 0.1
    assert checks.setting_text("a: b", str, "w") == "a: b"
    assert checks.setting_text("none", Optional[str], "w") is None
    assert checks.setting_text("[1, 2]", Any, "w") == [1, 2]
    assert checks.setting_text("", Optional[int], "w") is None
    # only the str of str / Optional[str] keeps its text: a list or a mapping of strings is read
    assert checks.setting_text("a, b", List[str], "w") == ["a", "b"]
    assert checks.setting_text("{a: 1}", Dict[str, int], "w") == {"a": 1}


def test_every_entry_point_reads_the_same_text_the_same_way(tmp_path):
    """5.0 for an integer and 3e-3 for a float are accepted, and "x" refused in the same words,
    by a training config, method options, `demo --set` and the world builder's `--set`."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text("base: m\nteacher: c\nout: p.safetensors\niters: 5.0\nlearning_rate: 3e-3\n")
    args = train.make_args(str(cfg))
    assert (args.iters, args.learning_rate) == (5, 0.003)
    assert demo.settings(["train.iters=5.0", "train.learning_rate=3e-3"])["train"]["iters"] == 5
    assert methods.get("lora", rank=5.0).options.rank == 5
    build = _script("build")
    world = build.WorldConfig()
    build.set_field(world, "guard_epochs=5.0")
    build.set_field(world, "learning_rate=3e-3")
    assert (world.guard_epochs, world.learning_rate) == (5, 0.003)

    said = []
    cfg.write_text("base: m\nteacher: c\nout: p.safetensors\niters: x\n")
    for attempt in (lambda: train.make_args(str(cfg)), lambda: demo.settings(["train.iters=x"]),
                    lambda: methods.get("lora", rank="x"), lambda: build.set_field(world, "guard_epochs=x")):
        with pytest.raises(UserError) as e:
            attempt()
        said.append(str(e.value).rsplit(": ", 1)[1])
    assert said == ["expected an integer, got str 'x'"] * 4


def test_demo_set_reads_a_method_shorthand_as_its_option():
    """`--set train.init=text: ...` is the soft prompt's text init (not a YAML mapping), and
    `train.num_tokens` is an integer, read and refused at --set as the option itself would be."""
    got = demo.settings(["train.init=text: Safety first.", "train.num_tokens=32.0"])["train"]
    assert (got["init"], got["num_tokens"]) == ("text: Safety first.", 32)
    demo.DemoConfig(train=got)  # and the demo takes them
    with pytest.raises(UserError, match=r"--set 'train.num_tokens=x': expected an integer, got str 'x'"):
        demo.settings(["train.num_tokens=x"])
    assert methods.shorthand_type("softprompt", "lora_rank") is Any  # another method's: refused later, by name
    with pytest.raises(UserError, match="--lora-rank is an option of lora, not of --method softprompt"):
        demo.DemoConfig(**demo.settings(["train.lora_rank=4"]))
