"""Instruction data: every source format -> the official mPLUG-Owl text, bad records counted."""
import json

import pytest

from owl_jax.data.conversation import (BadRecord, InstructionReader, detect_format, parse_alpaca,
                                       parse_baize, parse_llava, parse_owl, parse_sharegpt,
                                       read_records, write_official_jsonl)
from owl_jax.data.conversation import SYSTEM_PROMPT

SYS = SYSTEM_PROMPT


def test_llava_image_moved_to_its_own_line():
    rec = {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]}
    conv = parse_llava(rec)
    assert conv.text() == (
        SYS + "\nHuman: <image>\nHuman: What are the colors of the bus in the image?"
        "\nAI: The bus in the image is white and red."
        "\nHuman: What feature can be seen on the back of the bus?"
        "\nAI: The back of the bus features an advertisement.")
    assert conv.to_official() == {"image": ["000000033471.jpg"], "text": conv.text(),
                                  "task_type": "llava_sft"}
    # <image> at the end of the first turn normalises the same way.
    rec["conversations"][0]["value"] = "What are the colors of the bus in the image?\n<image>"
    assert parse_llava(rec).text() == conv.text()


def test_sharegpt_roles_and_leading_non_human():
    rec = {"id": "x", "conversations": [
        {"from": "system", "value": "ignored"}, {"from": "gpt", "value": "Hi! How can I help?"},
        {"from": "human", "value": "Tell a joke."}, {"from": "gpt", "value": "No."},
        {"from": "user", "value": "Another?"}, {"from": "assistant", "value": "Still no."},
        {"from": "human", "value": "unanswered"}]}
    conv = parse_sharegpt(rec)
    assert conv.text() == SYS + "\nHuman: Tell a joke.\nAI: No.\nHuman: Another?\nAI: Still no."
    assert conv.images == () and conv.task_type == "sharegpt_chat_sft"
    msgs = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert parse_sharegpt(msgs).text() == SYS + "\nHuman: Q\nAI: A"


def test_alpaca_with_and_without_input():
    assert parse_alpaca({"instruction": "Add the numbers.", "input": "2 and 3",
                         "output": "5"}).text() == SYS + "\nHuman: Add the numbers.\n2 and 3\nAI: 5"
    assert parse_alpaca({"instruction": "Say hi.", "input": "", "output": "Hi."}).text() == (
        SYS + "\nHuman: Say hi.\nAI: Hi.")


def test_baize_markers():
    rec = {"topic": "t", "input": "The conversation between human and AI assistant.\n"
           "[|Human|] What is a bird?\n[|AI|] An animal with feathers.\n"
           "[|Human|] Can all fly?\n[|AI|] No, penguins cannot.\n[|Human|] "}
    assert parse_baize(rec).text() == (
        SYS + "\nHuman: What is a bird?\nAI: An animal with feathers.\nHuman: Can all fly?"
        "\nAI: No, penguins cannot.")


def test_official_jsonl_round_trips_byte_for_byte():
    text = (SYS + "\nHuman: <image>\nHuman: <image>\nHuman: Which is bigger?\nAI: The left one."
            "\nHuman: Why?\nAI: It covers more of the picture.")
    rec = {"image": ["a.jpg", "b.jpg"], "text": text, "task_type": "llava_sft"}
    conv = parse_owl(rec)
    assert conv.text() == text and conv.to_official() == rec
    assert conv.turns[:3] == (("human", "<image>"), ("human", "<image>"),
                              ("human", "Which is bigger?"))


