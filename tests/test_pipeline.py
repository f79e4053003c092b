"""The grain training pipeline on shards the tests write (img2dataset webdataset -> owl-data
convert -> ArrayRecord; COCO folder + LLaVA json)."""
import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from owl_jax.families.owl1.config import tiny
from owl_jax.data import images as imgs
from owl_jax.data import shard_tools
from owl_jax.data.pipeline import make_train_iterator
from owl_jax.data.sources import open_source
from owl_jax.families.owl1.processor import preprocess_image
from owl_jax.testing import shards
from owl_jax.testing.spm import train_tiny_tokenizer
from owl_jax.tokenizer import OwlTokenizer

OWL = tiny()
N_IMG = OWL.image_tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    wds = shards.write_webdataset(str(root / "wds"), n_shards=2, per_shard=16,
                                  bad=["truncated_image", "undecodable_image", "missing_caption"],
                                  modes=["CMYK", "P"], truncate_last=True)
    shard_tools.convert(f"webdataset:{root}/wds", str(root / "ar"), progress=False)
    coco = shards.write_coco(str(root / "coco"), n_images=4, missing_images=0)
    llava = shards.write_llava(str(root / "llava.json"), sorted(os.listdir(coco["images"])))
    tok = OwlTokenizer(train_tiny_tokenizer(str(root / "tok")))
    return dict(root=str(root), wds=wds, ar=f"arrayrecord:{root}/ar", coco=coco, llava=llava,
                tok=tok, instruct=f"instruct:{root}/llava.json?images={coco['images']}")


def cfg(spec, **kw):
    base = dict(sources=[dict(spec=spec)], seq_len=40, batch_size=1, packing=False,
                max_images_per_row=2, workers=0, threads=1, num_epochs=1, seed=3)
    base.update(kw)
    return base


def take(it, n=None):
    out = []
    try:
        while n is None or len(out) < n:
            out.append(next(it))
    except StopIteration:
        pass
    return out


def captions(batches, tok):
    """The text of every packed sample (its inputs, image slots and BOS skipped)."""
    out = []
    for b in batches:
        for ids, seg in zip(b["input_ids"], b["segment_ids"]):
            out += [tok.decode(ids[seg == s]).strip() for s in range(1, seg.max() + 1)]
    return out


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_one_epoch_sees_every_sample_once(data):
    it = make_train_iterator(cfg(data["ar"]), data["tok"], OWL, 0, 1)
    got = captions(take(it), data["tok"])
    assert collections.Counter(got) == collections.Counter(data["wds"]["samples"].values())
    assert it.dropped == {} and it.source_sizes == {data["ar"]: len(data["wds"]["samples"])}


def test_bad_samples_dropped_and_counted(data):
    spec = f"webdataset:{data['root']}/wds"  # unconverted: read through a tar index
    it = make_train_iterator(cfg(spec), data["tok"], OWL, 0, 1)
    got = captions(take(it), data["tok"])
    assert collections.Counter(got) == collections.Counter(data["wds"]["samples"].values())
    expected = {k: v for k, v in data["wds"]["skipped"].items() if k != "truncated_tar"}
    assert dict(it.dropped) == expected and len(expected) >= 2
    assert dict(it.lost_at_open) == {"truncated_tar": 1}


def test_filters_and_coco_source(data):
    keep = [t for k, t in data["wds"]["samples"].items()
            if data["wds"]["meta"][k]["similarity"] >= 0.3]
    c = cfg(None, sources=[dict(spec=data["ar"], filters={"min_similarity": 0.3})])
    it = make_train_iterator(c, data["tok"], OWL, 0, 1)
    assert collections.Counter(captions(take(it), data["tok"])) == collections.Counter(keep)
    assert dict(it.dropped) == {"filtered_min_similarity": len(data["wds"]["samples"]) - len(keep)}
    coco = f"coco:{data['coco']['annotations']}?images={data['coco']['images']}"
    it = make_train_iterator(cfg(coco), data["tok"], OWL, 0, 1)
    assert sorted(captions(take(it), data["tok"])) == sorted(data["coco"]["samples"].values())


