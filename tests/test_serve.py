"""owl-serve over real HTTP on tiny random checkpoints (owl1, LLaVA, mPLUG-Owl3): the official
`openai` client streamed and not, with and without images, answers equal to `load_pretrained(...)
.generate` on the same conversation; bad requests answered 4xx with OpenAI's error body while
other requests go on; the bounded queue (429) and shutdown (503); 100 concurrent streams with
half of them dropped (the rest complete, no slot leaks); a non-streamed request whose client
leaves frees its slot."""
import asyncio
import base64
import io
import json
import re
import threading
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest
from PIL import Image

import owl_jax
from owl_jax import families
from owl_jax.checkpoint import save_checkpoint
from owl_jax.generate.slots import SlotEngine
from owl_jax.serve.app import ServeOptions, create_app
from owl_jax.serve.background import BackgroundServer
from owl_jax.serve.scheduler import Scheduler
from owl_jax.testing.bpe import write_tokenizer
from owl_jax.testing.models import FAST, random_params

pytestmark = pytest.mark.xdist_group("serve")  # one worker builds the servers once


def png_data_url(seed: int, size=(40, 30)) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_of(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


class Served:
    def __init__(self, pipeline, scheduler, url, name):
        self.owl, self.scheduler, self.url, self.name = pipeline, scheduler, url, name

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def expected(self, question: str, images=(), max_tokens=8) -> str:
        """What the offline pipeline answers the same one-turn conversation."""
        prompt = self.owl.family.build_prompt(question, len(images))
        return self.owl.generate(prompt, [image_of(u) for u in images],
                                 max_new_tokens=max_tokens, self_draft_tokens=0).text


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, tokenizer_dir):
    made = {}

    def get(name):
        if name not in made:
            tok_dir, kw = tokenizer_dir, {}
            if name == "owl3":  # a Qwen2-style BPE tokenizer.json and its special ids
                tok_dir = str(tmp_path_factory.mktemp("bpe"))
                write_tokenizer(tok_dir)
                tok = families.get(name).load_tokenizer(tok_dir)
                kw = dict(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                          bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
            cfg = families.get(name).tiny(**{"vocab_size": 384, "num_key_value_heads": 2,
                                             **kw})
            path = str(tmp_path_factory.mktemp(name))
            save_checkpoint(path, random_params(cfg, seed=1), cfg, tokenizer_dir=tok_dir)
            made[name] = owl_jax.load_pretrained(path, compiler_options=FAST)
        return made[name]
    return get


@pytest.fixture(scope="module")
def serve(pipelines):
    """serve(family, **engine/queue/options knobs) -> a running `Served` (cached per knobs)."""
    running, stack = {}, []

    def start(name, slots=4, max_queue=64, engine_cls=SlotEngine, **options):
        key = (name, slots, max_queue, engine_cls, tuple(sorted(options.items())))
        if key not in running:
            owl = pipelines(name)
            engine = engine_cls(owl.generator, slots=slots, steps_per_call=2)
            engine.warmup()
            scheduler = Scheduler(engine, max_queue=max_queue)
            app = create_app(owl, scheduler, ServeOptions(model_name=f"tiny-{name}", **options))
            server = BackgroundServer(app).__enter__()
            stack.append(server)
            running[key] = Served(owl, scheduler, server.url, f"tiny-{name}")
        return running[key]
    yield start
    for server in stack:
        server.__exit__(None, None, None)


@pytest.mark.parametrize("name", ["owl1", "llava", "owl3"])
def test_openai_client_streamed_and_not_with_and_without_images(serve, name):
    """owl3 (images outside the sequence, a cut image's tiles as views): every slot keeps a
    visual context; requests with and without images share the slots."""
    s = serve(name)
    client = s.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [s.name]
    img = png_data_url(1)
    cases = [("Describe the weather.", []), ("What is in the picture?", [img])]
    for question, images in cases:
        content = ([{"type": "image_url", "image_url": {"url": u}} for u in images]
                   + [{"type": "text", "text": question}])
        messages = [{"role": "user", "content": content}]
        want = s.expected(question, images)
        assert want  # not vacuous
        out = client.chat.completions.create(model=s.name, messages=messages, max_tokens=8,
                                             temperature=0)
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == want, (name, question)
        assert out.choices[0].finish_reason in ("stop", "length")
        u = out.usage
        assert u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens
        batch = s.owl.prepare(s.owl.family.build_prompt(question, len(images)),
                              [image_of(u) for u in images])   # Owl3: a cut image's text
        assert u.prompt_tokens == int(np.sum(batch["attention_mask"]))
        chunks = list(client.chat.completions.create(
            model=s.name, messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({c.id for c in chunks}) == 1
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices
                   and c.choices[0].finish_reason]
        assert reasons == [out.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == u.total_tokens
    # a multi-turn conversation with a system message, seeded sampling reproducible, stop
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "More?"}]
    draws = [client.chat.completions.create(model=s.name, messages=conv, max_tokens=10,
                                            temperature=0.9, top_p=0.9, seed=7)
             .choices[0].message.content for _ in range(2)]
    assert draws[0] == draws[1]
    full = client.chat.completions.create(model=s.name, messages=conv, max_tokens=12,
                                          temperature=0).choices[0].message.content
    stop = full.strip()[3:5]
    assert stop
    cut = client.chat.completions.create(model=s.name, messages=conv, max_tokens=12,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)]


