"""owl_jax.train pieces against independent references, in-process on one CPU device.

- AdamW + clipping + weight-decay mask + warm-up/linear schedule == torch.optim.AdamW +
  clip_grad_norm_ + transformers.get_linear_schedule_with_warmup (what the official script ran);
  cosine == transformers.get_cosine_schedule_with_warmup.
- The loss == torch CrossEntropyLoss over labels set to -100 outside the mask (upstream's way);
  an all-zero mask gives 0 (upstream: NaN) and zero, finite gradients.
- The train step: frozen params bit-identical after training, no optimizer state for them;
  gradient accumulation (2 micro batches) == one batch; step-1 loss == the loss recomputed in
  numpy from the model's logits.
- Trainable patterns: a typo is an error; analytic FLOPs of the forward == XLA's count.
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from owl_jax.configs.owl1 import tiny_stage1  # noqa: E402
from owl_jax import sharding as sh  # noqa: E402
from owl_jax.train import flops as flops_lib  # noqa: E402
from owl_jax.train import loss as loss_lib  # noqa: E402
from owl_jax.train import optimizer as opt_lib  # noqa: E402
from owl_jax.train import state as state_lib  # noqa: E402
from owl_jax.train import step as step_lib  # noqa: E402
from owl_jax.train import trainable as tr  # noqa: E402
from owl_jax.train.synthetic import SyntheticBatches  # noqa: E402


def opt_config(**kw):
    base = dict(lr=1e-2, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.1, clip_norm=0.5,
                warmup_steps=2, decay="linear", end_lr_ratio=0.0,
                no_decay=("(^|/)bias$", "(^|/)scale$"))
    return ml_collections.ConfigDict({**base, **kw})


@pytest.mark.parametrize("lr_scale", [(), (("^dense/", 0.1),)])
def test_adamw_clip_decay_schedule_match_torch_and_hf(lr_scale):
    """AdamW + clipping + the warm-up / linear schedule as torch + HF compute them; lr_scale
    as a torch param group with its own lr (LLaVA's projector lr)."""
    from transformers import get_linear_schedule_with_warmup
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                        "bias": rng.normal(size=(3,)).astype(np.float32)},
              "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}}
    total = 6
    tx, schedule = opt_lib.make_optimizer(opt_config(lr_scale=lr_scale), total)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in tr.flatten(params).items()}
    dense_lr = 1e-2 * (0.1 if lr_scale else 1.0)
    groups = [{"params": [tp["dense/kernel"]], "weight_decay": 0.1, "lr": dense_lr},
              {"params": [tp["dense/bias"]], "weight_decay": 0.0, "lr": dense_lr},
              {"params": [tp["norm/scale"]], "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    sched = get_linear_schedule_with_warmup(topt, 2, total)
    for s in range(total):
        g = {k: rng.normal(size=v.shape).astype(np.float32) * (3 if s == 1 else 1)
             for k, v in tr.flatten(params).items()}
        assert float(schedule(s)) == pytest.approx(sched.get_last_lr()[2], rel=1e-6, abs=1e-12)
        updates, state = tx.update(jax.tree.map(jnp.asarray, tr.unflatten(g)), state, p)
        p = optax.apply_updates(p, updates)
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.5)
        topt.step()
        sched.step()
        for k, t in tp.items():
            np.testing.assert_allclose(np.asarray(tr.flatten(p)[k]), t.detach().numpy(),
                                       rtol=2e-5, atol=2e-6, err_msg=f"{k} step {s}")


def test_cosine_schedule_matches_hf():
    from transformers import get_cosine_schedule_with_warmup
    total, warm = 50, 7
    schedule = opt_lib.make_schedule(opt_config(decay="cosine", warmup_steps=warm), total)
    topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = get_cosine_schedule_with_warmup(topt, warm, total)
    for s in range(total):
        assert float(schedule(s)) == pytest.approx(sched.get_last_lr()[0], rel=1e-5, abs=1e-9)
        topt.step()
        sched.step()


def test_loss_matches_torch_ignore_index_and_zero_mask_is_zero():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 7)).astype(np.int32)
    targets[0, 0] = -1  # an image slot: garbage where the mask is 0
    mask = (rng.random((3, 7)) < 0.5).astype(np.float32)
    mask[0, 0] = 0
    labels = torch.tensor(np.where(mask > 0, targets, -100), dtype=torch.long)
    want = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64)
                                             .reshape(-1, 11), labels.reshape(-1),
                                             ignore_index=-100)
    got = loss_lib.official_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    assert float(got) == pytest.approx(float(want), rel=1e-6)

    zero = jnp.zeros_like(jnp.asarray(mask))
    val, grad = jax.value_and_grad(loss_lib.official_loss)(jnp.asarray(logits),
                                                           jnp.asarray(targets), zero)
    assert float(val) == 0.0 and bool(jnp.all(grad == 0))


