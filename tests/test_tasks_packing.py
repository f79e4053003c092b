"""Tasks (official chunk-wise tokenization and loss masks) and packing, against hand-computed
layouts; the model check: a packed row gives each sample exactly its own logits."""
import numpy as np
import pytest

from owl_jax.data.conversation import parse_llava
from owl_jax.data.packing import (PackIterDataset, Packer, fits, pack, pad_to_length,
                                  stack_rows)
from owl_jax.data.tasks import text_sample
from owl_jax.families.owl1.samples import caption_sample, tokenize_conversation
from owl_jax.testing.spm import train_tiny_tokenizer
from owl_jax.tokenizer import OwlTokenizer

T = 3  # image slots per image in the hand examples


class PieceTok:
    """A tokenizer stub with hand-chosen ids per piece, so expected layouts are readable.
    Unknown pieces raise, so a test also checks exactly which pieces were encoded."""
    bos_id, eos_id = 1, 2
    table = {"S": [10], "\nHuman: ": [11, 12], "Q\n": [20, 21], "AI: ": [13, 14],
             "ab": [30, 31], "R\n": [22, 23], "c": [32], "": []}

    def encode(self, text):
        return list(self.table[text])


TEXT = "S\nHuman: <image>\nHuman: Q\nAI: ab\nHuman: R\nAI: c"
FULL_IDS = [1, 10, 11, 12, -1, -1, -1, 11, 12, 20, 21, 13, 14, 30, 31, 2, 11, 12, 22, 23, 13, 14,
            32, 2]


def ids_mask(sample):
    return sample["input_ids"].tolist(), sample["loss_mask"].tolist()


def test_conversation_layout_and_loss_mask_hand_computed():
    s, reason = tokenize_conversation(PieceTok(), TEXT, max_length=100, image_tokens=T)
    assert reason == ""
    # loss_mask[i] = 1 iff ids[i + 1] is a response token or its EOS: 30 31 2 and 32 2.
    assert ids_mask(s) == (FULL_IDS, [0] * 12 + [1, 1, 1] + [0] * 6 + [1, 1] + [0])
    assert s["input_ids"].dtype == np.int32 and s["loss_mask"].dtype == np.float32
    assert s["num_images"] == 1


@pytest.mark.parametrize("max_length,ids,mask", [
    # exactly full: nothing cut
    (23, FULL_IDS, [0] * 12 + [1, 1, 1] + [0] * 6 + [1, 1] + [0]),
    # last response cut to nothing: its EOS still fits and is trained
    (22, FULL_IDS[:22] + [2], [0] * 12 + [1, 1, 1] + [0] * 6 + [1] + [0]),
    # first response cut to one token + EOS, the rest dropped
    (14, FULL_IDS[:14] + [2], [0] * 12 + [1, 1, 0]),
    # room for the EOS only
    (13, FULL_IDS[:13] + [2], [0] * 12 + [1, 0]),
])
def test_truncation_hand_computed(max_length, ids, mask):
    s, _ = tokenize_conversation(PieceTok(), TEXT, max_length=max_length, image_tokens=T)
    assert ids_mask(s) == (ids, mask)
    assert len(s["input_ids"]) <= max_length + 1


@pytest.mark.parametrize("max_length", [5, 10, 12])
def test_all_responses_truncated_is_dropped(max_length):
    # 5: the image does not fit (the sample stops there); 10: cut inside "Q\n"; 12: in "AI: ".
    s, reason = tokenize_conversation(PieceTok(), TEXT, max_length=max_length, image_tokens=T)
    assert s is None and reason == "no_trained_tokens"


def test_empty_answer_follows_upstreams_two_code_paths():
    # Text-only path keeps empty pieces: the empty answer trains just its EOS.
    s, _ = tokenize_conversation(PieceTok(), "S\nHuman: Q\nAI: \nHuman: R\nAI: c", 100, T)
    assert ids_mask(s) == ([1, 10, 11, 12, 20, 21, 13, 14, 2, 11, 12, 22, 23, 13, 14, 32, 2],
                           [0] * 7 + [1] + [0] * 6 + [1, 1, 0])
    # With an image, empty pieces are dropped, so "\nHuman: " becomes the "answer".
    s, _ = tokenize_conversation(PieceTok(), "S\nHuman: <image>\nHuman: Q\nAI: \nHuman: R\nAI: c",
                                 100, T)
    assert ids_mask(s) == ([1, 10, 11, 12, -1, -1, -1, 11, 12, 20, 21, 13, 14, 11, 12, 2, 22, 23,
                            13, 14, 32, 2],
                           [0] * 12 + [1, 1, 1] + [0] * 4 + [1, 1, 0])


