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
the content, say), a conversation with control-token text is refused with a
400 naming the message, never passed through.
"""

import re
import secrets
import threading
from typing import List, Optional, Sequence

from .api import ApiError


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
        self.has_template = bool(getattr(self.hf, "chat_template", None))
        # `split_special_tokens` flips a flag on the shared Rust tokenizer: one encoding at a time, or a
        # concurrent request's control tokens could be read with the wrong setting
        self._lock = threading.Lock()

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
        hits = [(i, self.contains_control(m["content"])) for i, m in enumerate(messages)]
        hits = [(i, c) for i, c in hits if c]
        if not hits:
            return self._ids(list(messages))
        return self._segmented(messages, hits)

    def pieces(self, messages: Sequence[dict]) -> List[tuple]:
        """[(kind, text)] with kind "template" or "content", in order, joining to the real render."""
        real = self._render(list(messages))
        nonce = secrets.token_hex(6)
        marks = [f"MSP{nonce}X{i}X" for i in range(len(messages))]
        ph_render = self._render([dict(m, content=mark) for m, mark in zip(messages, marks)])
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

    def _segmented(self, messages, hits) -> List[int]:
        pieces = self.pieces(messages)
        if pieces is None:
            i, c = hits[0]
            raise ApiError(400, f"messages[{i}].content contains the control token {c!r}, and this model's chat "
                                "template cannot be rendered with it kept as plain text; remove it",
                           f"messages[{i}].content")
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
