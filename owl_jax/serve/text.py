"""Text of a growing answer: incremental detokenization and stop strings.

Each call decodes the whole answer so far (SentencePiece joins pieces with context) and hands
out only what is new; text that ends in an incomplete UTF-8 sequence (U+FFFD) or that could be
the start of a stop string is held back until the next tokens tell."""
from __future__ import annotations


class AnswerText:
    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False   # a stop string was found: the answer ends before it

    def add(self, ids: list[int], final: bool = False) -> str:
        """New text to send after `ids` (final: the answer ended, send everything)."""
        if self.stopped:
            return ""
        self.ids += ids
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        if not final:
            hold = max((k for s in self.stop for k in range(1, len(s))
                        if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent):
            return ""  # earlier text changed under more context: keep what was sent
        new, self.sent = text[len(self.sent):], text
        return new
