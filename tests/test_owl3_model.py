"""mPLUG-Owl3 against the official code (tests/golden/owl3, made by make_golden.py there with
tiny random weights, both versions), and its Qwen2 / SigLIP parts against transformers."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.convert import owl3 as owl3_convert
from owl_jax.families.owl3 import config as owl3_config
from owl_jax.families.owl3.model import Owl3, media_id

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "owl3")
# a cut image's three tiles, one image first, no image, three images, an 8-frame video (241101:
# between its frame markers)
CASES = ("three_tiles", "leading_image", "text_only", "three_images", "video_frames")


def load_golden(version):
    d = os.path.join(GOLDEN, version)
    cfg = owl3_convert.load_config(d)
    params = owl3_convert.read_params(d, cfg)
    cases = np.load(os.path.join(d, "cases.npz"))
    return cfg, params, cases


def marked_ids(cases, name):
    """The golden row with each placeholder's first token marked as a media slot."""
    ids = cases[f"{name}/input_ids"].astype(np.int64).copy()
    for s in cases[f"{name}/starts"]:
        ids[s] = media_id(ids[s])
    return ids.astype(np.int32)


def pixels(cases, name):
    key = f"{name}/pixel_values"
    return cases[key].transpose(0, 2, 3, 1) if key in cases else None


@pytest.mark.parametrize("version", ["240728", "241101"])
def test_forward_matches_official(version):
    cfg, params, cases = load_golden(version)
    assert cfg.version == version
    model = Owl3(cfg)
    for name in CASES:
        ids = marked_ids(cases, name)[None]
        px = pixels(cases, name)
        if px is not None:
            emb = model.apply({"params": params}, jnp.asarray(px), method="encode_images")
            np.testing.assert_allclose(np.asarray(emb), cases[f"{name}/image_embeds"],
                                       atol=2e-5, rtol=1e-5)
        logits = model.apply({"params": params}, jnp.asarray(ids),
                             None if px is None else jnp.asarray(px))
        np.testing.assert_allclose(np.asarray(logits)[0], cases[f"{name}/logits"][0],
                                   atol=1e-4, rtol=1e-4, err_msg=f"{version} {name}")


@pytest.mark.parametrize("version,blocks", [("240728", False), ("241101", False),
                                            ("240728", True), ("241101", True)])
def test_engine_greedy_matches_official_and_padded_rows(version, blocks, monkeypatch):
    """owl_jax.generate.Generator (visual K/V computed once at prefill, read by every step)
    gives the official generate's greedy tokens; in a left-padded batch with different image
    counts every row gives what it gives alone. With `blocks`, the prefill encodes two
    images at a time (the last chunk overlapping) and every prefill attention runs block by
    block (owl_jax.layers.blockwise, blocks that do not divide the lengths)."""
    from owl_jax.families.owl3 import model as owl3_model
    from owl_jax.generate import GenerationConfig, Generator
    from owl_jax.generate.config import stop_ids
    from owl_jax.layers import blockwise
    from owl_jax.testing.models import FAST
    if blocks:
        for name, value in (("MIN_BLOCKWISE", 0), ("Q_BLOCK", 4), ("K_BLOCK", 6)):
            monkeypatch.setattr(blockwise, name, value)
        monkeypatch.setattr(owl3_model, "IMAGE_CHUNK", 2)
    cfg, params, cases = load_golden(version)
    gen = Generator(cfg, params, compiler_options=FAST)
    gc = GenerationConfig(max_new_tokens=6)  # the official terminators: eos and <|endoftext|>
    stops = set(stop_ids(cfg.text).tolist())
    rows = [marked_ids(cases, n).tolist() for n in CASES]
    px = [pixels(cases, n) for n in CASES]
    alone = []
    for name, row, p in zip(CASES, rows, px):
        got = gen.generate([row], p, gc)[0].token_ids
        want = cases[f"{name}/tokens"].tolist()
        want = want[:min([want.index(t) for t in stops if t in want] or [len(want)])]
        assert got == want, (version, name)
        alone.append(got)
    order = [2, 0, 1, 4, 3]  # text-only first: image rows left-padded by different amounts
    batch_px = np.concatenate([px[i] for i in order if px[i] is not None])
    together = gen.generate([rows[i] for i in order], batch_px, gc)
    assert [g.token_ids for g in together] == [alone[i] for i in order]
