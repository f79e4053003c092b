"""Batched evaluation: dataset records -> prompts -> `generator.generate` -> answers -> metrics.

    from owl_jax.eval import run, tfds_builders
    source = tfds_builders.load("coco_caption", "test", data_dir)
    result = run.evaluate(owl_jax.load_pretrained(ckpt), "coco_caption", source, batch_size=16)
    run.write_results(result, "out/")      # metrics.json, predictions.json, answers.jsonl

`generator` is anything with `.generate(prompts: list[str], images: list[list[PIL.Image]],
max_new_tokens=, temperature=, num_beams=) -> list of results with .text` (the object
`owl_jax.load_pretrained` returns). Every question becomes the official prompt of the
generator's family (its `build_prompt`; the default family's for a generator without one).
OwlEval follow-up questions (category multi_turn only, same image as the question before) are
asked in the same conversation, after the model's own earlier answers, so a batch runs turn by
turn.

Records are read and their images decoded by a grain pipeline (threads, order kept) while the
generator works; an image that fails to decode skips its record and is counted. The answers come
back in the questions' input order (each record's `index`), whatever order the dataset stores.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Iterator

import grain
from tqdm import tqdm

from owl_jax.data.images import BadImage, open_image
from owl_jax.eval import metrics as M
from owl_jax import families


@dataclasses.dataclass
class Conversation:
    images: list            # PIL images, shown once at the start of the conversation
    turns: list[dict]       # per question: {'question': str, 'index': int, ...task fields}


@dataclasses.dataclass
class Skip:
    reason: str
    where: str


@dataclasses.dataclass
class EvalResult:
    task: str
    rows: list[dict]        # one per answered question, in input order, with references / scores
    metrics: dict
    predictions: list[dict] | None   # the official results-file format, when there is one


def _s(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def _categories(category) -> list[str]:
    """An OwlEval category value (a list of names, one name, or None) as a list of names."""
    if category is None:
        return []
    return [str(c) for c in category] if isinstance(category, list) else [str(category)]


def _decode_images(blobs, where) -> list | Skip:
    try:
        return [open_image(b) for b in blobs]
    except BadImage as e:
        return Skip(e.reason, where)


# ------------------------------------------------------------------------------------------
# Tasks: how records become conversations, how answers are scored and written
# ------------------------------------------------------------------------------------------

class Task:
    name: str
    prompt: str                 # str.format template with {question}
    max_new_tokens: int
    postprocess: Callable[[str], str] = staticmethod(_first_line)

    def conversations(self, record) -> list[Conversation] | Skip:
        raise NotImplementedError

    def order(self, source) -> Any:
        """The sequence the pipeline maps `conversations` over (records, or groups of them)."""
        return source

    def row(self, turn: dict, answer: str) -> dict:
        raise NotImplementedError

    def metrics(self, rows: list[dict]) -> dict:
        return {}

    def predictions(self, rows: list[dict]) -> list[dict] | None:
        """The official results-file format, when the task has one."""
        return None


class CocoCaption(Task):
    name = "coco_caption"
    prompt = "Provide a one-sentence caption for the provided image."
    max_new_tokens = 30

    def conversations(self, r):
        images = _decode_images([r["image"]], f"image {int(r['image/id'])}")
        if isinstance(images, Skip):
            return images
        return [Conversation(images, [{"question": "", "index": int(r["index"]),
                                       "image_id": int(r["image/id"]),
                                       "references": [_s(c) for c in r["captions"]]}])]

    def row(self, turn, answer):
        return {"image_id": turn["image_id"], "caption": answer, "references": turn["references"]}

    def metrics(self, rows):
        if not rows:
            return {}
        return M.caption_metrics({r["image_id"]: r["references"] for r in rows},
                                 {r["image_id"]: r["caption"] for r in rows})

    def predictions(self, rows):
        return [{"image_id": r["image_id"], "caption": r["caption"]} for r in rows]


class VQAv2(Task):
    name = "vqav2"
    prompt = "{question}\nAnswer the question using a single word or phrase."
    max_new_tokens = 10

    def conversations(self, r):
        images = _decode_images([r["image"]], f"image {int(r['image/id'])}")
        if isinstance(images, Skip):
            return images
        q = r["questions"]
        return [Conversation(images, [{
            "question": _s(q["question"][i]), "index": int(q["index"][i]),
            "question_id": int(q["question_id"][i]),
            "image_id": int(r["image/id"]), "answers": [_s(a) for a in q["answers"][i]],
            "answer_type": _s(q["answer_type"][i]), "question_type": _s(q["question_type"][i])}])
            for i in range(len(q["question_id"]))]

    def row(self, turn, answer):
        row = {k: turn[k] for k in ("question_id", "image_id", "question")}
        row["answer"] = answer
        if any(turn["answers"]):
            row.update(answers=turn["answers"], answer_type=turn["answer_type"],
                       question_type=turn["question_type"],
                       accuracy=M.vqa_accuracy(answer, turn["answers"]))
        return row

    def metrics(self, rows):
        annotated = {r["question_id"]: r for r in rows if "answers" in r}
        if not annotated:
            return {"annotated_questions": 0}
        s = M.vqa_scores({q: r["answer"] for q, r in annotated.items()}, annotated)
        return {"accuracy": s["overall"], "per_answer_type": s["per_answer_type"],
                "per_question_type": s["per_question_type"], "annotated_questions": len(annotated)}

    def predictions(self, rows):
        return [{"question_id": r["question_id"], "answer": r["answer"]} for r in rows]


class OwlEval(Task):
    name = "owleval"
    prompt = "{question}"
    max_new_tokens = 512
    postprocess = staticmethod(str.strip)

    def __init__(self, model_id: str = "owl-jax"):
        self.model_id = model_id

    def order(self, source):
        # Conversations need all questions in question_id order; OwlEval-size lists fit in memory.
        records = sorted((source[i] for i in range(len(source))), key=lambda r: int(r["question_id"]))
        groups = []
        for r in records:
            cats = _categories(json.loads(_s(r["category"])))
            follow_up = bool(cats) and not any("single" in c for c in cats)
            names = [_s(n) for n in r["image/filenames"]]
            if follow_up and groups and groups[-1][-1][1] == names:
                groups[-1].append((r, names))
            else:
                groups.append([(r, names)])
        return groups

    def conversations(self, group):
        first, names = group[0]
        images = _decode_images(first["images"], f"question {int(first['question_id'])} {names}")
        if isinstance(images, Skip):
            return images
        # ability and category come back as the question file had them (JSON in the record).
        return [Conversation(images, [{
            "question": _s(r["question"]), "index": int(r["index"]),
            "question_id": int(r["question_id"]), "image": names[0] if len(names) == 1 else names,
            "ability": json.loads(_s(r["ability"])), "category": json.loads(_s(r["category"]))}
            for r, _ in group])]

    def row(self, turn, answer):
        # OwlEval's answer-file fields, plus an empty rating for the human raters.
        return {"image": turn["image"], "question_id": turn["question_id"],
                "question": turn["question"], "answer": answer, "model_id": self.model_id,
                "ability": turn["ability"], "category": turn["category"], "rating": None}


TASKS = {"coco_caption": CocoCaption, "vqav2": VQAv2, "owleval": OwlEval}


def get_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------

def iter_conversations(task: Task, source, num_threads: int = 4,
                       skipped: collections.Counter | None = None) -> Iterator[Conversation]:
    """Conversations in dataset order; records whose images fail to decode are counted in
    `skipped` and left out."""
    ds = grain.MapDataset.source(task.order(source)).map(task.conversations)
    for item in ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64)):
        if isinstance(item, Skip):
            if skipped is not None:
                skipped[item.reason] += 1
            continue
        yield from item


def _batched(items: Iterable, n: int, limit: int | None) -> Iterator[list]:
    batch = []
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            break
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def answer_batch(generator, task: Task, convs: list[Conversation], prompt: str,
                 gen_kwargs: dict, pad_to: int = 0) -> list[tuple[int, dict]]:
    """Runs the conversations turn by turn (one generate call per turn index) and returns
    (the turn's input index, its row) pairs. Each call is padded to `pad_to` prompts by repeating
    the last one, so a compiled engine sees one batch size; the padding answers are dropped."""
    history = [[] for _ in convs]
    answered = []
    for t in range(max(len(c.turns) for c in convs)):
        active = [i for i, c in enumerate(convs) if t < len(c.turns)]
        asked = [prompt.format(question=convs[i].turns[t]["question"]) for i in active]
        family = getattr(generator, "family", None) or families.get(families.DEFAULT)
        template = family.build_prompt
        prompts = [template(history[i] + [q], len(convs[i].images)) for i, q in zip(active, asked)]
        images = [convs[i].images for i in active]
        pad = max(0, pad_to - len(prompts))
        results = generator.generate(prompts + prompts[-1:] * pad, images + images[-1:] * pad,
                                     **gen_kwargs)
        if len(results) != len(prompts) + pad:
            raise RuntimeError(f"generate returned {len(results)} results for "
                               f"{len(prompts) + pad} prompts")
        for i, q, res in zip(active, asked, results):
            history[i] += [q, res.text.strip()]
            turn = convs[i].turns[t]
            answered.append((turn["index"], task.row(turn, task.postprocess(res.text))))
    return answered


def evaluate(generator, task: str | Task, source, *, batch_size: int = 8,
             max_new_tokens: int | None = None, temperature: float = 0.0, num_beams: int = 1,
             prompt: str | None = None, max_examples: int | None = None, num_threads: int = 4,
             progress: bool = True) -> EvalResult:
    """Generates answers for `source` (a random-access dataset of the task's records, e.g.
    `tfds_builders.load(...)`) and scores them. `max_examples` caps the number of
    conversations (images for coco_caption, questions for vqav2), taken in `task.order(source)`
    (the order `source` stores them; OwlEval's by question_id); the result's rows are in the
    questions' input order."""
    task = get_task(task) if isinstance(task, str) else task
    prompt = task.prompt if prompt is None else prompt
    gen_kwargs = dict(max_new_tokens=max_new_tokens or task.max_new_tokens,
                      temperature=temperature, num_beams=num_beams)
    skipped = collections.Counter()
    answered = []       # (input index, row)
    # Only COCO has one conversation per record; the others' batch count is not known upfront.
    total = (math.ceil(min(len(source), max_examples or math.inf) / batch_size)
             if task.name == "coco_caption" else None)
    bar = tqdm(total=total, desc=f"eval {task.name}", unit="batch", disable=not progress)
    for batch in _batched(iter_conversations(task, source, num_threads, skipped), batch_size, max_examples):
        answered += answer_batch(generator, task, batch, prompt, gen_kwargs, pad_to=batch_size)
        bar.update(1)
    bar.close()
    rows = [row for _, row in sorted(answered, key=lambda pair: pair[0])]
    m = {"task": task.name, "num_answers": len(rows), "skipped": dict(skipped),
         "prompt": prompt, "generation": gen_kwargs, **task.metrics(rows)}
    return EvalResult(task.name, rows, m, task.predictions(rows))


def write_results(result: EvalResult, out_dir: str, extra: dict | None = None) -> dict[str, str]:
    """metrics.json, answers.jsonl (every answer with its references / scores / rating field)
    and, for COCO and VQAv2, predictions.json in the official results format."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"metrics": os.path.join(out_dir, "metrics.json"),
             "answers": os.path.join(out_dir, "answers.jsonl")}
    with open(paths["metrics"], "w") as f:
        json.dump({**result.metrics, **(extra or {})}, f, indent=2, ensure_ascii=False)
    with open(paths["answers"], "w") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if result.predictions is not None:
        paths["predictions"] = os.path.join(out_dir, "predictions.json")
        with open(paths["predictions"], "w") as f:
            json.dump(result.predictions, f, ensure_ascii=False)
    return paths
