"""The base fingerprint against copies made by mlx-lm itself (quantize_model, set_dtype) and impostors.

Copies must match both ways round (a file made on the base, used on the copy, and the reverse);
fine-tunes (every weight moved, a merged low-rank update, only the embedding or only the norms
changed), a fine-tune then quantized, and another model of the same shapes must not.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_copies_match_and_fine_tunes_do_not(tiny_model):
    import fingerprint as calib

    from mlx_softprompt import models

    model, _, config = models.load(tiny_model("llama"))
    other = models.load(tiny_model("llama", seed=1))[0]
    rows = calib.table(model, config, other)
    names = [r[0] for r in rows]
    assert "4-bit g64 copy" in names and "8-bit g64 copy" in names and "another model, same shapes" in names
    wrong = [(name, there, back) for name, expected, there, back, *_ in rows
             if (there is None) != expected or (back is None) != expected]
    assert not wrong, wrong


def test_a_prompt_file_follows_its_base_into_a_quantized_bundle_but_not_a_fine_tune(tiny_softprompt, tmp_path):
    import fingerprint as calib
    from mlx_lm.utils import quantize_model

    from mlx_softprompt import models, prompt_file
    from mlx_softprompt.errors import UserError

    base, pfile = tiny_softprompt()
    model, _, config = models.load(base)
    f = prompt_file.load(pfile)
    q, _ = quantize_model(calib.copy.deepcopy(model), dict(config), 64, 4)
    f.check_base(q, config)  # accepted
    tuned = calib.perturbed(model, 1e-3)
    try:
        f.check_base(tuned, config)
    except UserError as e:
        assert "fine-tune" in str(e) and str(pfile) in str(e)
    else:
        raise AssertionError("a fine-tune of the base was accepted")