def test_trainable_split_merge_and_typos():
    params = {"vision_model": {"a": {"kernel": np.ones((2, 2))}}, "query_tokens": np.ones(3),
              "language_model": {"layers_0": {"q_proj": {"kernel": np.ones(2),
                                                         "lora_a": np.ones(1)}}}}
    t, f = tr.split(params, tr.STAGE1[:2])
    assert tr.paths(t) == ["query_tokens", "vision_model/a/kernel"]
    assert tr.paths(tr.merge(t, f)) == tr.paths(params)
    t, _ = tr.split(params, tr.LORA)
    assert tr.paths(t) == ["language_model/layers_0/q_proj/lora_a"]
    with pytest.raises(ValueError, match="match no parameter"):
        tr.split(params, ("vision/.*",))


# --------------------------------------------------------------------------------------------
# The train step on the tiny model


def _setup(micro: int = 1):
    c = tiny_stage1.get_config()
    c.model.dropout = False
    c.batch.micro_batches = micro
    cfg = state_lib.model_config(c)
    model = state_lib.build_model(c, cfg)
    tx, schedule = opt_lib.make_optimizer(c.optimizer, c.total_steps)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sh.rules_from_config(c.sharding_rules)
    layout = state_lib.make_layout(c, model, cfg, tx, mesh, rules)
    data = SyntheticBatches(num_examples=32, global_batch=c.batch.global_size,
                            seq_len=c.batch.seq_len, image_size=cfg.vision.image_size,
                            image_tokens=cfg.image_tokens, vocab_size=cfg.text.vocab_size,
                            max_images_per_row=c.batch.max_images_per_row)
    batches = []
    for _ in range(3):
        b = next(data)
        b.pop("example_id")
        batches.append(b)
    fn = step_lib.jit_train_step(layout, c, schedule, batches[0])
    return c, layout, fn, batches, mesh, rules


def _run(layout, fn, batches, mesh, rules, state):
    start = jax.device_get(state)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for b in batches:
            state, m = fn(state, sh.global_batch(b, mesh, rules))
            losses.append(jax.device_get(m))
    return start, jax.device_get(state), losses


