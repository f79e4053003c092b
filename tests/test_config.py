"""Reading the official config.json: every size from the file, official code defaults otherwise."""
import json

import pytest

from owl_jax.families.owl1 import config as oc


def _official(**over):
    d = oc.to_official_dict(oc.tiny())
    for block, fields in over.items():
        d[block] = {**d[block], **fields} if isinstance(fields, dict) else fields
    return d


def test_round_trip_keeps_every_size():
    cfg = oc.tiny()
    assert oc.from_official_dict(json.loads(json.dumps(oc.to_official_dict(cfg)))) == cfg


def test_sizes_come_from_the_file():
    d = _official(vision_config={"hidden_size": 48, "image_size": 42, "patch_size": 7},
                  visual_abstractor_config={"hidden_size": 48, "encoder_hidden_size": 48,
                                            "intermediate_size": 100, "layer_norm_eps": 1e-3},
                  text_config={"num_key_value_heads": 2, "rope_theta": 5e5, "vocab_size": 77})
    d["num_query_tokens"] = 9
    d["owl_jax_slots_per_image"] = 10
    cfg = oc.from_official_dict(d)
    assert (cfg.vision.hidden_size, cfg.vision.num_positions) == (48, 37)
    assert (cfg.abstractor.intermediate_size, cfg.abstractor.layer_norm_eps) == (100, 1e-3)
    assert (cfg.text.kv_heads, cfg.text.rope_theta, cfg.text.vocab_size) == (2, 5e5, 77)
    assert cfg.image_tokens == 10


def test_missing_fields_take_official_code_defaults():
    d = {**_official(), "visual_abstractor_config": {}, "vision_config": {}, "text_config": {}}
    cfg = oc.from_official_dict(d)
    # MplugOwlVisualAbstractorConfig's constructor default, not the released 2816.
    assert cfg.abstractor.intermediate_size == 4096
    assert cfg.vision == oc.VisionConfig() and cfg.text == oc.TextConfig()


def test_preprocessor_mean_std_and_size_mismatch_warns():
    pre = {"resolution": 224, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    with pytest.warns(UserWarning, match="resized to 28"):
        cfg = oc.from_official_dict(_official(), pre)
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("over, match", [
    ({"text_config": None}, "text_config"),
    ({"text_config": {"tie_word_embeddings": True}}, "tie_word_embeddings"),
    ({"text_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}, "rope scaling"),
    ({"visual_abstractor_config": {"encoder_hidden_size": 8}}, "encoder_hidden_size"),
])
def test_bad_configs_are_named(over, match):
    with pytest.raises(ValueError, match=match):
        oc.from_official_dict(_official(**over))


def test_load_official_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        oc.load_official(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        oc.load_official(str(tmp_path / "nope"))


def test_official_configs_reserve_the_official_65_slots():
    """The official processor reserves 65 slots per <image> whatever num_query_tokens is; a
    config.json from the official code (no owl-jax key) keeps that, ours round-trips as written."""
    d = oc.to_official_dict(oc.tiny())
    assert oc.from_official_dict(d).image_tokens == 5
    del d["owl_jax_slots_per_image"]
    with pytest.warns(UserWarning, match="65 slots"):
        cfg = oc.from_official_dict(d)
    assert (cfg.num_query_tokens, cfg.image_tokens) == (4, 65)
    d["num_query_tokens"] = 64
    assert oc.from_official_dict(d).image_tokens == 65


def test_preprocessor_file_names_the_size_the_official_processor_reads():
    p = oc.preprocessor_dict(oc.tiny())
    assert p["size"] == {"shortest_edge": 28} and p["crop_size"] == {"height": 28, "width": 28}
