"""Caption and VQA metrics, numerically as the reference scripts compute them.

- `cider_d`: CIDEr-D as the COCO caption toolkit (`pycocoevalcap/cider`, which it reports as
  "CIDEr") computes it: n = 1..4, tf-idf with document frequencies taken from the reference
  sets of the evaluated images, clipped tf-idf overlap, a Gaussian length penalty (sigma = 6),
  averaged over n-gram orders and references, times 10.
- `bleu`: corpus BLEU-1..4 as `pycocoevalcap/bleu` computes it ("closest" reference length,
  ties to the shorter; the toolkit's 1e-15 / 1e-9 smoothing).
- `vqa_accuracy` / `vqa_scores`: the official VQA evaluation (`vqaEval.py`): answer
  normalisation (punctuation, number words, articles, contractions) and
  min(#matching humans / 3, 1) averaged over the 10 leave-one-out subsets of 9 human answers.

Tokenisation for the caption metrics: the toolkit pipes captions through the Java Stanford
PTBTokenizer (`-lowerCase`) and drops punctuation tokens. `ptb_tokenize` is a dependency-free
approximation that agrees on ordinary captions (lower-casing, clitics split as "do n't" /
"man 's", punctuation dropped, hyphenated words and numbers like 1.5 / 1,000 kept whole). It
differs on abbreviations ("mr." keeps its period in Java, not here), URLs and emoticons,
Unicode dashes and ellipses (Java normalises them; curly apostrophes are handled here too), and
brackets (Java rewrites them as -LRB- / -RRB- tokens; here they are simply dropped). Such
captions are rare in COCO, so scores can differ from the Java pipeline only slightly.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence

# -------------------------------------------------------------------------------------------
# Tokenisation (PTB-lite)
# -------------------------------------------------------------------------------------------

# Tokens the toolkit removes after PTB tokenisation (pycocoevalcap/tokenizer/ptbtokenizer.py),
# lower-cased, plus the raw brackets that Java would have rewritten as -LRB- / -RRB- etc.
PTB_PUNCTUATION = frozenset({"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?",
                             "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}"})

_NEGATION = re.compile(r"(?<=\w)(n't)\b")                     # don't -> do n't, can't -> ca n't
_CLITIC = re.compile(r"(?<=\w)('(?:s|re|ve|m|ll|d))\b")      # man's -> man 's
_PIECE = re.compile(r"""
      \d+(?:[.,:]\d+)+               # 1.5  1,000  10:30 stay one token
    | n't | '(?:s|re|ve|m|ll|d)\b    # clitics split off above
    | [^\W_]+(?:[-/'][^\W_]+)*       # words; inner hyphens / slashes / apostrophes keep them whole
    | \.\.\. | --                    # multi-character punctuation
    | \S                             # any other symbol, one token each
""", re.VERBOSE)


def ptb_tokenize(text: str) -> str:
    """Lower-cases, tokenises PTB-style and drops punctuation tokens; returns space-joined."""
    text = text.replace("\n", " ").lower().replace('"', " ").replace("\u2019", "'").replace("\u2018", "'")
    text = _CLITIC.sub(r" \1", _NEGATION.sub(r" \1", text))
    return " ".join(t for t in _PIECE.findall(text) if t not in PTB_PUNCTUATION)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check_keys(refs: Mapping, hyps: Mapping):
    if set(refs) != set(hyps):
        missing, extra = set(refs) - set(hyps), set(hyps) - set(refs)
        raise ValueError(f"hypotheses and references cover different ids: missing hypotheses for "
                         f"{sorted(missing, key=str)[:5]}, no references for {sorted(extra, key=str)[:5]}")
    empty = [k for k, r in refs.items() if not r]
    if empty:
        raise ValueError(f"no reference captions for ids {sorted(empty, key=str)[:5]}")


# -------------------------------------------------------------------------------------------
# CIDEr-D
# -------------------------------------------------------------------------------------------

def cider_d(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, str], *, n: int = 4,
            sigma: float = 6.0, tokenize: bool = True) -> tuple[float, dict]:
    """Corpus CIDEr-D and per-id scores. `refs[id]` is a list of captions, `hyps[id]` one."""
    _check_keys(refs, hyps)
    keys = list(refs)
    tok = ptb_tokenize if tokenize else (lambda s: s)
    ref_counts = {k: [_ngrams(tok(r).split(), n) for r in refs[k]] for k in keys}
    hyp_counts = {k: _ngrams(tok(hyps[k]).split(), n) for k in keys}

    # Document frequency: in how many images' reference sets each n-gram occurs.
    doc_freq = Counter(g for k in keys for g in set().union(*ref_counts[k]))
    log_num_docs = math.log(float(len(keys)))

    def tfidf(counts: Counter):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            # An n-gram absent from every reference set gets df = 1 (log 1 = 0), as upstream.
            w = float(tf) * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        # Upstream's "length" counts bigrams (the `if n == 1` in counts2vec tests the 0-based
        # order index), i.e. words - 1 for non-empty captions. Kept for numerical parity.
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    scores = {}
    for k in keys:
        vec_h, norm_h, len_h = tfidf(hyp_counts[k])
        total = [0.0] * n
        for rc in ref_counts[k]:
            vec_r, norm_r, len_r = tfidf(rc)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma ** 2))
            for i in range(n):
                # Clipped overlap: min(hyp, ref) * ref over the hypothesis' n-grams.
                dot = sum(min(w, vec_r[i].get(g, 0.0)) * vec_r[i].get(g, 0.0)
                          for g, w in vec_h[i].items())
                if norm_h[i] != 0 and norm_r[i] != 0:
                    dot /= norm_h[i] * norm_r[i]
                total[i] += dot * penalty
        scores[k] = sum(total) / n / len(ref_counts[k]) * 10.0
    corpus = sum(scores.values()) / len(scores) if scores else 0.0
    return corpus, scores


# -------------------------------------------------------------------------------------------
# BLEU
# -------------------------------------------------------------------------------------------

def bleu(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, str], *, n: int = 4,
         tokenize: bool = True) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's Bleu(4) with its default 'closest' reference length."""
    _check_keys(refs, hyps)
    tok = ptb_tokenize if tokenize else (lambda s: s)
    guess, correct = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for k in refs:
        words = tok(hyps[k]).split()
        ref_words = [tok(r).split() for r in refs[k]]
        max_ref = Counter()
        for rw in ref_words:
            max_ref |= _ngrams(rw, n)          # per-n-gram max count over the references
        for gram, c in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(c, max_ref[gram])
        for i in range(n):
            guess[i] += max(0, len(words) - i)
        hyp_len += len(words)
        # Closest reference length; ties go to the shorter one.
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]

    tiny, small = 1e-15, 1e-9                    # upstream's smoothing constants
    ratio = (hyp_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, prod = [], 1.0
    for i in range(n):
        prod *= (correct[i] + tiny) / (guess[i] + small)
        scores.append(prod ** (1.0 / (i + 1)) * brevity)
    return scores


def caption_metrics(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, str]) -> dict:
    """{'CIDEr', 'BLEU-1'..'BLEU-4'} on PTB-lite tokens (tokenised once)."""
    _check_keys(refs, hyps)
    tok_refs = {k: [ptb_tokenize(r) for r in v] for k, v in refs.items()}
    tok_hyps = {k: ptb_tokenize(hyps[k]) for k in refs}
    out = {"CIDEr": cider_d(tok_refs, tok_hyps, tokenize=False)[0]}
    for i, b in enumerate(bleu(tok_refs, tok_hyps, tokenize=False)):
        out[f"BLEU-{i + 1}"] = b
    return out


# -------------------------------------------------------------------------------------------
# VQA accuracy (official vqaEval.py)
# -------------------------------------------------------------------------------------------

# The official tables, verbatim (including their mix of straight and curly apostrophes).
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve",
    "hasnt": "hasn’t", "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve",
    "hes": "he’s", "howd": "how’d", "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve",
    "I’dve": "I’d’ve", "Im": "I’m", "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve",
    "it’dve": "it’d’ve", "itll": "it’ll", "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t",
    "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve", "mightve": "might’ve",
    "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at", "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve",
    "she’s": "she’s", "shouldve": "should’ve", "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve",
    "shouldn’tve": "shouldn’t’ve", "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve",
    "somebody’dve": "somebody’d’ve", "somebodyll": "somebody’ll", "somebodys": "somebody’s",
    "someoned": "someone’d", "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve",
    "someonell": "someone’ll", "someones": "someone’s", "somethingd": "something’d",
    "somethingd’ve": "something’d’ve", "something’dve": "something’d’ve", "somethingll": "something’ll",
    "thats": "that’s", "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve",
    "they’dve": "they’d’ve", "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve",
    "twas": "’twas", "wasnt": "wasn’t", "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've",
    "werent": "weren’t", "whatll": "what’ll", "whatre": "what’re", "whats": "what’s",
    "whatve": "what’ve", "whens": "when’s", "whered": "where’d", "wheres": "where's",
    "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve", "who’dve": "who’d’ve",
    "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll", "whyre": "why’re",
    "whys": "why’s", "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t",
    "wouldnt’ve": "wouldn’t’ve", "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll",
    "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve",
    "y’all’dve": "y’all’d’ve", "youd": "you’d", "youd’ve": "you’d’ve", "you’dve": "you’d’ve",
    "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCTUATION = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@",
                   "`", ",", "?")
