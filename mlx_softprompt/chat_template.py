"""Chat prompts whose control tokens come only from the chat template.

A client's message text is data. If it contains the text of a control token
(``<|eot_id|>``, ``<|im_start|>``, ``<end_of_turn>``, ...), a plain
``apply_chat_template(..., tokenize=True)`` turns that text into the control
token itself, and a user can close their own turn and open an assistant turn
with words of their choosing (a prefill the soft prompt never sees as one).

Method: render the template twice, once with the real contents and once with
unique placeholders in their place. The placeholder render splits the text
into the template's own pieces; the real render is cut along those pieces.
Control tokens are then taken only from the template's pieces; everything
else (template text and message text alike) is encoded with
``split_special_tokens=True``, so a control token's text inside a message
becomes ordinary text tokens. Conversations without any control-token text
take the model's own ``apply_chat_template`` unchanged (the same ids).

If a template treats contents in a way the cut cannot follow (it branches on
the content, say), a conversation with control-token text is refused
(`ControlTokenError`, naming the message), never passed through.

Every place that turns a conversation into ids goes through here: `generate`,
`chat`, `eval`, `teach`, the server, and the guards' prompts (whose render is
the guard's own template), so the ids a soft prompt is trained on are the ids
it is served with.
"""

import re
import secrets
import threading
from typing import Callable, List, Optional, Sequence

from .errors import UserError


class ControlTokenError(UserError):
    """A message has control-token text and the template cannot be cut to keep it as text."""

    def __init__(self, index: int, token: str, what: str):
        super().__init__(f"messages[{index}].content contains the control token {token!r}, and {what} cannot be "
                         "rendered with it kept as plain text; remove it")
        self.index, self.token, self.what = index, token, what


def hf_tokenizer(tokenizer):
    """The transformers tokenizer under mlx-lm's TokenizerWrapper (or itself)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def control_tokens(tokenizer) -> List[str]:
    """Texts of the tokenizer's special (control) tokens, longest first."""
    hf = hf_tokenizer(tokenizer)
    found = set()
    decoder = getattr(hf, "added_tokens_decoder", None) or {}
    for tok in decoder.values():
        if getattr(tok, "special", False) and str(tok):
            found.add(str(tok))
    for t in getattr(hf, "all_special_tokens", None) or []:
        if t:
            found.add(t)
    return sorted(found, key=lambda s: (-len(s), s))