def test_caption_and_text_samples_hand_computed():
    s, _ = caption_sample(PieceTok(), "ab", max_length=10, image_tokens=T)
    assert ids_mask(s) == ([1, -1, -1, -1, 30, 31, 2], [0, 0, 0, 1, 1, 1, 0])
    s, _ = caption_sample(PieceTok(), "ab", max_length=5, image_tokens=T)
    assert ids_mask(s) == ([1, -1, -1, -1, 30, 2], [0, 0, 0, 1, 1, 0])
    assert caption_sample(PieceTok(), "  ", 10, T) == (None, "empty_text")
    s, _ = text_sample(PieceTok(), "ab", max_length=10)
    assert ids_mask(s) == ([1, 30, 31, 2], [1, 1, 1, 0])
    s, _ = text_sample(PieceTok(), "ab", max_length=2)
    assert ids_mask(s) == ([1, 30, 2], [1, 1, 0])


def test_real_tokenizer_trains_exactly_the_answers(tmp_path):
    train_tiny_tokenizer(str(tmp_path))
    tok = OwlTokenizer.from_dir(str(tmp_path))
    conv = parse_llava({"image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"},
        {"from": "gpt", "value": "A red bus."}, {"from": "human", "value": "Where is it?"},
        {"from": "gpt", "value": "On the street."}]})
    s, _ = tokenize_conversation(tok, conv.text(), 512, 65)
    ids, m = s["input_ids"], s["loss_mask"]
    assert ids[1:][m[:-1] == 1].tolist() == (tok.encode("A red bus.") + [2]
                                             + tok.encode("On the street.") + [2])
    # Each piece is encoded on its own (here: the separators keep their dummy prefix).
    sep = tok.encode("\nHuman: ")
    start = 1 + len(tok.encode(conv.system))
    assert ids[start:start + len(sep)].tolist() == sep
    assert ids[start + len(sep)] == -1
    assert (ids < 0).sum() == 65 and s["num_images"] == 1


# -------------------------------------------------------------------------------------------
# Packing

S_IMG = 2


def _img(v, k=1):
    return np.full((k, S_IMG, S_IMG, 3), v, np.float32)


A = {"input_ids": np.array([1, 10, -1, -1, -1, 30, 31, 2], np.int32),
     "loss_mask": np.array([0, 0, 0, 0, 1, 1, 1, 0], np.float32), "num_images": 1,
     "images": _img(1.0)}
B = {"input_ids": np.array([1, 40, 41, 2], np.int32),
     "loss_mask": np.array([1, 1, 1, 0], np.float32), "num_images": 0}
C = {"input_ids": np.array([1, -1, -1, -1, 50, 2], np.int32),
     "loss_mask": np.array([0, 0, 0, 1, 1, 0], np.float32), "num_images": 1,
     "images": _img(3.0)}


