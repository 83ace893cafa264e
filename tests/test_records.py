"""Record formats parse into one shape, and every bad line is reported with file, line and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raft_dist.data.answers import (
    ANSWER_TAG,
    BEGIN_QUOTE,
    END_QUOTE,
    extract_final_answer,
    extract_quotes,
)
from raft_dist.data.prompts import render_prompt
from raft_dist.data.reader import (
    iter_examples,
    iter_jsonl,
    iter_lines,
    iter_records,
    read_records,
)
from raft_dist.data.records import (
    Document,
    Example,
    RaftRecord,
    detect_format,
    parse_record,
    to_example,
    to_json,
)
from raft_dist.errors import DataError

U = '{"role": "user", "content": "q"}'  # chat messages, as they appear in a JSONL line
A = '{"role": "assistant", "content": "a"}'
COT = f"{BEGIN_QUOTE}Paris is the capital of France.{END_QUOTE} So it is Paris. {ANSWER_TAG} Paris"


def native(**overrides: object) -> dict:
    record = {
        "id": "q1",
        "question": "What is the capital of France?",
        "documents": [
            {"title": "Berlin", "text": "Berlin is the capital of Germany."},
            {"text": "Paris is the capital of France."},
        ],
        "oracle_index": 1,
        "oracle": "Paris is the capital of France.",
        "cot_answer": COT,
    }
    record.update(overrides)
    return record


def paper(nested: bool = True, **overrides: object) -> dict:
    texts = ["Berlin is the capital of Germany.", "Paris is the capital of France."]
    titles = ["placeholder_title", "placeholder_title"]
    record = {
        "id": "seed_task_0",
        "type": "general",
        "question": "What is the capital of France?",
        "context": {
            "title": [titles] if nested else titles,
            "sentences": [texts] if nested else texts,
        },
        "oracle_context": "Paris is the capital of France.\n",
        "cot_answer": COT,
        "instruction": "<DOCUMENT>...</DOCUMENT>",
    }
    record.update(overrides)
    return record


def write_lines(path: Path, lines: list[object]) -> Path:
    """Dicts become JSON lines; strings are written verbatim to allow malformed input."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def error_for(tmp_path: Path, line: str | bytes, name: str = "bad.jsonl") -> DataError:
    """Put one bad record on physical line 2 (after a valid one) and return the error."""
    path = tmp_path / name
    raw = line if isinstance(line, bytes) else line.encode("utf-8")
    path.write_bytes(json.dumps(native()).encode() + b"\n" + raw + b"\n")
    with pytest.raises(DataError) as info:
        list(iter_examples(path))
    assert info.value.line == 2
    assert str(info.value).startswith(f"{path}:2: ")
    return info.value


# --------------------------------------------------------------------------- prompts


def test_render_prompt_layout() -> None:
    docs = [Document("Berlin is in Germany.", title="Berlin"), Document("Paris is in France.")]
    prompt = render_prompt("Where is Paris?", docs)
    lines = prompt.split("\n")
    assert lines[0] == "<DOCUMENT>Berlin: Berlin is in Germany.</DOCUMENT>"
    assert lines[1] == "<DOCUMENT>Paris is in France.</DOCUMENT>"
    assert lines[2] == "Question: Where is Paris?"
    assert BEGIN_QUOTE in lines[3] and END_QUOTE in lines[3] and ANSWER_TAG in lines[3]
    assert prompt.endswith("\nAnswer: ")


def test_extract_final_answer_uses_last_tag() -> None:
    assert extract_final_answer(f"{ANSWER_TAG} draft\nmore {ANSWER_TAG}  Paris \n") == "Paris"
    assert extract_final_answer("no tag here") is None


def test_extract_quotes_ignores_unclosed() -> None:
    text = f"{BEGIN_QUOTE} a {END_QUOTE} x {BEGIN_QUOTE}b\nc{END_QUOTE} {BEGIN_QUOTE} open"
    assert extract_quotes(text) == ["a", "b\nc"]


# --------------------------------------------------------------------------- formats


def test_native_record_parses_and_renders(tmp_path: Path) -> None:
    rec = parse_record(native(), tmp_path / "d.jsonl", 1)
    assert isinstance(rec, RaftRecord)
    assert rec.documents[0] == Document("Berlin is the capital of Germany.", "Berlin")
    assert rec.oracle_index == 1 and rec.answer == "Paris"
    example = to_example(rec)
    assert example.id == "q1" and example.completion == COT
    assert example.prompt == render_prompt(rec.question, rec.documents)


def test_native_oracle_may_be_left_out() -> None:
    rec = parse_record(native(oracle_index=None, oracle="Lyon is in France."), "d.jsonl", 3)
    assert isinstance(rec, RaftRecord)
    assert rec.oracle_index is None and rec.oracle == "Lyon is in France."


