"""Continuous batching (`owl_jax.generate.slots`): every request gets, token for token, what
`Generator.generate` gives it alone, whether it starts with others, joins while others decode,
or takes a slot a finished or cancelled request left; greedy and seeded sampling alike."""
import numpy as np
import pytest

from owl_jax import families
from owl_jax.generate import GenerationConfig, Generator
from owl_jax.generate.slots import SlotEngine, SlotRequest
from owl_jax.testing.models import FAST, VOCAB, random_params


def _requests(cfg, rng, n):
    """n prompts of different lengths with 0, 1 or 2 images."""
    t, s = cfg.image_tokens, cfg.vision.image_size
    w = lambda k: rng.integers(3, VOCAB - 1, k).tolist()  # noqa: E731
    out = []
    for i in range(n):
        n_img = i % 3
        ids = [1] + w(2 + i)
        for _ in range(n_img):
            ids += [-1] * t + w(1 + i % 2)
        px = rng.standard_normal((n_img, s, s, 3)).astype(np.float32) if n_img else None
        out.append((ids, px))
    return out


def _alone(gen, ids, px, req):
    gc = GenerationConfig(max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                          top_p=req.top_p, seed=req.seed, self_draft_tokens=0,
                          eos_token_id=req.eos_token_id)
    return gen.generate([ids], px, gc)[0]


def _run(engine, pending, join_after):
    """Admits pending[i] once `join_after[i]` steps have run (and a slot is free); steps until
    all are done."""
    steps, waiting = 0, list(range(len(pending)))
    while waiting or engine.busy:
        ready = [i for i in waiting if join_after[i] <= steps][:engine.free]
        engine.admit([pending[i] for i in ready])
        waiting = [i for i in waiting if i not in ready]
        engine.step()
        steps += 1


@pytest.mark.parametrize("name", ["owl1", "llava", "owl3"])
def test_slots_match_generate_token_for_token(name):
    """owl3 keeps its images outside the sequence: every slot holds a visual context (of
    max_views images), text-only requests included."""
    cfg = families.get(name).tiny(vocab_size=VOCAB, num_key_value_heads=2)
    params = random_params(cfg, seed=5)
    gen = Generator(cfg, params, compiler_options=FAST)
    rng = np.random.default_rng(1)
    prompts = _requests(cfg, rng, 7)
    budgets = [9, 4, 12, 6, 10, 3, 8]
    reqs = [SlotRequest(ids, px, max_new_tokens=b, eos_token_id=-1,
                        temperature=0.8 if i in (2, 5) else 0.0, top_p=0.9 if i == 2 else 1.0,
                        seed=11 * i)
            for i, ((ids, px), b) in enumerate(zip(prompts, budgets))]
    for i in (1, 3, 4):  # these stop at an EOS of their own: their third free-running token
        reqs[i].eos_token_id = _alone(gen, *prompts[i], reqs[i]).token_ids[2]
    reqs[4].eos_token_id = (VOCAB + 7, reqs[4].eos_token_id)   # several stop ids
    engine = SlotEngine(gen, slots=3, steps_per_call=2, prefill_rows=2, max_views=4)
    assert engine.visual == (name == "owl3")
    # three start together, the rest join mid-way (as slots free up)
    _run(engine, reqs, join_after=[0, 0, 0, 1, 2, 2, 5])
    reasons = set()
    for i, ((ids, px), r) in enumerate(zip(prompts, reqs)):
        want = _alone(gen, ids, px, r)
        assert r.tokens == want.token_ids, (name, i)
        assert r.finish_reason == want.finish_reason, (name, i)
        reasons.add(r.finish_reason)
    assert reasons == {"eos", "length"}  # both stop conditions were exercised
    assert engine.free == 3 and not engine.busy


def test_cancel_frees_the_slot_and_the_next_request_is_unaffected():
    cfg = families.get("owl1").tiny(vocab_size=VOCAB, num_key_value_heads=2)
    gen = Generator(cfg, random_params(cfg, seed=2), compiler_options=FAST)
    rng = np.random.default_rng(3)
    (a_ids, a_px), (b_ids, b_px) = _requests(cfg, rng, 2)
    engine = SlotEngine(gen, slots=1, steps_per_call=3)
    a = SlotRequest(a_ids, a_px, max_new_tokens=30, eos_token_id=-1)
    engine.admit([a])
    engine.step()
    assert engine.free == 0 and engine.cancel(a) and engine.free == 1
    assert a.finish_reason == "cancelled" and not engine.cancel(a)
    b = SlotRequest(b_ids, b_px, max_new_tokens=7, eos_token_id=-1)
    engine.admit([b])  # takes the slot a left, with a's stale cache beyond its prompt
    while engine.busy:
        engine.step()
    assert b.tokens == _alone(gen, b_ids, b_px, b).token_ids
    with pytest.raises(ValueError, match="context is"):
        engine.check(SlotRequest([1] * cfg.text.max_position_embeddings))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava", "owl3"])
def test_slots_with_tensor_sharded_params_match_generate(tmp_path, name):
    """Params restored into a 2-way `tensor` sharding (2 host CPU devices, a subprocess): the
    slot engine gives the single-device generate's tokens, requests joining mid-way (owl3:
    its visual context computed and kept on the sharded model too)."""
    import os
    import subprocess
    import sys
    import textwrap
    from owl_jax.checkpoint import save_checkpoint
    cfg = families.get(name).tiny(vocab_size=VOCAB, num_key_value_heads=2)
    params = random_params(cfg, seed=4)
    save_checkpoint(str(tmp_path / "ckpt"), params, cfg)
    gen = Generator(cfg, params, compiler_options=FAST)
    prompts = _requests(cfg, np.random.default_rng(6), 3)
    np.savez(tmp_path / "prompts.npz", *[np.asarray(ids) for ids, _ in prompts],
             *[np.zeros((0,)) if px is None else px for _, px in prompts])
    want = [_alone(gen, ids, px, SlotRequest(ids, px, max_new_tokens=6, eos_token_id=-1))
            .token_ids for ids, px in prompts]
    want[0] = want[0][:3]  # the first stops early, so the third joins while the second decodes
    code = textwrap.dedent(f"""
        import numpy as np, owl_jax
        from owl_jax.sharding import make_mesh
        from owl_jax.generate.slots import SlotEngine, SlotRequest
        owl = owl_jax.load_pretrained({str(tmp_path / "ckpt")!r}, dtype="float32",
                                      mesh=make_mesh(data=1, fsdp=1, tensor=2),
                                      compiler_options={FAST!r})
        k = owl.params["language_model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert len(k.sharding.device_set) == 2 and not k.is_fully_replicated, k.sharding
        f = np.load({str(tmp_path / "prompts.npz")!r})
        px = [f[f"arr_{{i + 3}}"] for i in range(3)]
        reqs = [SlotRequest(f[f"arr_{{i}}"].tolist(), px[i] if px[i].size else None,
                            max_new_tokens=6, eos_token_id=-1) for i in range(3)]
        reqs[0].max_new_tokens = 3
        engine = SlotEngine(owl.generator, slots=2, steps_per_call=2)
        engine.admit(reqs[:2])
        engine.step()
        while engine.busy:
            if engine.free and reqs[2].id < 0:
                engine.admit(reqs[2:])
            engine.step()
        print([r.tokens for r in reqs])
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(want)
