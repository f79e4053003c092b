"""Caption and VQA metrics against values worked out by hand (derivations in the comments)."""
import math

import pytest

from owl_jax.eval import metrics

E72 = math.exp(-1.0 / 72.0)  # CIDEr-D length penalty for a length difference of 1 (sigma = 6)


def test_cider_d_by_hand():
    # Two images, so log(#docs) = L = ln 2. Document frequencies over the reference SETS:
    #   A: {"a cat", "a dog"} -> a, cat, dog, (a cat), (a dog);  B: {"a bird"} -> a, bird, (a bird)
    #   df(a) = 2 -> idf weight L - ln 2 = 0; every other n-gram df = 1 -> weight L.
    # A, hyp "a cat": vec1 = {a: 0, cat: L}, vec2 = {(a cat): L}, norms (L, L), 1 bigram.
    #   vs "a cat": identical -> cos1 = cos2 = 1 (orders 3, 4 have zero norm -> 0).
    #   vs "a dog": no weighted overlap -> 0.
    #   score = mean over 4 orders (2/4) / 2 refs * 10 = 2.5
    # B, hyp "bird": vec1 = {bird: L}, no bigram (norm2 = 0, length 0 bigrams);
    #   ref "a bird": vec1 = {a: 0, bird: L}, norm1 = L, 1 bigram -> delta = -1, penalty e^(-1/72)
    #   cos1 = L*L / (L*L) = 1 -> score = (1 * e^(-1/72)) / 4 * 10 = 2.5 e^(-1/72)
    refs = {"A": ["a cat", "a dog"], "B": ["a bird"]}
    hyps = {"A": "a cat", "B": "bird"}
    corpus, per = metrics.cider_d(refs, hyps)
    assert per["A"] == pytest.approx(2.5, rel=1e-9)
    assert per["B"] == pytest.approx(2.5 * E72, rel=1e-9)
    assert corpus == pytest.approx((2.5 + 2.5 * E72) / 2, rel=1e-9)


def test_cider_d_clips_repeated_ngrams():
    # X: ref "dog", hyp "dog dog"; Y: ref "cat", hyp "cat"; L = ln 2, df(dog) = df(cat) = 1.
    # X hyp: vec1 = {dog: 2L} (tf 2), vec2 = {(dog dog): L}, norm1 = 2L, 1 bigram.
    #   ref: vec1 = {dog: L}, norm1 = L, 0 bigrams -> delta 1 -> penalty e^(-1/72).
    #   CIDEr-D clips: min(2L, L) * L / (2L * L) = 0.5 (unclipped cosine would be 1).
    #   score = 0.5 e^(-1/72) / 4 * 10 = 1.25 e^(-1/72)
    # Y: identical unigram, cos1 = 1 -> 1 / 4 * 10 = 2.5
    corpus, per = metrics.cider_d({"X": ["dog"], "Y": ["cat"]}, {"X": "dog dog", "Y": "cat"})
    assert per["X"] == pytest.approx(1.25 * E72, rel=1e-9)
    assert per["Y"] == pytest.approx(2.5, rel=1e-9)
    assert corpus == pytest.approx((1.25 * E72 + 2.5) / 2, rel=1e-9)


def test_bleu_by_hand():
    # Image 1: hyp "the cat is on the mat" (6 words), refs "the cat sat on the mat" / "a cat is on
    # the mat" (6, 6).
    #   1-grams: the x2 (max ref count 2), cat, is, on, mat -> 6/6
    #   2-grams: the-cat (r1), cat-is (r2), is-on (r2), on-the, the-mat -> 5/5
    #   3-grams: the-cat-is (no), cat-is-on, is-on-the, on-the-mat -> 3/4
    #   4-grams: the-cat-is-on (no), cat-is-on-the, is-on-the-mat -> 2/3
    #   closest ref length 6.
    # Image 2: hyp "dog", ref "a dog runs": 1/1 unigram, no higher n-grams, ref length 3.
    # Corpus: correct (7, 5, 3, 2), guesses (7, 5, 4, 3); hyp 7 words vs ref 9
    #   -> brevity penalty exp(1 - 9/7).
    refs = {1: ["the cat sat on the mat", "a cat is on the mat"], 2: ["a dog runs"]}
    hyps = {1: "the cat is on the mat", 2: "dog"}
    bp = math.exp(1 - 9 / 7)
    expected = [bp, bp, (0.75) ** (1 / 3) * bp, (0.75 * 2 / 3) ** 0.25 * bp]
    assert metrics.bleu(refs, hyps) == pytest.approx(expected, rel=1e-6)