def test_to_json_round_trips() -> None:
    rec = parse_record(native(), "d.jsonl", 1)
    data = to_json(rec)
    assert data["documents"][1] == {"text": "Paris is the capital of France."}
    assert data["instruction"] == render_prompt(rec.question, rec.documents)
    again = parse_record(json.loads(json.dumps(data)), "d.jsonl", 1)
    assert isinstance(again, RaftRecord)
    assert (again.documents, again.oracle_index, again.cot_answer) == (
        rec.documents,
        rec.oracle_index,
        rec.cot_answer,
    )


@pytest.mark.parametrize("nested", [True, False])
def test_paper_format_finds_oracle_by_text(nested: bool) -> None:
    obj = paper(nested=nested)
    assert detect_format(obj) == "raft_paper"
    rec = parse_record(obj, "paper.jsonl", 1)
    assert isinstance(rec, RaftRecord)
    assert rec.oracle_index == 1
    assert [d.title for d in rec.documents] == ["", ""]  # placeholder titles dropped
    assert "<DOCUMENT>Paris is the capital of France.</DOCUMENT>" in to_example(rec).prompt


def test_paper_format_dropped_oracle_is_none() -> None:
    rec = parse_record(paper(oracle_context="Lyon is in France."), "paper.jsonl", 1)
    assert isinstance(rec, RaftRecord)
    assert rec.oracle_index is None and rec.oracle == "Lyon is in France."


def test_instruction_and_prompt_completion_formats(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "Translate.", "input": "bonjour", "output": "hello", "id": "t1"},
            {"instruction": "Say hi.", "output": "hi"},
            {"prompt": "2+2=", "completion": "4"},
        ],
    )
    examples = [ex for _, ex in iter_examples(path)]
    assert examples[0] == Example("t1", "Translate.\n\nbonjour\n", "hello")
    assert examples[1] == Example("mixed.jsonl:2", "Say hi.\n", "hi")
    assert examples[2] == Example("mixed.jsonl:3", "2+2=", "4")


def test_chat_formats(tmp_path: Path) -> None:
    """OpenAI/TRL messages and ShareGPT conversations train as prompt/completion examples."""
    path = write_lines(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "2+2="},
                    {"role": "assistant", "content": "4"},
                ]
            },
            {
                "id": "s1",
                "source": "forum",
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Say hi."},
                    {"from": "gpt", "value": "hi"},
                ],
            },
        ],
    )
    examples = [ex for _, ex in iter_examples(path)]
    assert examples[0] == Example("chat.jsonl:1", "2+2=", "4")
    assert examples[1] == Example("s1", "Be brief.\n\nSay hi.", "hi", meta={"source": "forum"})
    assert detect_format({"messages": []}) == detect_format({"conversations": []}) == "chat"
    # A record that also names another format's fields is read as that format.
    assert detect_format({"messages": [], "prompt": "p", "completion": "c"}) == "prompt_completion"


def test_missing_id_defaults_to_file_position(tmp_path: Path) -> None:
    record = native()
    del record["id"]
    path = write_lines(tmp_path / "train.jsonl", [record])
    [(line, example)] = list(iter_examples(path))
    assert (line, example.id) == (1, "train.jsonl:1")


def test_blank_lines_skipped_with_physical_numbers(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "gaps.jsonl", ["", native(id="a"), "   ", "", native(id="b")])
    assert [line for line, _ in iter_jsonl(path)] == [2, 5]
    assert [(line, ex.id) for line, ex in iter_examples(path)] == [(2, "a"), (5, "b")]
    assert [line for line, _ in iter_jsonl(path, start_line=2)] == [5]


def test_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(native()).encode() + b"\n")
    assert [ex.id for _, ex in iter_examples(path)] == ["q1"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"question": "x", ', "malformed JSON"),
        ("[1, 2]", "record must be a JSON object, got list"),
        ('"just a string"', "record must be a JSON object, got string"),
        ('{"foo": 1, "bar": 2}', "unknown record format: found keys [bar, foo]"),
        (json.dumps(native(question=7)), 'field "question" must be a string, got int'),
        (json.dumps(native(question="  ")), 'field "question" must not be empty'),
        (json.dumps(native(documents=[])), 'field "documents" must not be empty'),
        (json.dumps(native(documents="a")), 'field "documents" must be a list, got string'),
        (json.dumps(native(documents=["a"])), 'field "documents[0]" must be an object'),
        (json.dumps(native(oracle_index=5)), 'field "oracle_index" is 5, out of range'),
        (json.dumps(native(oracle_index=-1)), 'field "oracle_index" is -1, out of range'),
        (json.dumps(native(oracle_index="1")), 'field "oracle_index" must be an integer or null'),
        (json.dumps(native(oracle="other")), 'field "oracle" does not match documents[1]'),
        (json.dumps(native(cot_answer="Paris")), 'field "cot_answer" has no "<ANSWER>:"'),
        (json.dumps(native(cot_answer="")), 'field "cot_answer" must not be empty'),
        (json.dumps(paper(context={"sentences": []})), 'field "context.sentences" must not be'),
        (json.dumps(paper(context="a")), 'must be an object {"title": [...], "sentences": [...]}'),
        (json.dumps({"instruction": "x", "output": 3}), 'field "output" must be a string, got int'),
        (json.dumps({"prompt": "x"}), 'missing required field "completion"'),
        ('{"messages": "q"}', 'field "messages" must be a non-empty list, got string'),
        ('{"messages": []}', 'field "messages" must be a non-empty list'),
        ('{"messages": ["q"]}', 'field "messages[0]" must be an object'),
        ('{"messages": [{"role": "user", "content": 1}]}', 'field "messages[0].content" must'),
        ('{"conversations": [{"from": "human"}]}', 'field "conversations[0].value" must'),
        (f'{{"messages": [{A}, {U}]}}', "found roles [assistant, user]"),
        (f'{{"messages": [{U}, {A}, {U}, {A}]}}', "one user and then one assistant message"),
        ('{"conversations": [{"from": "bot", "value": "a"}]}', "found roles [bot]"),
        ('{"messages": [{"role": "user", "content": " "}, ' + A + "]}", "must not be empty"),
    ],
)
def test_bad_records_name_file_line_and_reason(tmp_path: Path, line: str, reason: str) -> None:
    err = error_for(tmp_path, line)
    assert "bad.jsonl:2" in str(err)
    assert reason in str(err)


