"""The bundle's model card (DIR/README.md), written with huggingface_hub.ModelCard.

The YAML header is what the Hub indexes (`ModelCard.load(...).data`): the base model,
library, tags, the base's licence when its own card states one, and the bundled
eval report's figures for this bundle's soft prompt as `model-index`. The body says
what the bundle is, warns that `model/` alone is the bare base (no soft prompt, so no
safety), and shows every system of the eval report in the table `eval` prints.
"""

import re
from pathlib import Path
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import methods, models

TAGS = ["mlx", "mlx-softprompt", "soft-prompt", "safety", "guard-distillation"]
# report figure -> model-index metric name (shares of prompts; utility_kl in nats/token)
METRICS = {
    "unsafe_compliance": "Unsafe compliance (refusal judge)",
    "unsafe_compliance_guard": "Unsafe compliance (guard judge)",
    "over_refusal": "Over-refusal (benign)",
    "over_refusal_borderline": "Over-refusal (borderline)",
    "agreement_with_dual": "Agreement with the dual system",
    "utility_kl": "Utility KL to the base (nats/token)",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(value) -> Optional[str]:
    """`value` when it names a Hub repository rather than a local path."""
    value = str(value or "")
    return value if HUB_ID.match(value) and not Path(value).exists() else None


def base_card_data(base_source: str, prompt_meta: dict) -> dict:
    """What the base's own card says (base_model, license), if the base has a card."""
    out = {}
    card_path = None
    if _hub_id(base_source):  # the base came from the Hub: its own card (offline or gated: none)
        try:
            from huggingface_hub import hf_hub_download

            card_path = Path(hf_hub_download(base_source, "README.md"))
        except Exception:
            card_path = None
    elif Path(base_source).is_dir():
        card_path = Path(base_source) / "README.md"
    if card_path is not None and card_path.is_file():
        try:
            data = ModelCard.load(card_path, ignore_metadata_errors=True).data.to_dict()
        except Exception:
            data = {}
        for key in ("license", "license_name", "license_link", "language"):
            if data.get(key):
                out[key] = data[key]
        parent = data.get("base_model")
        if isinstance(parent, list):
            parent = parent[0] if parent else None
        if _hub_id(parent):
            out["base_model"] = parent
    out.setdefault("base_model", _hub_id(base_source) or _hub_id(prompt_meta.get("base_model")))
    return {k: v for k, v in out.items() if v}


def _own_system(report: dict, prompt_sha: Optional[str], prompt_name: str) -> Optional[str]:
    """The report's row for this bundle's soft prompt: same file, else the only soft prompt."""
    systems = report.get("systems") or {}
    soft = [n for n, m in systems.items() if isinstance(m, dict) and m.get("kind") not in ("base", "dual", "system-prompt")]
    for n in soft:
        info = systems[n].get("info") or {}
        if prompt_sha and info.get("sha256") == prompt_sha:
            return n
        if info.get("file") and Path(str(info["file"])).name == prompt_name:
            return n
    return soft[0] if len(soft) == 1 else None


def eval_results(report: dict, system: str) -> list:
    from .data import is_file_source

    settings = report.get("settings") or {}
    sources = [x.strip() for x in str(settings.get("suite") or "eval suite").split(",") if x.strip()]
    files = [is_file_source(x) for x in sources]
    # eval's default: the test split of built-in sources, the whole of a user's file
    split = settings.get("split") or ("all" if all(files) else "test" if not any(files) else "test (built-in), all (files)")
    suite = ",".join(Path(x).name if f else x for x, f in zip(sources, files))  # no local paths on the Hub
    m = report["systems"][system]
    return [EvalResult(task_type="text-generation", task_name="Safe chat (refuse harmful, answer benign)",
                       dataset_type=suite, dataset_name=f"mlx-softprompt eval: {suite}", dataset_split=str(split),
                       metric_type=key, metric_name=name, metric_value=round(float(m[key]), 4))
            for key, name in METRICS.items() if isinstance(m.get(key), (int, float))]


def eval_table(report: dict) -> str:
    """Every system of the report, in the table `eval` prints."""
    from . import tables

    systems = report.get("systems")
    if not isinstance(systems, dict) or not systems:
        return "The bundled report has no `systems`: see the report file itself."
    return tables.render(systems, tables.EVAL)


def model_card(manifest: dict, report: Optional[dict], report_name: str = "eval_report.json",
               prompt_sha: Optional[str] = None, prompt_name: str = "prompt.safetensors") -> ModelCard:
    base, prompt = manifest["base"], manifest["prompt"]
    name = manifest["name"]
    q = base.get("quantization")
    quant = f"{q['bits']}-bit, group size {q['group_size']} (mlx-lm affine)" if q else "not quantized"
    meta = base_card_data(base["source"], prompt)
    own = _own_system(report, prompt_sha, prompt_name) if isinstance(report, dict) else None
    guard = prompt.get("guard")
    label = methods.label(prompt.get("method", "softprompt"))
    how = ("Its key/value cache is precomputed: it costs no prefill at run time." if manifest.get("cache")
           else "It is applied to the model when the bundle is opened.")
    data = ModelCardData(
        base_model=meta.get("base_model"), library_name="mlx", pipeline_tag="text-generation",
        license=meta.get("license"), license_name=meta.get("license_name"), license_link=meta.get("license_link"),
        language=meta.get("language"),
        tags=TAGS + ([f"guard:{guard}"] if guard else []),
        model_name=name if own else None,
        eval_results=eval_results(report, own) if own else None,
    )
    lines = [
        f"# {name}: a safe local chat model (mlx-softprompt bundle)",
        "",
        f"A base language model plus a learned {label}, distilled from a dual system "
        f"(base + guard model) so that one model runs instead of two. {how}",
        "",
        f"> **Warning: `model/` alone is the bare base model, without the {label} and without "
        "its safety.** `mlx_lm.generate --model " + name + "/model` (or any tool given `model/`) answers "
        "the requests the bundle refuses. Run the bundle as a whole with `mlx-softprompt`, which "
        f"always applies the {label}.",
        "",
        "| part | value |",
        "| --- | --- |",
        f"| base | `{base['source']}` ({models.short(base['fingerprint'])}) |",
        f"| quantization | {quant} |",
        (f"| soft prompt | {prompt.get('num_virtual_tokens', '?')} virtual tokens, {prompt.get('placement', '?')} |"
         if prompt.get("method", "softprompt") == "softprompt" else f"| method | {label} |"),
        f"| method options | `{prompt.get('method_options', 'not recorded')}` |",
        f"| guard distilled | {guard or 'not recorded'} |",
        f"| objective | {prompt.get('objective', 'not recorded')} |",
        f"| refusal | {prompt.get('refusal', 'not recorded')} |",
        f"| training data hash | {prompt.get('data_hash', 'not recorded')} |",
        f"| made with | mlx-softprompt {manifest['library_version']} |",
        "",
        "## Use",
        "",
        "```sh",
        f"mlx-softprompt chat --model {name}",
        f"mlx-softprompt generate --model {name} -p \"Write a haiku about tea.\"",
        f"mlx-softprompt serve --model {name} --port 8080   # OpenAI-compatible",
        "```",
        "",
        f"The {label} is always applied; a system message from a user or client is an ordinary "
        "message after it.",
        "",
        "## Evaluation",
        "",
    ]
    if report is None:
        lines.append("No eval report was bundled.")
    else:
        lines += [f"From `{report_name}` (the full report, every answer included, is in the bundle)"
                  + (f"; this bundle's {label} is the row `{own}`." if own else "."), "", eval_table(report)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
