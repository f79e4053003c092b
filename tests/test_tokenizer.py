"""Tokenizer: chunk-wise prompt ids as the official processor makes them, checked against
SentencePiece directly and against transformers' slow (sentencepiece) tokenizer path."""
import filecmp
import json
import os

import pytest
import sentencepiece as spm

from owl_jax.testing.spm import train_tiny_tokenizer
from owl_jax.data.conversation import SYSTEM_PROMPT
from owl_jax.families.owl1.template import build_prompt
from owl_jax.tokenizer import OwlTokenizer

T = 5  # image slots per image in these tests (the real model uses 65)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    train_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return OwlTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))


TEXTS = ["Hello world", "What is in the image?", " leading space", "\nHuman: What is Ω?",
         "a</s>b <s> c<unk>d", "", " ", "  two  spaces\n\nnew lines", "AI: ", "12345 tree",
         "über café 😀", "\nAI: The dog is red."]


def test_special_ids_and_files(tok, tok_dir):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert tok.vocab_size == 512
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    cfg = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
    assert cfg["add_bos_token"] is False and cfg["tokenizer_class"] == "LlamaTokenizer"
    special = json.load(open(os.path.join(tok_dir, "special_tokens_map.json")))
    assert special["pad_token"]["content"] == "<unk>"


def test_training_is_deterministic(tok_dir, tmp_path):
    train_tiny_tokenizer(str(tmp_path))
    assert filecmp.cmp(os.path.join(tok_dir, "tokenizer.model"),
                       os.path.join(tmp_path, "tokenizer.model"), shallow=False)


def test_pieces_hand_checked(tok):
    # Dummy prefix at the start of every separately encoded chunk; "\n" is a byte piece.
    assert tok.pieces("\nHuman: ") == ["▁", "<0x0A>", "H", "uman", ":", "▁"]
    assert tok.pieces("AI: ") == ["▁AI", ":", "▁"]
    assert tok.pieces("Ω") == ["▁", "<0xCE>", "<0xA9>"]  # byte fallback
    assert tok.pieces(" hi") == ["▁", "▁", "h", "i"]  # the leading space is kept
    # Special token strings inside text become their ids (slow LlamaTokenizer behaviour).
    assert tok.encode("a</s>b") == tok.sp.encode("a") + [2] + tok.sp.encode("b")


def test_encode_matches_transformers_slow_sentencepiece_path(tok, tok_dir):
    """transformers' sentencepiece backend with legacy=True is the code path of the 4.28
    slow LlamaTokenizer upstream used: special strings split out, `sp.encode` per piece."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    hf = SentencePieceBackend(vocab_file=os.path.join(tok_dir, "tokenizer.model"), legacy=True,
                              bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for text in TEXTS:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    ids = tok.encode("The cat is on the red table, next to two dogs.")
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_v5_llama_tokenizer_agrees_except_on_leading_spaces(tok, tok_dir):
    """Our files load in transformers 5's LlamaTokenizer (tokenizers backend). It agrees on
    ordinary chunks but, unlike the legacy tokenizer, adds no dummy prefix to a chunk that
    starts with a space or follows a special token, which is why it is not the reference."""
    from transformers import LlamaTokenizer
    hf = LlamaTokenizer.from_pretrained(tok_dir)
    for text in ["Hello world", "What is in the image?", "\nHuman: What is Ω?", "AI: "]:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    assert tok.encode(" hi") != hf(" hi", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_encode_prompt_chunkwise_with_image_slots(tok, sp, n_images):
    prompt = build_prompt("What is in the image?", n_images)
    ids = tok.encode_prompt(prompt, T, num_images=n_images)
    # Hand layout: BOS, the system chunk up to each <image>, T slots, the rest.
    head = SYSTEM_PROMPT + "\nHuman: "
    if n_images == 0:
        chunks = [SYSTEM_PROMPT + "\nHuman: What is in the image?\nAI: "]
    else:
        chunks = [head] + ["\nHuman: "] * (n_images - 1) + ["\nHuman: What is in the image?\nAI: "]
    expected = [1] + sp.encode(chunks[0])
    for c in chunks[1:]:
        expected += [-1] * T + sp.encode(c)
    assert ids == expected
    assert sum(i == -1 for i in ids) == n_images * T
    if n_images:
        # The chunk after an image starts with the dummy prefix and the newline byte.
        after = ids.index(-1) + T
        assert [tok.id_to_piece(i) for i in ids[after:after + 2]] == ["▁", "<0x0A>"]
        # ... which is why encoding the whole string at once would differ.
        assert tok.encode(prompt.replace("<image>", "")) != [i for i in ids[1:] if i >= 0]


def test_encode_prompt_image_count_mismatch(tok):
    prompt = build_prompt("Compare them.", 2)
    with pytest.raises(ValueError, match="Compare them"):
        tok.encode_prompt(prompt, T, num_images=1)


def test_decode_skips_specials_and_image_slots(tok):
    ids = tok.encode("The cat is red.")
    noisy = [1, -1, -1] + ids[:2] + [0, 2] + ids[2:] + [2, 0, 10**6]
    assert tok.decode(noisy) == "The cat is red."
    assert tok.decode(tok.encode("Ω and über")) == "Ω and über"
    assert tok.decode(tok.encode("It is red .")) == "It is red ."
    assert tok.decode(tok.encode("It is red ."), clean_up_tokenization_spaces=True) == "It is red."


def test_build_prompt_exact_strings():
    sys_line = ("The following is a conversation between a curious human and AI assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's "
                "questions.")
    assert build_prompt("Explain why this meme is funny.") == (
        sys_line + "\nHuman: <image>\nHuman: Explain why this meme is funny.\nAI: ")
    assert build_prompt("Q", 2) == sys_line + "\nHuman: <image>\nHuman: <image>\nHuman: Q\nAI: "
    assert build_prompt(["Q1", "A1", "Q2"], 0) == sys_line + "\nHuman: Q1\nAI: A1\nHuman: Q2\nAI: "
    assert build_prompt(["Q1", "A1"], 1) == sys_line + "\nHuman: <image>\nHuman: Q1\nAI: A1"
    with pytest.raises(ValueError):
        build_prompt([], 1)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        OwlTokenizer.from_dir(str(tmp_path))


def test_pickles_for_grain_workers(tok):
    import pickle
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode_prompt(build_prompt("Hi?", 1), T) == tok.encode_prompt(build_prompt("Hi?", 1), T)
