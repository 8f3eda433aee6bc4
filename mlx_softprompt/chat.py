"""Interactive multi-turn chat with the soft prompt always in front.

A conversation keeps one key/value cache that starts as a copy of P's cache
and grows turn by turn: each new turn prefills only the tokens the cache does
not hold yet (the common prefix with the re-templated conversation is kept,
a divergent tail is trimmed), so P is never recomputed and earlier turns are
not prefilled again. Caches that cannot be trimmed fall back to a fresh copy
of P's cache plus the whole conversation: still no P prefill.

`--guard G` answers as the dual system (base + guard, guards.dual_complete);
`--compare G` prints the soft prompt's answer and the dual system's, labelled,
one after the other. Reads one user message per line from a pipe as well as
from a terminal. Through a pipe every answer is one line (its line breaks written
as the two characters \\n, backslashes doubled), or, with `--jsonl`, one JSON
object per answer, so a script reads exactly one line per message it sent.
"""

import json
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional

import mlx.core as mx

from . import checks, generate
from .errors import UserError
from .generate import GenerationConfig

COMMANDS = {"/reset": "forget the conversation (the soft prompt stays)", "/quit": "leave", "/exit": "leave",
            "/help": "this help"}


@dataclass
class ChatConfig:
    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    system: Optional[str] = None  # a system message at the start of every conversation
    jsonl: bool = False  # stdin lines may be JSON; every answer is a JSON object on one line

    def __post_init__(self):
        checks.generation(self.max_tokens, self.temp, self.top_p, self.seed)

    def generation(self) -> GenerationConfig:
        # seeded once per chat (in `run`), not per turn: turns are fresh samples
        return GenerationConfig(max_tokens=self.max_tokens, temp=self.temp, top_p=self.top_p, seed=None)


class Conversation:
    """Messages plus a cache holding [the System's prefix; the tokens fed so far], extended turn by turn.

    The System's method is applied as it serves: its prefix cache (soft prompt, prefix
    tuning) is where every conversation starts; LoRA and steering are bound to its model."""

    def __init__(self, system, system_text: Optional[str] = None):
        self.last_tokens: List[int] = []
        self.sys, self.system_text = system, system_text
        method = getattr(system, "method", None)
        self.label = method.label if method is not None else "base"
        self.reset()

    def reset(self) -> None:
        self.messages: List[dict] = []
        self.cache = generate.copy_cache(self.sys.cache)
        self.held: Optional[List[int]] = []  # conversation tokens whose keys/values the cache holds
        self.n = self._offset()

    def _offset(self) -> Optional[int]:
        offsets = {getattr(c, "offset", None) for c in self.cache}
        return offsets.pop() if len(offsets) == 1 and None not in offsets else None

    def _start(self, ids: List[int]) -> int:
        """Make the cache hold a prefix of `ids`; return its length (what needs no prefill)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
        from mlx_lm.utils import common_prefix_len

        if self.held is not None and self.n is not None:
            keep = min(common_prefix_len(self.held, ids), len(ids) - 1)
            drop = len(self.held) - keep
            if drop == 0:
                return keep
            if can_trim_prompt_cache(self.cache) and trim_prompt_cache(self.cache, drop) == drop:
                self.held = self.held[:keep]
                return keep
        self.cache = generate.copy_cache(self.sys.cache)
        self.held = []
        return 0

    def reply(self, text: str, cfg: GenerationConfig) -> Iterator[str]:
        """Stream the answer to `text` piece by piece; the turn is recorded even if cut short."""
        self.messages.append({"role": "user", "content": checks.text(text, "message")})
        ids = generate.chat_ids(self.sys.tokenizer, self.messages, system=self.system_text)
        try:
            checks.fits_context(len(ids), self.sys.config, "the conversation", extra=self.n or 0)
        except UserError:
            self.messages.pop()
            raise
        start = self._start(ids)
        pieces, tokens = [], []
        self.last_tokens = tokens  # this turn's generated ids (EOS included when it stopped)
        try:
            for r in generate.stream(self.sys.model, self.sys.tokenizer, ids[start:], self.cache, cfg):
                tokens.append(int(r.token))
                pieces.append(r.text)
                yield r.text
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            offset = self._offset()
            fed = ids + tokens
            held = None if offset is None or self.n is None else offset - self.n
            # the cache holds exactly the first `held` tokens of prompt + answer
            self.held = fed[:held] if held is not None and 0 <= held <= len(fed) else None


class DualConversation:
    """The dual system (base + guard), turn by turn; answers arrive whole, after the guard."""

    def __init__(self, system, guard, system_text: Optional[str] = None, threshold: Optional[float] = None,
                 refusal: Optional[str] = None):
        from .guards import DEFAULT_REFUSAL, DEFAULT_THRESHOLD

        threshold = DEFAULT_THRESHOLD if threshold is None else threshold

        self.sys, self.guard, self.system_text, self.threshold = system, guard, system_text, threshold
        # the refusal the soft prompt was trained towards, so the two answers are comparable
        meta = system.prompt_file.metadata if system.prompt_file is not None else {}
        self.refusal = refusal or meta.get("refusal") or DEFAULT_REFUSAL
        self.label = f"dual system: base + {guard.spec.id}"
        self.reset()

    def reset(self) -> None:
        self.messages: List[dict] = []
        self.last_u: Optional[float] = None

    def reply(self, text: str, cfg: GenerationConfig) -> Iterator[str]:
        from .guards import dual_complete

        self.messages.append({"role": "user", "content": text})
        out, self.last_u = dual_complete(self.sys.model, self.sys.tokenizer, self.guard, self.messages, cfg,
                                         refusal=self.refusal, threshold=self.threshold, system=self.system_text)
        self.messages.append({"role": "assistant", "content": out.text})
        self.last_tokens = list(out.tokens)
        yield out.text


def one_line(text: str) -> str:
    """An answer on one line, reversibly: backslash, newline and carriage return escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _message(line: str, number: int) -> str:
    """--jsonl input: a JSON string, an object with "content" (or "prompt"), or plain text."""
    from .errors import UserError

    if not line.lstrip().startswith(("{", '"')):
        return line
    try:
        obj = checks.json_value(json.loads(line), f"stdin line {number}")
    except json.JSONDecodeError as e:
        raise UserError(f"stdin line {number}: not valid JSON ({e.msg})")
    except RecursionError:
        raise UserError(f"stdin line {number}: JSON nested deeper than {checks.MAX_JSON_DEPTH} levels")
    if isinstance(obj, str):
        return obj
    text = obj.get("content", obj.get("prompt")) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise UserError(f"stdin line {number}: expected a string or an object with a string 'content'")
    return text


