"""One policy for what users give us: every value checked where it enters, one line if it is wrong.

Flags, config keys, JSON/JSONL fields, manifests and file metadata pass through these
functions, so every command refuses bad input the same way: a `UserError` naming the
flag, file, line or field (the CLI prints it as one line and exits 1), before any work
starts and before MLX is asked for memory it cannot have. Output paths are checked
up front too, and an existing output is only replaced when the user says so.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import UserError

MAX_JSON_DEPTH = 64  # deeper JSON is refused (Python's parser would hit its recursion limit)
MAX_TEXT_CHARS = 4_000_000  # one prompt / message; longer is refused before tokenizing


# ---------------------------------------------------------------- numbers


def number(value: Any, name: str, *, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> Any:
    """A finite number (an int when `integer`) within [lo, hi] (open ends on request)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            if isinstance(value, bool) or value is None:
                raise ValueError
            value = int(value) if integer else float(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if integer and isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise UserError(f"{name}: expected an integer, got {value!r}")
        value = int(value)
    if not math.isfinite(value):
        raise UserError(f"{name}: must be a finite number, got {value!r}")
    low = lo is not None and (value <= lo if lo_open else value < lo)
    high = hi is not None and (value >= hi if hi_open else value > hi)
    if low or high:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else _fmt(lo)}, {'inf' if hi is None else _fmt(hi)}{right}"
        raise UserError(f"{name}: must be in {rng}, got {value!r}")
    return value


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def positive(value, name: str, integer: bool = True):
    return number(value, name, lo=0, lo_open=True, integer=integer)


def sampling(temp, top_p, where: str = "") -> None:
    """Temperature >= 0 and top-p in (0, 1], both finite (NaN would sample garbage silently)."""
    number(temp, f"{where}--temp", lo=0)
    number(top_p, f"{where}--top-p", lo=0, lo_open=True, hi=1)


def generation(max_tokens_, temp, top_p, seed_=None) -> None:
    """The sampling settings every generating command takes."""
    max_tokens(max_tokens_)
    sampling(temp, top_p)
    seed(seed_)


def max_tokens(value, name: str = "--max-tokens") -> int:
    return number(value, name, lo=1, hi=10_000_000, integer=True)


def port(value, name: str = "--port") -> int:
    return number(value, name, lo=0, hi=65535, integer=True)


def seed(value, name: str = "--seed") -> Optional[int]:
    if value is None:
        return None
    return number(value, name, lo=0, hi=2**63 - 1, integer=True)


# ---------------------------------------------------------------- text and JSON


