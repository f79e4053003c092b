"""What a generation request asks for (`GenerationConfig`, HF's names), its compile-time part
(`Spec`), and what it returns (`Generation`)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

MAX_STOPS = 4   # stop token ids a request may name (padded with -1, which no token equals)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options (HF names). temperature 0 = greedy; num_beams > 1 = beam search."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = True
    seed: int = 0
    # a stop id or several; None: the model config's eos_token_id and stop_token_ids
    eos_token_id: int | tuple[int, ...] | None = None
    # Repetition penalty / no-repeat-ngram over prompt + new tokens (HF generate on input_ids);
    # False: over [BOS] + new tokens only, as the official mPLUG-Owl generate (inputs_embeds).
    penalize_prompt: bool = True
    # Prompt lookup (HF's names): plain greedy decoding of one prompt drafts up to this many
    # tokens from an earlier occurrence of its last n-gram and checks them in one pass
    # (`owl_jax.generate.cpu.lookup`); the tokens are those of plain greedy decoding. 0: off.
    prompt_lookup_num_tokens: int = 0
    max_matching_ngram_size: int = 2
    # Self-speculation: plain greedy decoding of one prompt drafts up to this many tokens with
    # an int8 copy of the LLM and checks them in one fp32 pass (`generate.cpu.self_draft`); the
    # tokens are those of plain greedy decoding. It runs where the CPU decode kernels do
    # (elsewhere: one pass per token); the copy, a quarter of the LLM's bytes, is made at the
    # first request that uses it. 0: off. Prompt lookup, where asked for, takes precedence.
    self_draft_tokens: int = 4

    def validate(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.prompt_lookup_num_tokens < 0 or self.max_matching_ngram_size < 1:
            raise ValueError("prompt_lookup_num_tokens must be >= 0 and max_matching_ngram_size "
                             ">= 1")
        if self.self_draft_tokens < 0:
            raise ValueError(f"self_draft_tokens must be >= 0, got {self.self_draft_tokens}")
        if self.no_repeat_ngram_size < 0 or self.num_beams < 1:
            raise ValueError("no_repeat_ngram_size must be >= 0 and num_beams >= 1")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam sampling is not supported: use temperature 0 with num_beams > 1")


@dataclasses.dataclass
class Generation:
    token_ids: list[int]          # new tokens, EOS not included
    finish_reason: str            # "eos" or "length"
    text: str | None = None       # filled in by callers that own a tokenizer


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static (compile-time) part of a decoding request."""
    sample: bool = False
    top_k: int = 0
    top_p: bool = False
    penalty: bool = False
    ngram: int = 0
    beams: int = 1
    early_stopping: bool = True
    beam_search: bool = False
    lookup: int = 0        # prompt-lookup draft length (0: off)
    lookup_ngram: int = 2
    self_draft: int = 0    # int8 self-draft length (0: off)

    @property
    def draft(self) -> int:
        """Draft tokens a pass checks (0: one token a pass)."""
        return self.lookup or self.self_draft

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no processor that needs the logits (penalty, n-gram ban) and no beams."""
        return not (self.sample or self.penalty or self.ngram or self.beam_search)


def stop_ids(text_cfg, eos_token_id=None) -> np.ndarray:
    """int32 [MAX_STOPS]: the ids that end a row (`eos_token_id`: one id, several, or None for
    the decoder config's eos_token_id and stop_token_ids), padded with -1."""
    if eos_token_id is None:
        ids = (text_cfg.eos_token_id, *text_cfg.stop_token_ids)
    elif isinstance(eos_token_id, (int, np.integer)):
        ids = (int(eos_token_id),)
    else:
        ids = tuple(int(i) for i in eos_token_id)
    if not 0 < len(ids) <= MAX_STOPS:
        raise ValueError(f"eos_token_id: 1 to {MAX_STOPS} stop ids, got {eos_token_id!r}")
    return np.array(ids + (-1,) * (MAX_STOPS - len(ids)), np.int32)


def is_stop(tokens, stops):
    """bool, tokens' shape: which tokens are among `stops` ([MAX_STOPS], or one row of them
    per leading row of `tokens`: [B, MAX_STOPS] for tokens [B, ...])."""
    stops = jnp.asarray(stops)
    if stops.ndim == 2:
        stops = stops.reshape(stops.shape[0], *(1,) * (tokens.ndim - 1), stops.shape[1])
    return (tokens[..., None] == stops).any(-1)