def test_bleu_closest_reference_length_ties_to_shorter():
    # Hyp of 5 words, refs of 4 and 6 words: both 1 away, the shorter (4) wins -> no brevity
    # penalty; all n-grams match -> BLEU-4 = 1 (it would be exp(1 - 6/5) with the longer ref).
    scores = metrics.bleu({0: ["a b c d", "a b c d e f"]}, {0: "a b c d e"})
    assert scores[3] == pytest.approx(1.0, rel=1e-9)


def test_ptb_lite_tokenization():
    assert metrics.ptb_tokenize("A man's dog doesn't sit.") == "a man 's dog does n't sit"
    assert metrics.ptb_tokenize("He can’t go!") == "he ca n't go"
    assert (metrics.ptb_tokenize("Two dogs, in 1,000 fields at 10:30; (1.5 m) -- ok?")
            == "two dogs in 1,000 fields at 10:30 1.5 m ok")
    assert metrics.ptb_tokenize('A black-and-white "photo"...') == "a black-and-white photo"
    # Tokenisation makes case and punctuation irrelevant to the scores.
    refs = {0: ["A cat, sitting."], 1: ["a dog"]}
    assert metrics.caption_metrics(refs, {0: "a cat sitting", 1: "A dog!"}) == \
        metrics.caption_metrics(refs, {0: "A CAT sitting .", 1: "a dog"})


def test_caption_metrics_perfect_and_mismatched_ids():
    refs = {0: ["a cat on a mat"], 1: ["a dog in a park"]}
    m = metrics.caption_metrics(refs, {0: "a cat on a mat", 1: "a dog in a park"})
    assert m["BLEU-4"] == pytest.approx(1.0)
    # Perfect hyps: each image's score is mean over orders of cos = 1 -> 1 * 10 = 10.
    assert m["CIDEr"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="missing hypotheses"):
        metrics.caption_metrics(refs, {0: "a cat"})


@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"),                   # number words -> digits
    ("the dog.", "dog"),            # articles dropped, period stripped
    ("dont", "don’t"),              # contractions table (curly apostrophe, as upstream)
    ("1,000", "1000"),              # a 1,000-style number: punctuation deleted, not spaced
    ("3.5", "3.5"),                 # a period before a digit stays
    ("yes!", "yes!"),               # '!' is not in the official punctuation list
    ("Hello World?", "hello world"),
    ("left/right", "left right"),   # '/' with no space next to it becomes a space
    ("a cat, and dog", "cat and dog"),
    ("  T-shirt\n", "t-shirt"),     # whitespace trimmed, '-' kept
])
def test_vqa_normalization_official_tables(raw, normalized):
    assert metrics.normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    # 3 humans say "2", 7 say "3"; the prediction "two" normalises to "2".
    # Leaving out a "2" (3 ways): 2 matches -> 2/3; leaving out a "3" (7 ways): 3 -> 1.
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert metrics.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # 1 "yes", 9 "no": leaving out the yes -> 0; otherwise 1 match -> 1/3. 9 * (1/3) / 10 = 0.3
    assert metrics.vqa_accuracy("Yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    assert metrics.vqa_accuracy("no", ["yes"] + ["no"] * 9) == pytest.approx(1.0)
    # Upstream only cleans human answers when they disagree: unanimous "t.v." stays raw, while
    # the prediction becomes "tv" -> 0; with one dissenting human the answers are cleaned too
    # (leaving out the dissenter: 9 matches -> 1; leaving out a t.v.: 8 -> 1) -> 1.
    assert metrics.vqa_accuracy("t.v.", ["t.v."] * 10) == 0.0
    assert metrics.vqa_accuracy("t.v.", ["t.v."] * 9 + ["tv set"]) == pytest.approx(1.0)


def test_vqa_scores_breakdown():
    ann = {1: {"answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number", "question_type": "how many"},
           2: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
           3: {"answers": ["no"] * 10, "answer_type": "yes/no", "question_type": "is the"}}
    s = metrics.vqa_scores({1: "two", 2: "yes", 3: "yes"}, ann)
    assert s["overall"] == pytest.approx(round(100 * (0.9 + 1 + 0) / 3, 2))
    assert s["per_answer_type"] == {"number": 90.0, "yes/no": 50.0}
    assert s["per_question_type"] == {"how many": 90.0, "is the": 50.0}
    with pytest.raises(ValueError, match="no prediction for question ids"):
        metrics.vqa_scores({1: "two"}, ann)