def _read_lines(stdin, tty: bool, out) -> Iterator[str]:
    while True:
        if tty:
            try:
                line = input(">> ")
            except UnicodeDecodeError as e:
                raise UserError(f"stdin: not UTF-8 text ({e.reason})") from None
            except EOFError:
                out.write("\n")
                return
        else:
            try:
                line = stdin.readline()
            except UnicodeDecodeError as e:
                raise UserError(f"stdin: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
            if not line:
                return
        yield line.rstrip("\r\n")


def run(conversations: list, cfg: ChatConfig, stdin=None, stdout=None, stderr=None, banner: str = "") -> None:
    """The chat loop: one user message per line; /reset, /quit; answers streamed to stdout.

    With several conversations (`--compare`) every message goes to each, and each
    answer is printed under its label.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    tty = stdin.isatty() and stdin is sys.stdin
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if cfg.seed is not None:
        mx.random.seed(cfg.seed)
    gen = cfg.generation()
    if banner and tty:
        stderr.write(banner + "\n")
        stderr.write("Type a message; /reset starts over, /quit leaves.\n")
        stderr.flush()
    lines = _read_lines(stdin, tty, stdout)
    number = 0
    while True:
        try:
            line = next(lines)
            number += 1
        except (StopIteration, KeyboardInterrupt):
            if tty:
                stdout.write("\n")
            return
        if cfg.jsonl:
            line = _message(line, number)
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return
        if cmd == "/reset":
            for c in conversations:
                c.reset()
            stderr.write("[conversation reset]\n")
            stderr.flush()
            continue
        if cmd == "/help":
            stderr.write("".join(f"  {k:8s} {v}\n" for k, v in COMMANDS.items()))
            stderr.flush()
            continue
        for c in conversations:
            if cfg.jsonl:
                pieces = []
                try:
                    pieces.extend(c.reply(line, gen))
                except KeyboardInterrupt:
                    pass
                answer = {"role": "assistant", "content": "".join(pieces)}
                if len(conversations) > 1:
                    answer["name"] = c.label
                stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
                stdout.flush()
                continue
            if len(conversations) > 1:
                stdout.write(f"[{c.label}] ")
                stdout.flush()
            try:
                for piece in c.reply(line, gen):
                    stdout.write(piece if tty else one_line(piece))
                    stdout.flush()
            except KeyboardInterrupt:
                stdout.write(" [interrupted]")
            except UserError as e:
                if not tty:  # a pipe: the one-line error and exit 1, as every command
                    raise
                stderr.write(f"error: {e}\n")  # at the keyboard: say so and keep the conversation
            stdout.write("\n")
            stdout.flush()
