"""MiniGPT-4's prompts (`minigpt4/conversation/conversation.py`, `MiniGPT4.forward`).

Chat (v1, `CONV_VISION`, SINGLE style, sep "###"): system + "###", then "ROLE: msg###" per
message; the open assistant turn renders "Assistant:". `upload_img` adds the user message
"<Img><ImageHere></Img>" per image; `ask` joins the question to the last user message with a
space when it ends with "</Img>", else starts a new user message:

  build_prompt("What is this?") ==
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once
     I provide it to you. Please answer my questions.###Human: <Img><ImageHere></Img> What is
     this?###Assistant:"
  two images: "...###Human: <Img><ImageHere></Img>###Human: <Img><ImageHere></Img> q###Assistant:"

The refactored tree (MiniGPT-v2's, `minigpt4_head`) writes the roles as "Human: " /
"Assistant: " and joins nothing after them: the open turn is "Assistant: " with a trailing
space, a different token sequence; pick the template a checkpoint was made with.

Training (stage 2, `alignment`): "###Human: {} ###Assistant: " around an instruction such as
"<Img><ImageHere></Img> Describe this image in detail.", then the caption and "###".
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

IMAGE_HERE = "<ImageHere>"
IMAGE = "<Img><ImageHere></Img>"
SEP = "###"
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
          "once I provide it to you. Please answer my questions.")
ALIGN_PROMPT = "###Human: {} ###Assistant: "
# MiniGPT-4's `prompts/alignment.txt`: the stage-2 instructions (one drawn per sample).
ALIGN_INSTRUCTIONS = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]   # as the reference renders them before a message
    open_roles: tuple[str, str]  # ... before an empty (open) turn

    @property
    def stop(self) -> str:
        return SEP


TEMPLATES = {
    "minigpt4_v1": Template("minigpt4_v1", SYSTEM, ("Human: ", "Assistant: "),
                            ("Human:", "Assistant:")),
    "minigpt4_head": Template("minigpt4_head", SYSTEM, ("Human: ", "Assistant: "),
                              ("Human: ", "Assistant: ")),
}
DEFAULT = "minigpt4_v1"


def get(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown MiniGPT-4 template {template!r}; known: "
                         f"{', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def render(messages: Sequence[tuple[int, Optional[str]]], template: str | Template = DEFAULT
           ) -> str:
    """(role index 0 user / 1 assistant, message or None for an open turn) -> the text."""
    t = get(template)
    out = t.system + SEP
    for role, msg in messages:
        out += t.open_roles[role] if not msg else t.roles[role] + msg + SEP
    return out


def render_pieces(messages: Sequence[tuple[int, Optional[str]]],
                  template: str | Template = DEFAULT) -> list[tuple[str, bool]]:
    """`render` as (text, is an answer) pieces for training: each assistant message with its
    "###" is one answer piece, preceded by the role as an open turn renders it ("Assistant:",
    the end of the inference prompt); the user messages and the system text are the others.
    Encoded one by one, an answer gets the "▁" that its leading space becomes in `render`."""
    t = get(template)
    out = [(t.system + SEP, False)]
    for role, msg in messages:
        if not msg:
            out.append((t.open_roles[role], False))
        elif role == 1:
            out += [(t.open_roles[1], False), (msg + SEP, True)]
        else:
            out.append((t.roles[0] + msg + SEP, False))
    return out


def chat_messages(turns: Sequence[str], n_images: int) -> list[tuple[int, Optional[str]]]:
    """Turns alternating user, assistant, ... with `n_images` images uploaded before the first
    question -> the messages the reference's Chat holds (open assistant turn last when the last
    turn is the user's)."""
    msgs: list[tuple[int, Optional[str]]] = [(0, IMAGE) for _ in range(n_images)]
    for i, text in enumerate(turns):
        if i % 2 == 0 and msgs and msgs[-1][0] == 0 and msgs[-1][1].endswith("</Img>"):
            msgs[-1] = (0, msgs[-1][1] + " " + text)
        else:
            msgs.append((i % 2, text))
    if len(turns) % 2 == 1:
        msgs.append((1, None))
    return msgs


def build_prompt(question_or_turns: str | Sequence[str], n_images: int = 1,
                 template: str | Template = DEFAULT) -> str:
    """The chat prompt as MiniGPT-4's demo builds it (see the module docstring)."""
    turns = [question_or_turns] if isinstance(question_or_turns, str) else list(question_or_turns)
    if not turns:
        raise ValueError("build_prompt needs at least one user turn")
    return render(chat_messages(turns, n_images), template)


def instruction(index: int) -> str:
    """The stage-2 instruction `index` (modulo their number), in the training template."""
    return ALIGN_PROMPT.format(ALIGN_INSTRUCTIONS[index % len(ALIGN_INSTRUCTIONS)])