def test_packed_row_exact_layout():
    rows = list(pack([A, B, C], seq_len=16, max_images_per_row=2, image_size=S_IMG))
    assert len(rows) == 1
    r = rows[0]
    assert r["input_ids"].tolist() == [1, 10, -1, -1, -1, 30, 31, 1, 40, 41, 1, -1, -1, -1, 50, 0]
    assert r["targets"].tolist() == [10, 0, 0, 0, 30, 31, 2, 40, 41, 2, 0, 0, 0, 50, 2, 0]
    assert r["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    assert r["segment_ids"].tolist() == [1] * 7 + [2] * 3 + [3] * 5 + [0]
    assert r["positions"].tolist() == list(range(7)) + [0, 1, 2] + list(range(5)) + [0]
    assert r["pixel_values"].shape == (2, S_IMG, S_IMG, 3)
    assert (r["pixel_values"][0] == 1.0).all() and (r["pixel_values"][1] == 3.0).all()
    assert {k: v.dtype.name for k, v in r.items()} == {
        "input_ids": "int32", "targets": "int32", "loss_mask": "float32",
        "segment_ids": "int32", "positions": "int32", "pixel_values": "float32"}


def test_next_fit_closes_rows_on_slots_and_on_images():
    segs = [r["segment_ids"].max() for r in pack([A, B, C], 16, 1, S_IMG)]
    assert segs == [2, 1]  # C's image does not fit with A's when rows hold one image
    rows = list(pack([A, B, C], 9, 2, S_IMG))  # A (7) + B (3) > 9
    assert [r["segment_ids"].tolist() for r in rows] == [[1] * 7 + [0] * 2,
                                                         [1] * 3 + [2] * 5 + [0]]
    assert (rows[1]["pixel_values"][0] == 3.0).all() and (rows[1]["pixel_values"][1] == 0).all()
    packer = Packer(16, 1, S_IMG)
    two = dict(C, num_images=2, images=_img(1.0, 2))
    assert list(pack([two, None, B], 16, 1, S_IMG, packer)) and packer.skipped == {
        "too_many_images": 1}
    with pytest.raises(ValueError, match="max_length <= seq_len"):
        Packer(4, 2, S_IMG).add(A)


def test_pad_to_length_and_stack():
    r = pad_to_length(A, 10, 2, S_IMG)
    assert r["segment_ids"].tolist() == [1] * 7 + [0] * 3
    assert r["targets"].tolist() == [10, 0, 0, 0, 30, 31, 2, 0, 0, 0]
    assert (r["pixel_values"][1] == 0).all()
    batch = stack_rows([r, pad_to_length(B, 10, 2, S_IMG)])
    assert batch["input_ids"].shape == (2, 10) and batch["pixel_values"].shape == (2, 2, 2, 2, 3)
    assert fits(A, 7, 1) and not fits(A, 6, 1) and not fits(A, 7, 0)
    with pytest.raises(ValueError, match="rows hold 0"):
        pad_to_length(A, 10, 0, S_IMG)


def _random_samples(n, seed, image_tokens=3, vocab=50):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 3))
        ids = [1] + [-1] * (k * image_tokens) + rng.integers(3, vocab, rng.integers(1, 12)).tolist()
        ids = np.array(ids + [2], np.int32)
        mask = np.r_[(rng.random(len(ids) - 1) < 0.5) * (ids[1:] >= 0), 0].astype(np.float32)
        out.append({"input_ids": ids, "loss_mask": mask, "num_images": k,
                    "images": rng.normal(size=(k, S_IMG, S_IMG, 3)).astype(np.float32)})
    return out


def test_packing_never_mixes_samples():
    samples = _random_samples(60, seed=0)
    rows = list(pack(samples, seq_len=32, max_images_per_row=3, image_size=S_IMG))
    it = iter(samples)
    for r in rows:
        img = 0
        for seg in range(1, r["segment_ids"].max() + 1):
            s = next(it)  # order is preserved
            sl = np.flatnonzero(r["segment_ids"] == seg)
            ids = s["input_ids"]
            assert np.array_equal(r["input_ids"][sl], ids[:-1])
            assert np.array_equal(r["targets"][sl], np.maximum(ids[1:], 0))  # incl. last slot
            assert np.array_equal(r["loss_mask"][sl], s["loss_mask"][:-1])
            assert np.array_equal(r["positions"][sl], np.arange(len(sl)))
            assert np.array_equal(r["pixel_values"][img:img + s["num_images"]], s["images"])
            img += s["num_images"]
        assert (r["pixel_values"][img:] == 0).all()
        pad = r["segment_ids"] == 0
        assert (r["loss_mask"][pad] == 0).all() and (r["input_ids"][pad] == 0).all()
        assert pad.tolist() == sorted(pad.tolist())  # padding only at the end
    assert next(it, None) is None


def test_grain_pack_stage_matches_and_resumes():
    import grain
    samples = _random_samples(40, seed=1)
    expected = list(pack(samples, 24, 2, S_IMG))
    ds = PackIterDataset(grain.MapDataset.source(samples).to_iter_dataset(), 24, 2, S_IMG)
    got = list(ds)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for k in a:
            assert np.array_equal(a[k], b[k])
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = list(it)
    it2 = iter(ds)
    it2.set_state(state)
    again = list(it2)
    assert len(again) == len(rest) == len(expected) - 3
    for a, b in zip(again, rest):
        assert np.array_equal(a["input_ids"], b["input_ids"])
        assert np.array_equal(a["pixel_values"], b["pixel_values"])
    batches = list(ds.batch(2, batch_fn=stack_rows))
    assert batches[0]["targets"].shape == (2, 24)


