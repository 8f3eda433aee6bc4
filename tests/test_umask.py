"""Outputs are as readable as the umask says (0644 files / 0755 directories under 022),
not the 0600/0700 of the temporary files they are written through."""

import os
import stat
from pathlib import Path

import pytest

from mlx_softprompt import data, prompt_file
from mlx_softprompt.bundle import BundleConfig, make_bundle


@pytest.fixture
def umask():
    def set_(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_
    os.umask(old)


def _modes(root: Path) -> set:
    return {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


def test_files_and_bundles_follow_the_umask(umask, tiny_softprompt, tmp_path):
    base, pfile = tiny_softprompt()
    loaded = prompt_file.load(pfile)
    from mlx_softprompt import models

    model, _, config = models.load(base)
    for mask, fmode, dmode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        umask(mask)
        out = tmp_path / f"m{mask:o}"
        prompt_file.save(out / "p.safetensors", {"soft_prompt": loaded.prompt}, model, config)
        data.write_jsonl(out / "prompts.jsonl", [data.Example(prompt="hi", label="benign")])
        assert _modes(out) == {(True, dmode), (False, fmode)}
        bundle = make_bundle(BundleConfig(base=base, prompt_file=pfile, out=tmp_path / f"b{mask:o}"), log=lambda s: None)
        assert _modes(bundle) == {(True, dmode), (False, fmode)}, _modes(bundle)


def test_converted_model_follows_the_umask(umask, hf_tiny_model, tmp_path):
    from converters.hf_to_mlx import convert

    out = convert(hf_tiny_model("llama"), tmp_path / "mlx")
    assert _modes(Path(out)) == {(True, 0o755), (False, 0o644)}
