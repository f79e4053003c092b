"""`POST /v1/chat/completions` bodies: every field checked, unknown ones refused, the messages
turned into the turns and images a family's template takes (`Family.build_prompt`).

Messages: optional `system` messages first (their text opens the first user turn, since each
family's template has a system line of its own), then user and assistant turns alternating
from user to user (consecutive messages of one role are joined by a newline). User content is
a string or a list of `text` / `image_url` parts; the template puts every image of the
conversation before the first question, as the families were trained.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

from owl_jax.serve.errors import bad_request

# fields accepted only at the value that means "off"
_OFF = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
        "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},),
        "tools": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},),
        "parallel_tool_calls": (False,)}
_KNOWN = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "seed", "stop", "stream", "stream_options", "user", *_OFF}
MAX_STOP = 4


@dataclasses.dataclass
class ChatRequest:
    turns: list[str]                    # user, assistant, ..., user
    images: list[tuple[str, str]]       # (url, its param path) in order
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _number(body, name, lo, hi, integer=False, lo_open=False):
    v = body[name]
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
    if integer:
        ok = ok and float(v).is_integer()
    if not ok:
        raise bad_request(f"{name} must be {'an integer' if integer else 'a number'}, got "
                          f"{v!r}", name, "invalid_type")
    if v < lo or (lo_open and v == lo) or v > hi:
        lo_text = f"> {lo}" if lo_open else f">= {lo}"
        raise bad_request(f"{name} must be {lo_text} and <= {hi}, got {v}", name,
                          "invalid_value")
    return int(v) if integer else float(v)


def parse(body: dict[str, Any]) -> ChatRequest:
    for name in body:
        if name not in _KNOWN:
            raise bad_request(f"unknown field {name!r}", name, "unknown_field")
    for name, off in _OFF.items():
        if body.get(name) is not None and body[name] not in off:
            raise bad_request(f"{name}={body[name]!r} is not supported by this server (only "
                              f"{off[0]!r})", name, "unsupported_value")
    turns, images = _messages(body.get("messages"))
    req = ChatRequest(turns=turns, images=images)
    if body.get("model") is not None:
        if not isinstance(body["model"], str):
            raise bad_request("model must be a string", "model", "invalid_type")
        req.model = body["model"]
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            req.max_tokens = _number(body, name, 1, 2**31 - 1, integer=True)
            break
    if body.get("temperature") is not None:
        req.temperature = _number(body, "temperature", 0, 2)
    if body.get("top_p") is not None:
        req.top_p = _number(body, "top_p", 0, 1, lo_open=True)
    if body.get("seed") is not None:
        req.seed = _number(body, "seed", -2**63, 2**64 - 1, integer=True)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stop, list) or len(stop) > MAX_STOP
                or not all(isinstance(s, str) and s for s in stop)):
            raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} "
                              "of them", "stop", "invalid_value")
        req.stop = stop
    if body.get("stream") is not None:
        if not isinstance(body["stream"], bool):
            raise bad_request("stream must be true or false", "stream", "invalid_type")
        req.stream = body["stream"]
    opts = body.get("stream_options")
    if opts is not None:
        if not req.stream:
            raise bad_request("stream_options can only be given with stream=true",
                              "stream_options", "invalid_value")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(
                opts.get("include_usage", False), bool):
            raise bad_request("stream_options must be {\"include_usage\": true|false}",
                              "stream_options", "invalid_value")
        req.include_usage = opts.get("include_usage", False)
    return req


def _content(content, param: str, role: str, images: list) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param,
                          "invalid_type")
    texts = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                raise bad_request(f"{p} must be {{\"type\": \"text\", \"text\": str}}", p,
                                  "invalid_value")
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{p}: only user messages may hold images", p,
                                  "invalid_value")
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if (not isinstance(url, str) or set(part) - {"type", "image_url"}
                    or (isinstance(spec, dict) and set(spec) - {"url", "detail"})):
                raise bad_request(f"{p} must be {{\"type\": \"image_url\", \"image_url\": "
                                  f"{{\"url\": str}}}}", p, "invalid_value")
            images.append((url, f"{p}.image_url.url"))
        else:
            raise bad_request(f"{p}: content parts must be of type 'text' or 'image_url'", p,
                              "invalid_value")
    return "\n".join(texts)


def _messages(messages) -> tuple[list[str], list[tuple[str, str]]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages", "invalid_value")
    system, turns, roles, images = [], [], [], []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise bad_request(f"{p} must be an object with 'role' and 'content'", p,
                              "invalid_value")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad_request(f"{p}: unknown field {sorted(extra)[0]!r}", p, "unknown_field")
        role = m["role"]
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{p}.role must be system, user or assistant, got {role!r}",
                              f"{p}.role", "invalid_value")
        text = _content(m["content"], f"{p}.content", role, images)
        if role in ("system", "developer"):
            if turns:
                raise bad_request(f"{p}: system messages must come before the conversation",
                                  p, "invalid_value")
            system.append(text)
        elif roles and roles[-1] == role:
            turns[-1] += "\n" + text
        else:
            if not roles and role != "user":
                raise bad_request(f"{p}: the conversation must start with a user message", p,
                                  "invalid_value")
            turns.append(text)
            roles.append(role)
    if not roles or roles[-1] != "user":
        raise bad_request("the last message must be the user's", "messages", "invalid_value")
    if system:
        turns[0] = "\n".join(system + [turns[0]])
    return turns, images
