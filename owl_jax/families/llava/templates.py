"""LLaVA's conversation templates (`llava/conversation.py`), rendered as its `get_prompt` does.

Separator styles:
  two     (vicuna_v1 = v1, llava_v1): system + " ", then "ROLE: msg" + sep_i per turn, with
          sep_0 = " " after a user turn and sep_1 = "</s>" after an assistant turn. A turn with
          no message (None or "") renders as "ROLE:" and nothing after it: that is how a
          prompt ends ready for generation ("... USER: <image>\\nWhat is it? ASSISTANT:").
  single  (llava_v0): system + "###", then "ROLE: msg###" per turn; an open turn is "ROLE:".
  plain   (stage-1 pretraining): "<image>" + caption + "\\n". The human's words are dropped:
          LLaVA's stage-1 preprocessing replaces the first turn by the image alone, so a
          generation prompt is just the image placeholder(s).

vicuna_v1 is the template LLaVA-1.5 trains and evaluates with (`--version v1`,
`--conv-mode vicuna_v1`); llava_v1 differs only in its system text ("human" for "user"). The
reference's `v0` name is `conv_vicuna_v0`, a llava_v0-like template with a one-shot example
exchange in its history; it is not provided here.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]  # (user, assistant)
    style: str  # "two" | "single" | "plain"
    sep: str
    sep2: Optional[str] = None

    @property
    def stop(self) -> str:
        """The string that ends an answer (LLaVA's eval scripts' `stop_str`)."""
        return self.sep2 if self.style == "two" else self.sep

    @property
    def answer_tag(self) -> str:
        """What precedes every answer in a rendered two-style conversation (" ASSISTANT: ")."""
        return self.sep + self.roles[1] + ": "


_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's "
                 "questions.")
_USER_SYSTEM = _HUMAN_SYSTEM.replace("human", "user")

VICUNA_V1 = Template("vicuna_v1", _USER_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>")
TEMPLATES = {
    "vicuna_v1": VICUNA_V1,
    "v1": VICUNA_V1,
    "llava_v1": Template("llava_v1", _HUMAN_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "llava_v0": Template("llava_v0", _HUMAN_SYSTEM, ("Human", "Assistant"), "single", "###"),
    "plain": Template("plain", "", ("", ""), "plain", "\n"),
}


def get(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown LLaVA template {template!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def render(messages: Sequence[Optional[str]], template: str | Template = VICUNA_V1) -> str:
    """Messages alternating user, assistant, ... (already holding their `<image>` lines) ->
    the conversation text of a two- or single-style template. A falsy message is an open turn
    ("ROLE:")."""
    t = get(template)
    if t.style == "plain":
        raise ValueError("the plain template has no turns: use build_prompt or caption_sample")
    out = t.system + t.sep
    for i, msg in enumerate(messages):
        role = t.roles[i % 2]
        if not msg:
            out += role + ":"
        elif t.style == "two":
            out += role + ": " + msg + (t.sep, t.sep2)[i % 2]
        else:
            out += role + ": " + msg + t.sep
    return out


def build_prompt(question_or_turns: str | Sequence[str], n_images: int = 1,
                 template: str | Template = "vicuna_v1") -> str:
    """The chat prompt as LLaVA's scripts build it: `n_images` lines "<image>\\n" before the
    first question; the turns alternate user, assistant, ...; when the last turn is the user's,
    the prompt ends with the open assistant turn, ready for generation.

    build_prompt("What is this?") ==
        "A chat between a curious user ... questions. USER: <image>\\nWhat is this? ASSISTANT:"
    With template="plain" the questions are dropped (see the module docstring):
    build_prompt("Describe it.", template="plain") == "<image>".
    """
    t = get(template)
    turns = [question_or_turns] if isinstance(question_or_turns, str) else list(question_or_turns)
    if not turns:
        raise ValueError("build_prompt needs at least one user turn")
    if t.style == "plain":
        return IMAGE_TOKEN * n_images + "".join(a + t.sep for a in turns[1::2])
    messages: list[Optional[str]] = list(turns)
    messages[0] = (IMAGE_TOKEN + "\n") * n_images + messages[0]
    if len(messages) % 2 == 1:
        messages.append(None)
    return render(messages, t)