def text(value: Any, name: str, *, allow_empty: bool = True, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A string that encodes as UTF-8 (no lone surrogates) and is not absurdly long."""
    if not isinstance(value, str):
        raise UserError(f"{name}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{name}: must not be empty")
    if len(value) > max_chars:
        raise UserError(f"{name}: {len(value):,} characters; at most {max_chars:,} are accepted")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{name}: not valid Unicode text ({e.reason} at character {e.start})")
    return value


def read_stdin(name: str = "stdin") -> str:
    """All of stdin as text; invalid UTF-8 is one line, not a UnicodeDecodeError."""
    import sys

    try:
        return text(sys.stdin.read(), name)
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def _unicode_ok(obj: Any) -> Optional[str]:
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return node[:20]
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def loads(s, where: str, line_in_name: bool = True, constants: bool = False) -> Any:
    """json.loads with the policy: valid UTF-8, depth <= 64, no lone surrogates, no NaN/Infinity
    (unless `constants`: Python's json writes them, and model configs written by it hold them)."""
    if isinstance(s, (bytes, bytearray)):
        try:
            s = bytes(s).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text (byte {e.start})")

    def bad_constant(c):
        raise ValueError(f"{c} is not valid JSON")

    try:
        value = json.loads(s, parse_constant=None if constants else bad_constant)
    except json.JSONDecodeError as e:
        if not line_in_name:
            raise UserError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        at = where if re.search(r"(:| line )\d+$", where) else f"{where}:{e.lineno}"  # a JSONL line names itself
        raise UserError(f"{at}: invalid JSON ({e.msg} at column {e.colno})")
    except (ValueError, RecursionError) as e:
        raise UserError(f"{where}: invalid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return json_value(value, where)


def json_value(value: Any, where: str) -> Any:
    """A parsed JSON value within the policy: nested at most 64 levels, no lone surrogates."""
    if depth(value) > MAX_JSON_DEPTH:
        raise UserError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    bad = _unicode_ok(value)
    if bad is not None:
        raise UserError(f"{where}: a string holds a lone surrogate (not valid Unicode): {bad!r}")
    return value


def read_json(path, what: str = "JSON file", max_bytes: int = 64 << 20, constants: bool = False) -> Any:
    """A JSON file read with the policy above; errors name the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UserError(f"{path}: not a file")
        if size > max_bytes:
            raise UserError(f"{path}: {size:,} bytes, too large for a {what} (at most {max_bytes:,})")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})")
    return loads(raw, str(path), line_in_name=False, constants=constants)


def read_json_object(path) -> dict:
    """A JSON file holding an object, or a UserError naming the file (not found, bad JSON, not an object)."""
    value = read_json(path, constants=True)  # as json.loads: Python writes NaN and Infinity
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


# ---------------------------------------------------------------- typed fields of manifests and metadata


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "an object",
               list: "a list"}


def field(obj: Any, key: str, kind, where: str, *, optional: bool = False, default: Any = None) -> Any:
    """obj[key] as `kind` (int, float, str, bool, dict, list or a tuple of them), or a UserError naming it."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if optional:
            return default
        raise UserError(f"{where}: field {key!r} is missing")
    return of_type(obj[key], kind, f"{where}: field {key!r}")


def of_type(value: Any, kind, name: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{name}: must be finite, got {value!r}")
            return float(value) if len(kinds) == 1 else value
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if k not in (int, float) and isinstance(value, k):
            return value
    want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
    raise UserError(f"{name}: expected {want}, got {type(value).__name__} {_short(value)}")


def _unwrap_optional(hint) -> tuple:
    """(the annotated kind, whether None is allowed) for `X` or `Optional[X]`."""
    import typing

    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def setting(value: Any, hint, name: str) -> Any:
    """A setting read from YAML, JSON or a command line, as its dataclass field is annotated
    (bool, int, float, str, List[str], dict, Any, or Optional of one), or a UserError naming it.

    The one reading of settings (training arguments, method options, the demo's and the world
    builder's --set): YAML 1.1 reads 3e-3 as text and a command line gives text, so numbers
    written as text are read as numbers; an integral float is an int; a comma-separated text is
    a list; null or "none" is None for an Optional field; a float must be finite."""
    import typing

    kind, optional = _unwrap_optional(hint)
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        value = None
    if value is None:
        if optional:
            return None
        raise UserError(f"{name}: a value is required")
    origin = typing.get_origin(kind) or kind
    if origin not in (bool, int, float, str, list, dict):  # Any (a method's shorthand) and the rest: its owner checks
        return value
    if origin is list:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
            return list(value)
        raise UserError(f"{name}: expected a list of strings (or one comma-separated string), got "
                        f"{type(value).__name__} {_short(value)}")
    if origin is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return of_type(value, str, name)
    if origin in (int, float) and isinstance(value, str):
        for parse in (int, float) if origin is int else (float,):  # "5.0" for an int: integral, below
            try:
                value = parse(value.strip())
                break
            except ValueError:
                pass
    if origin is int and isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return of_type(value, origin, name)


def setting_text(text: str, hint, name: str) -> Any:
    """A setting given as text (`--set KEY=VALUE`): read as a YAML scalar (true, 3e-3, [a, b], null),
    the text itself for a str field (a path stays a path), then `setting`."""
    import yaml

    if _unwrap_optional(hint)[0] is str and text.strip().lower() not in ("none", "null"):
        return text.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return setting(value, hint, name)


def int_string(meta: dict, key: str, where: str, *, lo: int = 0, optional: bool = False) -> Optional[int]:
    """A string metadata entry holding a non-negative integer (safetensors metadata are strings)."""
    v = meta.get(key)
    if v is None:
        if optional:
            return None
        raise UserError(f"{where}: metadata {key!r} is missing")
    try:
        n = int(str(v).strip())
    except ValueError:
        raise UserError(f"{where}: metadata {key!r} is not an integer ({_short(v)})")
    if n < lo:
        raise UserError(f"{where}: metadata {key!r} must be >= {lo}, got {n}")
    return n


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ---------------------------------------------------------------- files we read


def input_file(path, flag: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path}: not readable")
    return path


def safetensors_header(path) -> dict:
    """Check a safetensors file's framing (header size, JSON, tensor extents == file size); returns the header.

    MLX and the safetensors library read a truncated file with an opaque error, or past its end;
    this gives one line naming the file instead.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (truncated: {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise UserError(f"{path}: truncated or corrupt safetensors header")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: corrupt safetensors header (not JSON)")
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not an object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and (not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values())):
                raise UserError(f"{path}: corrupt safetensors metadata (values must be strings)")
            continue
        try:
            a, b = (int(x) for x in info["data_offsets"])
            if not 0 <= a <= b:
                raise ValueError
        except (KeyError, TypeError, IndexError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header (tensor {name!r})")
        end = max(end, b)
    if 8 + n + end != size:
        raise UserError(f"{path}: truncated or corrupt ({size} bytes, header expects {8 + n + end})")
    return header


# ---------------------------------------------------------------- outputs


def _writable_dir(d: Path, flag: str, path: Path) -> None:
    """d (or its nearest existing ancestor) is a directory we may create entries in."""
    p = d
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{flag} {path}: {p} is a file, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {p} is not writable")


def output_file(path, flag: str, *, overwrite: bool = False, resume: bool = False, suffix: Optional[str] = None,
                hint: str = "pass --overwrite to replace it") -> Path:
    """Check an output file before any work: writable place, not a directory, not replaced unasked."""
    path = Path(path)
    if suffix and path.suffix != suffix:
        raise UserError(f"{flag} {path}: expected a {suffix} file name")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file name")
    _writable_dir(path.parent, flag, path)
    if path.exists():
        if not os.access(path, os.W_OK) and not os.access(path.parent, os.W_OK):
            raise UserError(f"{flag} {path}: not writable")
        if not (overwrite or resume):
            raise UserError(f"{flag} {path}: already exists; {hint}")
    clean_stale(path)
    return path


def output_dir(path, flag: str, *, overwrite: bool = False, resumable: bool = False,
               hint: str = "choose a new path or pass --overwrite") -> Path:
    """Check an output directory before any work: a directory (or absent) in a writable place.

    A non-empty directory is refused unless the command resumes into it (`resumable`) or
    the user asked for `overwrite` (the command then replaces what it writes).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a directory")
    _writable_dir(path if path.exists() else path.parent, flag, path)
    if path.exists() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: not writable")
    if path.exists() and any(path.iterdir()) and not (overwrite or resumable):
        raise UserError(f"{flag} {path}: already exists and is not empty; {hint}")
    clean_stale(path)
    return path


def clean_stale(path) -> None:
    """Remove the temporary siblings (`.NAME.*.tmp*`) a killed run of ours left next to `path`."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    import shutil

    for p in parent.glob(f".{glob_escape(path.name)}.*.tmp*"):
        try:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
        except OSError:
            pass


def glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


# ---------------------------------------------------------------- sizes against the model and the machine


def context_length(config: dict) -> Optional[int]:
    """The base's trained context (positions), when its config says."""
    for c in (config, config.get("text_config") or {}):
        for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
            v = c.get(k) if isinstance(c, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def fits_context(n_tokens: int, config: dict, what: str, extra: int = 0) -> None:
    """Refuse a sequence longer than the base was trained for (it would generate garbage)."""
    limit = context_length(config)
    if limit is not None and n_tokens + extra > limit:
        more = f" + {extra}" if extra else ""
        raise UserError(f"{what}: {n_tokens}{more} tokens exceed the model's context of {limit} tokens")


def memory_bytes() -> int:
    """Memory MLX may use: the device's recommended working set on Apple silicon, else physical RAM."""
    try:
        import mlx.core as mx

        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        v = int(info.get("max_recommended_working_set_size") or info.get("memory_size") or 0)
        if v > 0:
            return v
    except Exception:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def fits_memory(nbytes: float, what: str) -> None:
    """Refuse an allocation that cannot fit before MLX is asked (MLX aborts the process instead)."""
    have = memory_bytes()
    if nbytes > have:
        raise UserError(f"{what}: needs about {nbytes / 1e9:,.1f} GB, more than this machine's "
                        f"{have / 1e9:,.1f} GB; make it smaller")


def attention_bytes(config: dict, batch: int, length: int, dtype_bytes: int = 4) -> float:
    """A lower bound on one forward pass's peak, for `batch` rows of `length` tokens: the attention
    scores of one layer (as the CPU computes them) plus the logits. Far below it is no promise;
    above the machine's memory it cannot run, and MLX would abort the process instead of failing."""
    c = config.get("text_config") or config
    heads = c.get("num_attention_heads") or c.get("n_head") or 1
    vocab = c.get("vocab_size") or 0
    heads = heads if isinstance(heads, int) and heads > 0 else 1
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else 0
    return float(batch) * length * (heads * length + vocab) * dtype_bytes


def each(values: Iterable, check, name: str) -> list:
    return [check(v, f"{name}[{i}]") for i, v in enumerate(values)]