@pytest.mark.parametrize("parser,rec,reason", [
    (parse_llava, "not a dict", "not_a_dict"),
    (parse_llava, {"image": "a.jpg"}, "missing_field"),
    (parse_llava, {"image": "a.jpg", "conversations": [
        {"from": "human", "value": "no tag"}, {"from": "gpt", "value": "x"}]},
     "image_count_mismatch"),
    (parse_llava, {"conversations": [{"from": "human", "value": "<image> q"},
                                     {"from": "gpt", "value": "a"}]}, "image_count_mismatch"),
    (parse_sharegpt, {"conversations": [{"from": "human", "value": "q"},
                                        {"from": "robot", "value": "a"}]}, "bad_role"),
    (parse_sharegpt, {"conversations": [{"from": "human", "value": "q"},
                                        {"from": "human", "value": "q2"},
                                        {"from": "gpt", "value": "a"}]}, "not_alternating"),
    (parse_sharegpt, {"conversations": [{"from": "human", "value": "q"}]}, "no_response"),
    (parse_sharegpt, {"conversations": []}, "missing_field"),
    (parse_sharegpt, {"conversations": [{"from": "human", "value": "q"},
                                        {"from": "gpt", "value": "  "}]}, "empty_turn"),
    (parse_sharegpt, {"conversations": [{"from": "human"}]}, "missing_field"),
    (parse_alpaca, {"instruction": "x"}, "missing_field"),
    (parse_alpaca, {"instruction": 3, "output": "y"}, "bad_type"),
    (parse_baize, {"input": "no markers at all"}, "no_response"),
    (parse_owl, {"image": ["a.jpg"], "text": SYS + "\nHuman: hi\nAI: yo"}, "image_count_mismatch"),
    (parse_owl, {"text": SYS + "\nHuman: only a question"}, "no_response"),
])
def test_bad_records_raise_bad_record_with_reason(parser, rec, reason):
    with pytest.raises(BadRecord) as e:
        parser(rec)
    assert e.value.reason == reason


def test_reader_counts_skips_and_never_raises(tmp_path):
    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    lines = [json.dumps(good), "{broken json", json.dumps({"instruction": "x"}),
             json.dumps(good), json.dumps(["a", "list"])]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reader = InstructionReader("alpaca")
    convs = list(reader.read(str(path)))
    assert len(convs) == 2 and reader.kept == 2
    assert reader.skipped == {"bad_json": 1, "missing_field": 1, "not_a_dict": 1}
    assert reader.summary() == {"kept": 2, "skipped": {"bad_json": 1, "missing_field": 1,
                                                       "not_a_dict": 1}}


def test_auto_format_json_list_and_official_jsonl_output(tmp_path):
    records = [
        {"image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                             {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "I", "output": "O"},
        {"topic": "t", "input": "hdr\n[|Human|] Q\n[|AI|] A\n[|Human|] "},
        {"image": [], "text": SYS + "\nHuman: Q\nAI: A", "task_type": "quora_chat_sft"},
        {"weird": 1},
    ]
    assert [detect_format(r) for r in records[:5]] == ["llava", "sharegpt", "alpaca", "baize", "owl"]
    src = tmp_path / "mix.json"
    src.write_text(json.dumps(records))
    assert len(list(read_records(str(src)))) == 6
    reader = InstructionReader("auto", image_root="/data/coco")
    out = tmp_path / "owl.jsonl"
    assert write_official_jsonl(reader.read(str(src)), str(out)) == 5
    assert reader.skipped == {"unknown_format": 1}
    back = [json.loads(l) for l in out.read_text().splitlines()]
    assert back[0]["image"] == ["/data/coco/x.jpg"]
    qa, io = SYS + "\nHuman: Q\nAI: A", SYS + "\nHuman: I\nAI: O"
    assert [b["text"] for b in back] == [SYS + "\nHuman: <image>\nHuman: Q\nAI: A", qa, io, qa, qa]
    assert [b["task_type"] for b in back] == ["llava_sft", "sharegpt_chat_sft",
                                              "gpt4instruct_sft", "quora_chat_sft",
                                              "quora_chat_sft"]
    # The official jsonl reads back into the same conversations.
    again = InstructionReader("owl")
    assert [c.to_official()["text"] for c in again.read(str(out))] == [b["text"] for b in back]
    with pytest.raises(ValueError, match="unknown instruction format"):
        InstructionReader("vicuna-v9")
    with pytest.raises(FileNotFoundError):
        list(read_records(str(tmp_path / "nope.json")))