def test_step_frozen_untouched_accumulation_exact_and_zero_mask():
    c, layout, fn, batches, mesh, rules = _setup(micro=1)
    zero = dict(batches[2], loss_mask=np.zeros_like(batches[2]["loss_mask"]))
    init = state_lib.init_fresh(layout, 0)
    copy = jax.tree.map(jnp.copy, init)  # the step donates its input
    start, end, m1 = _run(layout, fn, batches[:2] + [zero], mesh, rules, init)

    # Frozen: bit-identical, and no optimizer state shaped after them.
    assert tr.leaves_equal(start.frozen, end.frozen)
    assert not tr.leaves_equal(start.trainable, end.trainable)
    assert tr.count(end.opt_state) <= 2 * tr.count(end.trainable) + 16
    assert tr.count(end.frozen) > 0

    # Step-1 loss recomputed in numpy from the model's logits at the initial params.
    b = batches[0]
    apply = jax.jit(layout.model.apply, compiler_options=layout.compiler_options)
    logits = np.asarray(apply({"params": tr.merge(start.trainable, start.frozen)},
                              b["input_ids"], b["pixel_values"], b["segment_ids"],
                              b["positions"]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, np.clip(b["targets"], 0, None)[..., None], -1)[..., 0]
    want = (ce * b["loss_mask"]).sum() / b["loss_mask"].sum()
    assert float(m1[0]["loss"]) == pytest.approx(want, rel=1e-5)

    # All-zero loss mask: loss 0, zero gradient, nothing NaN.
    assert float(m1[2]["loss"]) == 0.0 and float(m1[2]["grad_norm"]) == 0.0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(end.trainable))

    # Gradient accumulation over 2 micro batches == the one-shot step.
    c2 = tiny_stage1.get_config()
    c2.model.dropout = False
    c2.batch.micro_batches = 2
    fn2 = step_lib.jit_train_step(layout, c2, opt_lib.make_schedule(c2.optimizer,
                                                                    c2.total_steps), batches[0])
    _, end2, m2 = _run(layout, fn2, batches[:2] + [zero], mesh, rules, copy)
    for a, bm in zip(m1, m2):
        assert float(bm["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5, abs=1e-7)
        assert float(bm["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-4, abs=1e-7)
    for k, v in tr.flatten(end.trainable).items():
        np.testing.assert_allclose(tr.flatten(end2.trainable)[k], v, rtol=1e-4, atol=1e-6,
                                   err_msg=k)


def test_analytic_forward_flops_match_xla_count():
    """The forward part of the analytic count against XLA's HLO cost analysis of the forward
    (lowered only), on widths where matmuls dominate the elementwise work."""
    from owl_jax.connectors.abstractor import AbstractorConfig
    from owl_jax.families.owl1.config import OwlConfig
    from owl_jax.decoder.llama import TextConfig
    from owl_jax.encoders.vit import VisionConfig
    from owl_jax.families.owl1.model import Owl
    cfg = OwlConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                            num_attention_heads=4, image_size=56, patch_size=14),
        abstractor=AbstractorConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=512, encoder_hidden_size=256),
        text=TextConfig(vocab_size=512, hidden_size=256, intermediate_size=768,
                        num_hidden_layers=2, num_attention_heads=4),
        num_query_tokens=8)
    model = Owl(cfg)
    b, seq = 2, 64
    ids = jnp.ones((b, seq), jnp.int32).at[:, 1:1 + cfg.image_tokens].set(-1)
    px = jnp.zeros((b, 1, 56, 56, 3))
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), ids, px)))
    lowered = jax.jit(lambda p: model.apply(p, ids, px)).lower(params)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    f = [flops_lib.vision_flops(cfg.vision), flops_lib.abstractor_flops(cfg),
         flops_lib.llm_flops(cfg.text, seq)]
    analytic = b * sum(m.weights + m.attention for m in f)
    # XLA computes the causal attention in full (no half), and counts elementwise ops.
    analytic_full_attn = analytic + b * f[2].attention
    assert analytic <= cost["flops"]
    assert cost["flops"] == pytest.approx(analytic_full_attn, rel=0.06)

    # The training multipliers: fully trained = 3x forward; frozen LLM crossed by gradients
    # = 2x its matmuls; frozen module with nothing trainable upstream = 1x.
    full = flops_lib.train_flops_per_step(cfg, global_batch=1, seq_len=seq, images_per_row=1,
                                          trainable={"vision_model", "language_model",
                                                     "abstractor"})
    stage1 = flops_lib.train_flops_per_step(cfg, global_batch=1, seq_len=seq, images_per_row=1,
                                            trainable={"vision_model", "abstractor"})
    llm = f[2]
    assert full["llm"] == pytest.approx(3 * llm.weights + 3 * llm.attention)
    assert stage1["llm"] == pytest.approx(2 * llm.weights + 3 * llm.attention)
    lora = flops_lib.train_flops_per_step(cfg, global_batch=1, seq_len=seq, images_per_row=1,
                                          trainable=set(), lora_rank=4,
                                          lora_targets=("q_proj", "v_proj"))
    assert lora["vision"] == pytest.approx(f[0].weights + f[0].attention)


def test_owl3_stage1_trains_per_image_params_inside_a_frozen_llm():
    """mPLUG-Owl3's stage 1 trains the projector and the hyper layers' v_kv_proj / gate, which
    live under language_model: the LLM is still frozen (crossed by gradients: 2x its
    matmuls), the per-image K/V projection trained (3x)."""
    from owl_jax import families
    cfg = families.get("owl3").tiny()
    seq = 64
    paths = ["vision2text_model/linear_1/kernel",
             "language_model/layers_0/self_attn/v_kv_proj/kernel",
             "language_model/layers_2/self_attn/gate_proj/bias"]
    stage1 = flops_lib.train_flops_per_step(cfg, global_batch=1, seq_len=seq, images_per_row=1,
                                            trainable=paths)
    llm = flops_lib.llm_flops(cfg.text, seq)
    assert stage1["llm"] == pytest.approx(2 * llm.weights + 3 * llm.attention)
    kv = dict((n, m) for n, _, m in families.get("owl3").image_flops(cfg))["hyper_kv"]
    assert kv.weights > 0 and stage1["hyper_kv"] == pytest.approx(3 * kv.weights)
    stage2 = flops_lib.train_flops_per_step(
        cfg, global_batch=1, seq_len=seq, images_per_row=1,
        trainable=paths + ["language_model/layers_1/mlp/up_proj/kernel"])
    assert stage2["llm"] == pytest.approx(3 * llm.weights + 3 * llm.attention)