def test_malformed_json_reports_column(tmp_path: Path) -> None:
    err = error_for(tmp_path, '{"a": 1,, "b": 2}')
    assert "malformed JSON" in err.reason and "column 9" in err.reason


@pytest.mark.parametrize("field", ["question", "documents", "oracle_index", "oracle", "cot_answer"])
def test_missing_native_field(tmp_path: Path, field: str) -> None:
    record = native()
    del record[field]
    err = error_for(tmp_path, json.dumps(record))
    assert f'missing required field "{field}"' in err.reason


def test_unknown_format_lists_expected_formats(tmp_path: Path) -> None:
    err = error_for(tmp_path, '{"text": "hello"}')
    for fmt in ("raft", "raft_paper", "instruction", "prompt_completion", "chat"):
        assert fmt in err.reason
    assert "[text]" in err.reason


@pytest.mark.parametrize(
    "text",
    [
        '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": "d"}\n]\n',
        '[{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]',
        '{\n  "prompt": "a",\n  "completion": "b"\n}\n',
        "\n\n[\n]\n",
    ],
    ids=["array", "one-line-array", "object", "empty-array-after-blank-lines"],
)
def test_json_document_is_refused_once_with_the_fix(tmp_path: Path, text: str) -> None:
    """A .json export is one error for the file naming `convert`, not an error per line, and
    skip_invalid does not skip it (that would train on nothing)."""
    path = tmp_path / "export.json"
    path.write_text(text, encoding="utf-8")
    for read in (
        lambda: list(read_records(path)),
        lambda: list(iter_records(path, skip_invalid=True)),
    ):
        with pytest.raises(DataError) as info:
            read()
        assert info.value.line is None and info.value.path == str(path)
        assert "one JSON document" in info.value.reason
        assert f"raft-dist convert {path} --to raft" in info.value.reason


def test_text_that_starts_like_parquet_is_still_text(tmp_path: Path) -> None:
    """Parquet is told by its magic at both ends: a text line starting "PAR1" is read."""
    path = tmp_path / "notes.txt"
    path.write_text("PAR1 of the notes\nthe end\n", encoding="utf-8")
    assert [line.raw for line in iter_lines(path, text=True)] == [
        b"PAR1 of the notes\n",
        b"the end\n",
    ]


def test_a_json_array_after_the_first_record_is_a_bad_line(tmp_path: Path) -> None:
    err = error_for(tmp_path, '[{"prompt": "a", "completion": "b"}]')
    assert "record must be a JSON object, got list" in err.reason


def test_invalid_utf8_is_reported(tmp_path: Path) -> None:
    err = error_for(tmp_path, b'{"prompt": "caf\xe9", "completion": "x"}')
    assert "invalid UTF-8" in err.reason and "0xe9" in err.reason


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        list(iter_jsonl(path))
    assert info.value.line is None
    assert "nope.jsonl" in str(info.value) and "cannot read file" in str(info.value)


def test_skip_invalid_counts_and_keeps_first_error(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "some_bad.jsonl",
        [native(id="a"), "{oops", "[]", native(id="b"), native(cot_answer="no tag")],
    )
    counter: dict = {}
    ids = [ex.id for _, ex in iter_examples(path, skip_invalid=True, counter=counter)]
    assert ids == ["a", "b"]
    assert counter["skipped"] == 3
    assert counter["first_error"].startswith(f"{path}:2: malformed JSON")


def test_skip_invalid_still_raises_for_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read file"):
        list(iter_records(tmp_path / "missing.jsonl", skip_invalid=True))
