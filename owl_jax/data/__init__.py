"""Data: sources (img2dataset, ArrayRecord, COCO, instruction json), tasks, packing."""

from owl_jax.data.conversation import Conversation, InstructionReader  # noqa: F401
from owl_jax.data.sources import open_source  # noqa: F401