def _post(url, body, timeout=120):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=data,
                      headers={"Content-Type": "application/json"}, timeout=timeout)


def test_bad_requests_get_4xx_and_never_disturb_others(serve, tmp_path):
    s = serve("owl1", max_images=2, allowed_local_media_path=str(tmp_path / "media"))
    (tmp_path / "media").mkdir()
    Image.new("RGB", (30, 30), (200, 10, 10)).save(tmp_path / "media" / "red.png")
    (tmp_path / "secret.png").write_bytes(b"x")
    user = lambda content: {"messages": [{"role": "user", "content": content}]}  # noqa: E731
    img = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    not_image = "data:image/png;base64," + base64.b64encode(b"plain text, not a png").decode()
    long_text = " ".join(["word"] * 400)
    bad = [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, None, None),
        ({**user("hi"), "foo": 1}, 400, "unknown_field", "foo"),
        ({**user("hi"), "temperature": 3}, 400, "invalid_value", "temperature"),
        ({**user("hi"), "top_p": 0}, 400, "invalid_value", "top_p"),
        ({**user("hi"), "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ({**user("hi"), "max_tokens": "8"}, 400, "invalid_type", "max_tokens"),
        ({**user("hi"), "n": 2}, 400, "unsupported_value", "n"),
        ({**user("hi"), "stream_options": {"include_usage": True}}, 400, "invalid_value",
         "stream_options"),
        ({**user("hi"), "model": "gpt-4"}, 404, "model_not_found", "model"),
        ({"messages": []}, 400, "invalid_value", "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value",
         "messages[0].role"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value", None),
        (user([img("data:image/png;base64,@@@")]), 400, "invalid_image_url", None),
        (user([img("data:text/plain;base64,aGk=")]), 400, "invalid_image_url", None),
        (user([img(not_image)]), 400, "invalid_image", "messages[0].content[0].image_url.url"),
        (user([img("https://example.com/cat.png")]), 400, None, None),
        (user([img(str(tmp_path / "secret.png"))]), 400, "invalid_image_url", None),
        (user([img(str(tmp_path / "media" / ".." / "secret.png"))]), 400,
         "invalid_image_url", None),
        (user([img(png_data_url(i)) for i in range(3)]), 400, "too_many_images", None),
        (user(long_text), 400, "context_length_exceeded", "messages"),
    ]
    # a long stream runs all along; it must end as it would alone
    want = s.expected("Tell me a story.", max_tokens=60)
    result = {}

    def long_stream():
        chunks = s.client().chat.completions.create(
            model=s.name, messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=60, temperature=0, stream=True)
        result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks)
    t = threading.Thread(target=long_stream)
    t.start()
    for body, status, code, param in bad:
        r = _post(s.url, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
        if code:
            assert err["code"] == code, (body, err)
        if param:
            assert err["param"] == param, (body, err)
    # the openai client raises its matching exception classes
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        s.client().chat.completions.create(model=s.name, messages=[{"role": "user",
                                                                    "content": "hi"}],
                                           extra_body={"bogus": True})
    with pytest.raises(openai.NotFoundError):
        s.client().chat.completions.create(model="other", messages=[{"role": "user",
                                                                     "content": "hi"}])
    # a local file under the allowed directory is read
    ok = _post(s.url, user([img(str(tmp_path / "media" / "red.png")), {"type": "text",
                                                                       "text": "Color?"}]))
    assert ok.status_code == 200, ok.text
    t.join(120)
    assert result["text"] == want


class SlowEngine(SlotEngine):
    """A step that takes at least 50 ms, so that requests stay in their slots a while."""

    def step(self):
        time.sleep(0.05)
        return super().step()


def test_queue_full_answers_429_and_a_closed_scheduler_503(serve):
    s = serve("owl1", slots=1, max_queue=1, engine_cls=SlowEngine)
    body = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 60,
            "temperature": 0}
    done = []
    threads = [threading.Thread(target=lambda: done.append(_post(s.url, body).status_code))]
    threads[0].start()
    deadline = time.monotonic() + 60
    while s.metrics()["owl_requests_running"] < 1:  # the first holds the one slot
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threads.append(threading.Thread(target=lambda: done.append(_post(s.url, body).status_code)))
    threads[1].start()
    while s.metrics()["owl_requests_waiting"] < 1:  # the second waits in the queue
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = _post(s.url, body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        s.client().chat.completions.create(model=s.name, **body)
    for t in threads:
        t.join(120)
    assert done == [200, 200]
    assert s.metrics()['owl_requests_rejected_total{reason="queue_full"}'] == 2
    s.scheduler.close(60)
    r = _post(s.url, body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(s.url + "/health").status_code == 503


def test_100_streams_half_cancelled_complete_and_free_their_slots(serve):
    s = serve("owl1", slots=8, max_queue=200)
    questions = ["Hello", "What now?", "Tell me more."]
    want = {q: s.expected(q, max_tokens=12) for q in questions}

    async def one(client, i):
        q = questions[i % 3]
        body = {"messages": [{"role": "user", "content": q}], "max_tokens": 12,
                "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            text, done = "", False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["delta"].get("content") or ""
                if i % 2 and chunk["choices"][0]["delta"].get("role"):
                    return None  # drop the stream after its first chunk
            assert done
            return text == want[q]

    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=s.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))
    results = asyncio.run(main())
    assert results.count(None) == 50 and results.count(True) == 50
    deadline = time.monotonic() + 60
    while True:
        m = s.metrics()
        if m["owl_requests_running"] == 0 and m["owl_requests_waiting"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert s.scheduler.engine.free == 8
    # the counters saw the 50 completed answers: their tokens and first-token times
    assert m["owl_generation_tokens_total"] >= 50 and m["owl_slots"] == 8
    assert m["owl_time_to_first_token_seconds_count"] >= 50
    assert m['owl_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        m["owl_time_to_first_token_seconds_count"]
    assert m['owl_request_success_total{finish_reason="cancelled"}'] > 0
    # the server still answers, with all its slots
    out = s.client().chat.completions.create(
        model=s.name, messages=[{"role": "user", "content": "Hello"}], max_tokens=12,
        temperature=0)
    assert out.choices[0].message.content == want["Hello"]


def test_a_client_that_leaves_a_non_streamed_request_frees_its_slot(serve):
    s = serve("owl1", slots=1, engine_cls=SlowEngine)
    body = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 100}
    with pytest.raises(httpx.ReadTimeout):  # 100 tokens take >= 50 steps of 50 ms
        _post(s.url, body, timeout=httpx.Timeout(120, read=0.5))
    deadline = time.monotonic() + 2.0  # well before the request would have ended itself
    while s.metrics()["owl_requests_running"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert s.metrics()['owl_request_success_total{finish_reason="cancelled"}'] == 1