# Upstream's pattern is "(?!<=\d)(\.)(?!\d)": the first group was meant as a look-behind but is
# a look-ahead that always holds, so it removes every period not followed by a digit. Upstream
# also passes re.UNICODE as the positional `count`, so at most 32 periods are removed.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_MAX = 32
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def vqa_process_punctuation(text: str) -> str:
    out = text
    for p in VQA_PUNCTUATION:
        # Punctuation next to a space (or any text with a 1,000-style number) is deleted;
        # otherwise it becomes a space. The test reads the *input* text, as upstream does.
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX)


def vqa_process_digit_article(text: str) -> str:
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """The normalisation the official script applies to a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the (10) human answers."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    gts = list(human_answers)
    if len(set(gts)) > 1:                   # upstream only cleans answers when humans disagree
        gts = [vqa_process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]       # leave one human out
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs)


def vqa_scores(predictions: Mapping[Hashable, str], annotations: Mapping[Hashable, Mapping]) -> dict:
    """Overall / per-answer-type / per-question-type accuracy in percent (2 decimals, as upstream).

    `annotations[qid]` holds 'answers' (list of strings) and optionally 'answer_type' and
    'question_type'. Per-type figures average the per-question accuracy; upstream's script
    appends the last leave-one-out value there instead (a bug), so its per-type numbers can
    differ slightly; the overall figure is identical.
    """
    missing = [q for q in annotations if q not in predictions]
    if missing:
        raise ValueError(f"no prediction for question ids {missing[:5]} ({len(missing)} in all)")
    per_q = {q: vqa_accuracy(predictions[q], a["answers"]) for q, a in annotations.items()}
    by_ans, by_ques = defaultdict(list), defaultdict(list)
    for q, acc in per_q.items():
        by_ans[annotations[q].get("answer_type", "unknown")].append(acc)
        by_ques[annotations[q].get("question_type", "unknown")].append(acc)

    def pct(xs):
        return round(100.0 * sum(xs) / len(xs), 2) if xs else 0.0

    return {"overall": pct(list(per_q.values())),
            "per_answer_type": {k: pct(v) for k, v in sorted(by_ans.items())},
            "per_question_type": {k: pct(v) for k, v in sorted(by_ques.items())},
            "per_question": per_q}