def test_process_shares_equal_disjoint_complete(data):
    everything = collections.Counter(data["wds"]["samples"].values())
    n, pc = sum(everything.values()), 3
    shares = [collections.Counter(captions(take(make_train_iterator(
        cfg(data["ar"]), data["tok"], OWL, pi, pc)), data["tok"])) for pi in range(pc)]
    assert [sum(s.values()) for s in shares] == [n // pc] * pc
    union = shares[0] + shares[1] + shares[2]
    assert sum(union.values()) == n // pc * pc and not (union - everything)


def test_deterministic_and_resume_exact_with_packing(data):
    # chunks of 4: the cuts below fall inside chunks and at their ends
    c = cfg(data["ar"], packing=True, batch_size=3, num_epochs=None, augment=True, chunk=4)
    it = make_train_iterator(c, data["tok"], OWL, 0, 1)
    first = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    rest = take(it, 6)  # 9 batches of ~3 x 2 samples: past the end of the first epoch
    assert sum(int(b["segment_ids"].max(1).sum()) for b in first + rest) > 28
    assert any(b["segment_ids"].max() > 1 for b in first)  # rows really are packed
    again = make_train_iterator(c, data["tok"], OWL, 0, 1)
    assert same(take(again, 9), first + rest)
    resumed = make_train_iterator(c, data["tok"], OWL, 0, 1)
    resumed.set_state(state)
    assert same(take(resumed, 6), rest)
    for cut in (1, 2, 5):  # states inside and at the ends of chunks and packed rows
        it = make_train_iterator(c, data["tok"], OWL, 0, 1)
        take(it, cut)
        state = it.get_state()
        resumed = make_train_iterator(c, data["tok"], OWL, 0, 1)
        resumed.set_state(state)
        assert resumed.get_state() == state
        assert same(take(resumed, 2), (first + rest)[cut:cut + 2])
    other_seed = make_train_iterator({**c, "seed": 4}, data["tok"], OWL, 0, 1)
    assert not same(take(other_seed, 3), first)


def test_epochs_are_reshuffled_permutations(data):
    it = make_train_iterator(cfg(data["ar"], num_epochs=2), data["tok"], OWL, 0, 1)
    got = captions(take(it), data["tok"])
    n = len(data["wds"]["samples"])
    assert len(got) == 2 * n
    assert collections.Counter(got[:n]) == collections.Counter(got[n:])
    assert got[:n] != got[n:]


def test_eval_pixels_match_processor_and_batch_layout(data):
    it = make_train_iterator(cfg(data["ar"], augment=False, batch_size=2), data["tok"], OWL, 0, 1)
    b = next(it)
    # uint8 in the batch; the train step normalizes on the device (normalize_pixels)
    assert b["pixel_values"].shape == (2, 2, 28, 28, 3) and b["pixel_values"].dtype == np.uint8
    originals = {ex["text"]: ex["image"] for ex in open_source(data["ar"])}
    for row, text in enumerate(captions([b], data["tok"])):
        pil = Image.fromarray(originals[text])
        np.testing.assert_array_equal(b["pixel_values"][row, 0],
                                      np.asarray(pil.resize((28, 28), Image.BICUBIC)))
        ref = preprocess_image(pil, 28, OWL.image_mean, OWL.image_std)
        np.testing.assert_array_equal(
            imgs.normalize_pixels(b["pixel_values"][row, 0], OWL.image_mean, OWL.image_std), ref)
        assert not b["pixel_values"][row, 1].any()  # the unused image slot
        ids = b["input_ids"][row]
        assert list(ids[:1 + N_IMG]) == [1] + [-1] * N_IMG
        n = int((b["segment_ids"][row] > 0).sum())
        np.testing.assert_array_equal(b["targets"][row, :n - 1], np.maximum(ids[1:n], 0))
        assert b["loss_mask"][row, :N_IMG].sum() == 0 and b["loss_mask"][row, n - 1] == 1


def test_train_step_normalizes_uint8_pixels_like_the_processor():
    """The batch ships uint8 pixels; the train step's forward normalizes them on the device
    and must compute what the model computes on the processor's float32 pixels."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from owl_jax.families.owl1.model import Owl
    from owl_jax.train import step as step_lib

    rng = np.random.default_rng(0)
    s = OWL.vision.image_size
    pils = [Image.fromarray(shards.natural_image(rng, 40 + 9 * i, 33)) for i in range(2)]
    u8 = np.stack([np.asarray(p.resize((s, s), Image.BICUBIC)) for p in pils])[:, None]
    ref = np.stack([preprocess_image(p, s, OWL.image_mean, OWL.image_std) for p in pils])[:, None]
    on_device = np.asarray(jax.jit(lambda x: imgs.normalize_pixels(
        x, OWL.image_mean, OWL.image_std))(jnp.asarray(u8)))
    assert on_device.dtype == np.float32
    np.testing.assert_allclose(on_device, ref, rtol=0, atol=1e-6)
    assert imgs.normalize_pixels(ref, OWL.image_mean, OWL.image_std) is ref  # float: as is

    L = N_IMG + 4
    ids = np.concatenate([np.ones((2, 1), np.int32), np.full((2, N_IMG), -1, np.int32),
                          rng.integers(3, OWL.text.vocab_size, (2, 3), dtype=np.int32)], 1)
    batch = {"input_ids": ids, "segment_ids": np.ones((2, L), np.int32),
             "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (2, L)),
             "pixel_values": u8}
    model = Owl(OWL)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids, ref)["params"])
    prng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: ((1.0 if str(path[-1].key) == "scale" else 0.0)
                         + prng.normal(0, 0.08, x.shape)).astype(np.float32), shapes)
    got = jax.jit(lambda b: step_lib.forward(model, params, b, train=False))(batch)
    apply = jax.jit(lambda b: model.apply({"params": params}, b["input_ids"], b["pixel_values"],
                                          b["segment_ids"], b["positions"]))
    want = apply(dict(batch, pixel_values=ref))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    # and the pixels matter: raw 0..255 values fed as if normalized would differ
    raw = apply(dict(batch, pixel_values=u8.astype(np.float32)))
    assert np.abs(np.asarray(raw) - np.asarray(want)).max() > 1e-3


def test_random_resized_crop_is_torchvision_recipe():
    rng = np.random.default_rng(0)
    img = Image.fromarray(shards.natural_image(rng, 120, 80))
    boxes = [imgs.crop_box(100, 100, np.random.default_rng(s)) for s in range(300)]
    areas = np.array([w * h for _, _, w, h in boxes]) / (100 * 100)
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert 0.5 - 0.02 <= areas.min() < 0.55 and 0.95 < areas.max() <= 1.0
    assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    assert all(0 <= x and 0 <= y and x + w <= 100 and y + h <= 100 for x, y, w, h in boxes)
    # a 3:2 image: crops of the widest allowed ratio (4/3) at most, full height at most
    boxes = [imgs.crop_box(120, 80, np.random.default_rng(s)) for s in range(100)]
    assert all(x + w <= 120 and y + h <= 80 and w / h <= 4 / 3 + 0.02 for x, y, w, h in boxes)
    flips = 0
    for s in range(40):
        out = imgs.random_resized_crop_flip(img, 32, np.random.default_rng(s))
        r = np.random.default_rng(s)
        x, y, w, h = imgs.crop_box(120, 80, r)
        ref = img.crop((x, y, x + w, y + h)).resize((32, 32), Image.BICUBIC)
        if r.random() < 0.5:
            ref, flips = ref.transpose(Image.FLIP_LEFT_RIGHT), flips + 1
        np.testing.assert_array_equal(out, np.asarray(ref))
    assert 10 <= flips <= 30


@pytest.mark.parametrize("packing", [False, True])
def test_a_pipeline_that_drops_everything_stops_with_the_reasons(data, packing):
    """Rows shorter than one image's slots: every caption sample is dropped. The pipeline (which
    repeats forever) stops after max_consecutive_drops drops in a row, naming the reason, the
    count and the setting to change, instead of reading on silently."""
    from owl_jax.data.pipeline import PipelineStalled
    c = cfg(data["ar"], seq_len=N_IMG, packing=packing, num_epochs=None,
            max_consecutive_drops=50)
    it = make_train_iterator(c, data["tok"], OWL, 0, 1)
    with pytest.raises(PipelineStalled) as e:
        next(it)
    msg = str(e.value)
    assert "dropped 50 samples in a row" in msg and "prompt_too_long x" in msg
    assert f"seq_len={N_IMG} tokens ({N_IMG} per image)" in msg and "seq=N" in msg
    assert data["ar"] in msg
    assert it.dropped["prompt_too_long"] >= 40  # the rest: the shards' bad samples


def test_mixture_weights_and_tasks(data):
    c = cfg(None, sources=[dict(spec=data["ar"], weight=3.0),
                           dict(spec=data["ar"], weight=1.0, task="text")], num_epochs=None)
    rows = take(make_train_iterator(c, data["tok"], OWL, 0, 1), 40)
    with_image = [bool((b["input_ids"] < 0).any()) for b in rows]
    assert sum(with_image) == 30
    for b, img in zip(rows, with_image):
        assert bool(b["pixel_values"].any()) == img
        if not img:  # text task: every token of the text is trained
            n = int((b["segment_ids"][0] > 0).sum())
            assert b["loss_mask"][0, :n].all()


def test_instruction_source(data):
    it = make_train_iterator(cfg(data["instruct"], seq_len=256, batch_size=1), data["tok"], OWL,
                             0, 1)
    rows = take(it)
    assert (dict(it.dropped), dict(it.lost_at_open)) == ({"missing_file": 1}, {})
    assert len(rows) == len(data["llava"]["answers"]) + 1  # + the text-only record
    trained = [data["tok"].decode(b["targets"][0][b["loss_mask"][0] > 0]) for b in rows]
    for answer in data["llava"]["answers"].values():
        assert any(t.startswith(answer) for t in trained)
    for b in rows:
        n_slots = int((b["input_ids"][0] < 0).sum())
        assert n_slots in (0, N_IMG)
        assert bool(b["pixel_values"][0, 0].any()) == (n_slots > 0)
        assert not b["pixel_values"][0, 1].any()


def test_config_errors(data):
    tok = data["tok"]
    with pytest.raises(ValueError, match="sources` is empty"):
        make_train_iterator({"sources": []}, tok, OWL, 0, 1)
    with pytest.raises(ValueError, match="task"):
        make_train_iterator(cfg(None, sources=[dict(spec=data["ar"], task="vqa")]), tok, OWL, 0, 1)
    with pytest.raises(ValueError, match="instruct"):
        make_train_iterator(cfg(None, sources=[dict(spec=data["ar"], task="instruction")]),
                            tok, OWL, 0, 1)
    with pytest.raises(ValueError, match="unknown filter"):
        make_train_iterator(cfg(None, sources=[dict(spec=data["ar"], filters={"min_sim": 1})]),
                            tok, OWL, 0, 1)
    with pytest.raises(ValueError, match="cannot give each"):
        make_train_iterator(cfg(data["ar"]), tok, OWL, 0, 1000)


@pytest.mark.parametrize("packing", [True, False])
def test_workers_give_the_same_stream_and_resume(data, packing):
    """Decoding in 2 worker processes yields exactly the in-process batches (pixels included:
    they cross as one shared-memory array per chunk); a 2-worker state restores into a fresh
    2-worker iterator."""
    c = cfg(data["ar"], packing=packing, batch_size=2, num_epochs=None)
    reference = take(make_train_iterator(c, data["tok"], OWL, 0, 1), 6)
    it = make_train_iterator({**c, "workers": 2}, data["tok"], OWL, 0, 1)
    try:
        got = take(it, 2)
        state = it.get_state()
        got += take(it, 4)
    finally:
        it.close()
    assert same(got, reference)
    resumed = make_train_iterator({**c, "workers": 2}, data["tok"], OWL, 0, 1)
    try:
        resumed.set_state(state)
        assert same(take(resumed, 4), reference[2:])
    finally:
        resumed.close()


def test_stack_pixels_round_trip():
    """A chunk with one-image, two-image, text-only and dropped samples: the worker side packs
    its pixels into one array, the main side gives each sample back its own pixels."""
    from owl_jax.data import grain_stages as st
    rng = np.random.default_rng(0)
    px = [rng.integers(0, 256, (k, 4, 4, 3), dtype=np.uint8) for k in (1, 2, 0)]
    chunk = [{"input_ids": np.arange(3), "pixels": px[0]}, {"drop": "corrupt_image"},
             {"input_ids": np.arange(5), "pixels": px[1]}, {"input_ids": np.arange(2),
                                                            "pixels": px[2]}]
    packed = st.stack_pixels(chunk)
    assert packed["pixels"].shape == (3, 4, 4, 3)
    packed["pixels"].unlink_on_del()  # in a worker, the main process frees the block
    back = st.unstack_pixels(packed)
    assert back[1] == {"drop": "corrupt_image"}
    for i, p in ((0, px[0]), (2, px[1]), (3, px[2])):
        np.testing.assert_array_equal(back[i]["pixels"], p)
        np.testing.assert_array_equal(back[i]["input_ids"], chunk[i]["input_ids"])
    assert st.unstack_pixels(chunk) is chunk  # in-process chunks pass through
    text_only = [{"input_ids": np.arange(2), "pixels": px[2]}, {"drop": "empty_text"}]
    back = st.unstack_pixels(st.stack_pixels(text_only))
    assert back[0]["pixels"].shape == (0, 4, 4, 3)  # BatchRows copies it into [0, S, S, 3]


def test_process_share_is_grains_shuffle_and_strided_share():
    """ProcessShare == grain's source.shuffle[:share*count][index::count].repeat chain for
    sources of 2**16+ samples; below that, each epoch is a fresh permutation split into equal,
    disjoint, strided shares."""
    import grain
    from owl_jax.data.grain_stages import ProcessShare
    n, count, epochs = 70_001, 3, 2
    seq = range(n)
    share = n // count
    for index in range(count):
        ref = grain.MapDataset.source(seq).shuffle(seed=77)[:share * count][index::count]
        ref = ref.repeat(epochs)
        mine = ProcessShare(seq, 77, index, count, epochs)
        assert len(mine) == len(ref) == epochs * share
        probe = list(range(0, len(ref), 997)) + [share - 1, share, len(ref) - 1]
        assert [mine[i] for i in probe] == [ref[i] for i in probe]
    n, count = 400, 3
    shares = [ProcessShare(range(n), 5, i, count, None) for i in range(count)]
    epoch = [[s[e * (n // count) + r] for s in shares for r in range(n // count)]
             for e in range(2)]
    for e in epoch:
        assert len(set(e)) == len(e) == (n // count) * count and set(e) <= set(range(n))
    assert epoch[0] != epoch[1]
    assert ProcessShare(range(n), 5, 1, count, None)[7] == shares[1][7]  # deterministic


@pytest.mark.parametrize("batch_size", [3, 4])
def test_every_row_pairs_its_caption_with_its_own_image(data, batch_size):
    """With samples dropped inside the pipeline (the webdataset's planted bad ones) and several
    rows per batch, each row's pixels are its own caption's image, in every batch."""
    spec = f"webdataset:{data['root']}/wds/*.tar"
    originals = {ex["text"]: ex["image"] for ex in open_source(spec)}
    rows = 0
    for b in take(make_train_iterator(cfg(spec, augment=False, batch_size=batch_size),
                                      data["tok"], OWL, 0, 1)):
        for row, text in enumerate(captions([b], data["tok"])):
            want = Image.fromarray(originals[text]).resize((28, 28), Image.BICUBIC)
            np.testing.assert_array_equal(b["pixel_values"][row, 0], np.asarray(want))
            rows += 1
    assert rows >= 20