class PromptBuilder:
    """Token ids of a chat (or plain) prompt, with the control-token rule above."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.hf = hf_tokenizer(tokenizer)
        self.controls = control_tokens(tokenizer)
        self._control_re = re.compile("|".join(re.escape(c) for c in self.controls)) if self.controls else None
        # `split_special_tokens` flips a flag on the shared Rust tokenizer: one encoding at a time, or a
        # concurrent request's control tokens could be read with the wrong setting
        self._lock = threading.Lock()

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    # ------------------------------------------------------------ helpers

    def _render(self, messages) -> str:
        return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _ids(self, messages) -> List[int]:
        ids = self.hf.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: BatchEncoding

    def _text_ids(self, text: str, add_special_tokens: bool = False) -> List[int]:
        if not text:
            return []
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True))

    def _hits(self, messages: Sequence[dict]) -> List[tuple]:
        """[(message index, the first control-token text in it)] for the messages that have one."""
        hits = [(i, self.contains_control(m["content"])) for i, m in enumerate(messages)]
        return [(i, c) for i, c in hits if c]

    def contains_control(self, text: str) -> Optional[str]:
        if self._control_re is None:
            return None
        m = self._control_re.search(text)
        return m.group(0) if m else None

    # ------------------------------------------------------------ public

    def text_prompt(self, text: str) -> List[int]:
        """A plain-text prompt (no template): all text, control-token strings included."""
        with self._lock:
            return self._text_ids(text, add_special_tokens=True)

    def chat_prompt(self, messages: Sequence[dict]) -> List[int]:
        """Ids of `messages` (role/content dicts) with the generation prompt appended."""
        with self._lock:
            return self._chat_prompt(messages)

    def _chat_prompt(self, messages: Sequence[dict]) -> List[int]:
        if not self.has_template:
            return self._text_ids("\n".join(m["content"] for m in messages), add_special_tokens=True)
        hits = self._hits(messages)
        if not hits:
            return self._ids(list(messages))
        return self._segmented(messages, hits)

    def pieces(self, messages: Sequence[dict], render: Optional[Callable] = None) -> List[tuple]:
        """[(kind, text)] with kind "template" or "content", in order, joining to the real render
        (`render(messages) -> str`; the chat template by default); None if the cut fails."""
        render = render or self._render
        real = render(list(messages))
        nonce = secrets.token_hex(6)
        marks = [f"MSP{nonce}X{i}X" for i in range(len(messages))]
        ph_render = render([dict(m, content=mark) for m, mark in zip(messages, marks)])
        parts = re.split(f"MSP{nonce}X([0-9]+)X", ph_render)
        template, order = parts[0::2], [int(k) for k in parts[1::2]]
        if not real.startswith(template[0]):
            return None
        out, pos = [("template", template[0])], len(template[0])
        for k, i in enumerate(order):
            content, nxt = messages[i]["content"], template[k + 1]
            last = k == len(order) - 1
            best = None
            if last:
                q = len(real) - len(nxt)
                if q >= pos and real.endswith(nxt) and real[pos:q] in content:
                    best = q
            else:
                q = real.find(nxt, pos)
                while q != -1 and q - pos <= len(content):
                    if real[pos:q] in content:
                        best = q
                    q = real.find(nxt, q + 1)
            if best is None:
                return None
            out += [("content", real[pos:best]), ("template", nxt)]
            pos = best + len(nxt)
        if pos != len(real):
            return None
        return out

    def rendered_prompt(self, messages: Sequence[dict], render: Callable, suffix: str = "",
                        what: str = "this model's chat template") -> List[int]:
        """Ids of `render(messages) + suffix` (another template, a guard's), by the same rule."""
        with self._lock:
            hits = self._hits(messages)
            if not hits:
                return list(self.hf.encode(render(list(messages)) + suffix, add_special_tokens=False))
            return self._segmented(messages, hits, lambda m: render(m) + suffix, what)

    def _segmented(self, messages, hits, render=None, what: str = "this model's chat template") -> List[int]:
        pieces = self.pieces(messages, render)
        if pieces is None:
            return self._marked(messages, hits, render or self._render, what)
        # control tokens from the template's pieces only; all other text is encoded as text
        ids, text = [], []
        for kind, piece in pieces:
            if kind == "content" or self._control_re is None:
                text.append(piece)
                continue
            pos = 0
            for m in self._control_re.finditer(piece):
                text.append(piece[pos:m.start()])
                ids += self._text_ids("".join(text))
                text = []
                ids.append(self.hf.convert_tokens_to_ids(m.group(0)))
                pos = m.end()
            text.append(piece[pos:])
        ids += self._text_ids("".join(text))
        return ids

    def _marked(self, messages, hits, render, what: str) -> List[int]:
        """Fallback for templates the cut cannot follow (they transform or branch on contents):
        wrap each control-token text of the messages in private-use markers, render, and
        encode marked text as text (transformers' ``sanitize_control_tokens`` does the same)."""
        start, end = MARK_START, MARK_END
        marked = [dict(m, content=self._control_re.sub(lambda t: start + t.group(0) + end,
                                                        m["content"].replace(start, "").replace(end, "")))
                  for m in messages]
        text = render(marked)
        parts = re.split(f"{start}(.*?){end}", text)
        outside = parts[0::2]
        # the template's own control tokens: those of a render whose contents have none
        plain = render([dict(m, content=self._control_re.sub("", m["content"])) for m in messages])
        own = len(self._control_re.findall(plain))
        if any(start in p or end in p for p in outside) or \
                sum(len(self._control_re.findall(p)) for p in outside) != own:
            i, c = hits[0]  # the template split or escaped a marker: no safe reading
            raise ControlTokenError(i, c, what)
        ids = []
        for k, piece in enumerate(parts):
            if k % 2:
                ids += self._text_ids(piece)
            elif piece:
                ids += list(self.hf.encode(piece, add_special_tokens=False))
        return ids


# private-use code points, as transformers' mark_control_tokens uses
MARK_START, MARK_END = "\U000f0000", "\U000f0001"

ATTR = "_mlx_softprompt_prompt_builder"  # a tokenizer's builder, kept on the tokenizer itself


def builder(tokenizer) -> PromptBuilder:
    """The PromptBuilder of `tokenizer`, made once and kept on it (its control tokens are read once)."""
    hf = hf_tokenizer(tokenizer)
    pb = getattr(hf, ATTR, None)
    if pb is None:
        pb = PromptBuilder(tokenizer)
        object.__setattr__(hf, ATTR, pb)
    return pb
