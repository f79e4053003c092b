"""mPLUG-Owl's instruction template (the official `Human: ` / `AI: ` text form)."""
from __future__ import annotations

from typing import Sequence

from owl_jax.data.conversation import AI, HUMAN, SYSTEM_PROMPT
from owl_jax.tokenizer import IMAGE_TOKEN


def build_prompt(question_or_turns: str | Sequence[str], n_images: int = 1,
                 system: str = SYSTEM_PROMPT) -> str:
    """The official instruction template.

    `question_or_turns` is one question, or the turns of a chat alternating Human, AI,
    Human, ... (starting with Human). `n_images` lines `Human: <image>` follow the system line.
    When the last turn is Human's, the prompt ends with "\\nAI: " (one trailing space), ready
    for generation; when it is AI's, the result is a full training conversation.

    build_prompt("What is this?") ends with
    "questions.\\nHuman: <image>\\nHuman: What is this?\\nAI: "
    """
    turns = [question_or_turns] if isinstance(question_or_turns, str) else list(question_or_turns)
    if not turns:
        raise ValueError("build_prompt needs at least one Human turn")
    lines = [system] + [HUMAN + IMAGE_TOKEN] * n_images
    for i, text in enumerate(turns):
        lines.append((HUMAN if i % 2 == 0 else AI) + text)
    out = "\n".join(lines)
    if len(turns) % 2 == 1:
        out += "\n" + AI
    return out
