"""A request's text as it is generated (the engine's events carry it, inference/generate.py)."""

from __future__ import annotations


class TextStream:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character, and
    holds back text that might be the start of a stop string."""

    def __init__(self, tokenizer, stop: list[str], live: bool = True):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.live = live or bool(self.stop)  # without a reader or stop strings, decode once at the end
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # decoded so far
        self.emitted = 0  # characters of self.text already handed out

    def _decode_new(self) -> None:
        before = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        after = self.tokenizer.decode(self.tokens[self.prefix_offset :], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text to show now, whether a stop string was reached)."""
        self.tokens.append(token_id)
        if not self.live:
            return "", False
        self._decode_new()
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(len(self.text) - hold), False

    def finish(self) -> str:
        """Everything left, including an incomplete character at the very end (as decode shows it)."""
        before = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        after = self.tokenizer.decode(self.tokens[self.prefix_offset :], skip_special_tokens=False)
        if len(after) > len(before):
            self.text += after[len(before) :]
            self.prefix_offset = self.read_offset = len(self.tokens)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