def test_packed_logits_equal_each_sample_alone():
    """Segment ids and restarted positions make a packed row compute exactly what each
    sample computes alone (attention, RoPE and image splicing never cross samples)."""
    import flax.linen as nn
    import jax
    from owl_jax.families.owl1.config import tiny
    from owl_jax.families.owl1.model import Owl

    cfg = tiny()
    t, s_img = cfg.image_tokens, cfg.vision.image_size
    rng = np.random.default_rng(0)

    def sample(n_text, k):
        ids = [1] + [-1] * (t * k) + rng.integers(3, cfg.text.vocab_size, n_text).tolist() + [2]
        ids = np.array(ids, np.int32)
        return {"input_ids": ids, "loss_mask": np.ones(len(ids), np.float32), "num_images": k,
                "images": rng.normal(size=(k, s_img, s_img, 3)).astype(np.float32)}

    samples = [sample(4, 1), sample(6, 0), sample(3, 2)]
    rows = list(pack(samples, seq_len=40, max_images_per_row=3, image_size=s_img))
    assert len(rows) == 1 and rows[0]["segment_ids"].max() == 3
    row = stack_rows(rows)
    model = Owl(cfg)
    # Random params of the model's shapes, drawn in numpy (compiling `init` costs ~10 s on
    # CPU; any random weights do for an equality check). Norm scales stay near 1 so the
    # logits have a realistic spread (std ~0.5).
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), row["input_ids"][:, :8],
                                     row["pixel_values"][:, :1])["params"])
    prng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: ((1.0 if str(path[-1].key) == "scale" else 0.0)
                         + prng.normal(0, 0.08, x.shape)).astype(np.float32), shapes)
    apply = jax.jit(lambda ids, pv, seg, pos: model.apply({"params": params}, ids, pv,
                                                          segment_ids=seg, positions=pos))
    # Reference: each sample alone in its own batch row, right-padded, one segment and
    # positions 0.. throughout: padding after a sample cannot affect it (causal).
    L = row["input_ids"].shape[1]
    ids = np.zeros((3, L), np.int32)
    pv = np.zeros((3, 3, s_img, s_img, 3), np.float32)
    for b, s in enumerate(samples):
        ids[b, :len(s["input_ids"]) - 1] = s["input_ids"][:-1]
        pv[b, :s["num_images"]] = s["images"]
    alone = np.asarray(apply(ids, pv, np.ones((3, L), np.int32),
                             np.broadcast_to(np.arange(L, dtype=np.int32), (3, L))))
    # The packed row (tiled to the same batch shape, so one compilation serves both).
    tile = {k: np.repeat(row[k], 3, axis=0) for k in row}
    packed = np.asarray(apply(tile["input_ids"], tile["pixel_values"], tile["segment_ids"],
                              tile["positions"]))
    for seg, s in enumerate(samples, start=1):
        sl = row["segment_ids"][0] == seg
        np.testing.assert_allclose(packed[0, sl], alone[seg - 1, :sl.sum()], atol=1e-5, rtol=0)
    # Sanity: without segment ids the second sample would see the first one.
    mixed = np.asarray(apply(tile["input_ids"], tile["pixel_values"], np.ones((3, L), np.int32),
                             tile["positions"]))
    sl = row["segment_ids"][0] == 2
    assert np.abs(mixed[0, sl] - alone[1, :sl.sum()]).max() > 1e-2
    assert alone.std() > 0.1


def test_pipeline_batch_stages_equal_pad_and_stack():
    """The pipeline's direct batch builders (uint8 pixels) lay rows out exactly as
    pad_to_length / Packer + stack_rows do with the same images."""
    from owl_jax.families.owl1.config import tiny
    from owl_jax.data import grain_stages as st
    cfg, rng = tiny(), np.random.default_rng(0)
    s, t, L, M = cfg.vision.image_size, cfg.image_tokens, 3 * cfg.image_tokens, 2

    def sample(k, n_text):
        ids = [1] + [-1] * (t * k) + rng.integers(3, 50, n_text).tolist() + [2]
        px = rng.integers(0, 256, (k, s, s, 3), dtype=np.uint8)
        return {"input_ids": np.array(ids, np.int32), "num_images": k, "pixels": px,
                "loss_mask": (rng.random(len(ids)) < 0.5).astype(np.float32),
                "images": px.astype(np.float32)}

    samples = [sample(1, 5), sample(0, 9), sample(2, 3), sample(1, 1)]
    got = st.BatchSamples(cfg, L, M)(samples)
    want = stack_rows([pad_to_length(x, L, M, s) for x in samples])
    assert got["pixel_values"].dtype == np.uint8
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    packer = st.ImagePacker(L, M, 0)
    bare = [{k: v for k, v in x.items() if k != "images"} for x in samples]  # as the pipeline's
    rows = [r for x in bare for r in packer.add(x)] + packer.flush()
    got = st.BatchRows(cfg, M)(rows)
    want = stack_rows(list(pack(samples, L, M, s)))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(ValueError, match="max_length <= seq_len"):
        st.BatchSamples(cfg, 10, M)(samples[:1])
