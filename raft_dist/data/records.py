"""RAFT record schema and JSONL readers.

Every data problem surfaces as a `DataError` naming the file, the physical line and the reason,
because a bad line deep inside a large dataset is otherwise very hard to find.

Native RAFT JSONL schema (one JSON object per line; written by `to_json`)::

    {
      "id": str,                        # optional; defaults to "<file name>:<line>"
      "question": str,                  # non-empty
      "documents": [                    # non-empty list, in prompt order
        {"title": str (optional), "text": str}, ...
      ],
      "oracle_index": int | null,       # index into documents; null when the oracle was left out
      "oracle": str,                    # the oracle document text, always present; when
                                        # oracle_index is an int it equals that document's text
      "cot_answer": str,                # chain of thought ending in "<ANSWER>: ..."
      "instruction": str,               # optional; the rendered prompt, kept for reference
      "meta": object                    # optional; ignored
    }

Also read:

* the RAFT paper's public format: ``id, type, question, context, oracle_context, cot_answer,
  instruction`` where ``context`` is ``{"title": [[...]], "sentences": [[...]]}`` (each a list
  holding one list) or the flat variant with plain lists of strings. There is no oracle flag: the
  oracle is the first document whose stripped text equals the stripped ``oracle_context``, or
  None when it was dropped. The paper's generator fills titles with "placeholder_title", which is
  read as no title so it does not leak into prompts.
* instruction/output: ``{"instruction", "output", "input"?, "id"?}``, including the seed
  project's RAFT records, which carry ``oracle_context``, ``num_distractors`` and
  ``has_distractors`` beside a rendered instruction (and no ``question`` or ``context``): they
  are instruction/output examples, and their extra keys are kept as ``Example.meta``;
* prompt/completion: ``{"prompt", "completion", "id"?}``;
* chat: ``{"messages": [system?, user, assistant], "id"?}`` with ``role``/``content`` messages
  (OpenAI, TRL), or ShareGPT's ``{"conversations": [...]}`` with ``from``/``value`` and the roles
  ``system``, ``human`` and ``gpt``. One exchange per record, as RAFT examples are; a system
  message goes before the user's text, since prompt/completion has no place of its own for it.
  The text is used as it is (no chat template), as for every other format, so training,
  evaluation and `ask` tokenize prompts the same way.

The last three become `Example`s directly; RAFT records become `Example`s through `to_example`.
Files are read by `raft_dist.data.reader`; this module turns one decoded JSON value into a record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from raft_dist.data.answers import ANSWER_TAG
from raft_dist.data.prompts import render_prompt
from raft_dist.data.schema import Document, Example, RaftRecord
from raft_dist.errors import DataError

__all__ = [
    "Document",
    "Example",
    "RaftRecord",
    "Record",
    "detect_format",
    "parse_record",
    "shown",
]

Record = RaftRecord | Example

Format = Literal["raft", "raft_paper", "instruction", "prompt_completion", "chat"]

PAPER_PLACEHOLDER_TITLE = "placeholder_title"

# Checked in order; the first rule that matches wins, so a record that is missing a required
# field is still reported against the format it was meant to be. `context` is what marks the
# RAFT paper's records; `oracle_context` alone does not, because the seed project's records carry
# it beside instruction/output.
_FORMAT_RULES: tuple[tuple[Format, tuple[str, ...]], ...] = (
    ("raft", ("documents", "oracle_index")),
    ("raft_paper", ("context",)),
    ("prompt_completion", ("prompt", "completion")),
    ("chat", ("messages", "conversations")),
    ("instruction", ("output",)),
    ("raft_paper", ("oracle_context", "cot_answer", "question")),
    ("instruction", ("instruction",)),
)
_FORMAT_FIELDS: dict[Format, str] = {
    "raft": "question, documents, oracle_index, oracle, cot_answer",
    "raft_paper": "question, context, oracle_context, cot_answer",
    "instruction": "instruction, output",
    "prompt_completion": "prompt, completion",
    "chat": "messages [system?, user, assistant]",
}
# A chat message's keys: OpenAI style, or ShareGPT's, whose role names are mapped to OpenAI's.
_CHAT_KEYS = {"messages": ("role", "content"), "conversations": ("from", "value")}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
_CHAT_SHAPES = (["user", "assistant"], ["system", "user", "assistant"])


# --------------------------------------------------------------------------- field validation


def shown(text: str) -> str:
    """Text from a user's file as it appears in a message: as is, or quoted with escapes when it
    holds a newline or another control character, so every message stays one line."""
    return text if text.isprintable() else repr(text)


def _type_name(value: object) -> str:
    """JSON-flavoured names, since users think of their data in JSON terms."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


class _Fields:
    """Typed access to one record's fields, raising DataErrors that point at the line."""

    def __init__(self, obj: dict, path: object, line: int | None, fmt: Format) -> None:
        self.obj = obj
        self.path = path
        self.line = line
        self.fmt = fmt

    def error(self, message: str) -> DataError:
        return DataError(self.path, self.line, message)

    def require(self, name: str) -> object:
        if name not in self.obj:
            raise self.error(f'missing required field "{name}" ({self.fmt} format)')
        return self.obj[name]

    def string(self, name: str, *, optional: bool = False, non_empty: bool = True) -> str | None:
        if optional and self.obj.get(name) is None:
            return None
        value = self.require(name)
        if not isinstance(value, str):
            raise self.error(f'field "{name}" must be a string, got {_type_name(value)}')
        if non_empty and not value.strip():
            raise self.error(f'field "{name}" must not be empty')
        return value

    def record_id(self) -> str:
        """Ids are optional; the file position is a stable, human-findable fallback."""
        value = self.obj.get("id")
        if value is None:
            name = Path(str(self.path)).name
            return f"{name}:{self.line}" if self.line is not None else name
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error(f'field "id" must be a string, got {_type_name(value)}')
        return str(value)

    def cot_answer(self) -> str:
        value = self.string("cot_answer")
        assert value is not None
        if ANSWER_TAG not in value:
            raise self.error(f'field "cot_answer" has no "{ANSWER_TAG}" final answer')
        return value


def _document(fields: _Fields, index: int, value: object) -> Document:
    name = f"documents[{index}]"
    if not isinstance(value, dict):
        raise fields.error(f'field "{name}" must be an object, got {_type_name(value)}')
    if "text" not in value:
        raise fields.error(f'missing required field "{name}.text" (raft format)')
    text, title = value["text"], value.get("title") or ""
    if not isinstance(text, str):
        raise fields.error(f'field "{name}.text" must be a string, got {_type_name(text)}')
    if not isinstance(title, str):
        raise fields.error(f'field "{name}.title" must be a string, got {_type_name(title)}')
    return Document(text=text, title=title)


def _oracle_index(fields: _Fields, n_documents: int) -> int | None:
    value = fields.require("oracle_index")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise fields.error(
            f'field "oracle_index" must be an integer or null, got {_type_name(value)}'
        )
    if not 0 <= value < n_documents:
        raise fields.error(
            f'field "oracle_index" is {value}, out of range for {n_documents} documents'
        )
    return value


# --------------------------------------------------------------------------- formats


def _parse_raft(fields: _Fields) -> RaftRecord:
    question = fields.string("question")
    raw_docs = fields.require("documents")
    if not isinstance(raw_docs, list):
        raise fields.error(f'field "documents" must be a list, got {_type_name(raw_docs)}')
    if not raw_docs:
        raise fields.error('field "documents" must not be empty')
    documents = tuple(_document(fields, i, doc) for i, doc in enumerate(raw_docs))
    oracle_index = _oracle_index(fields, len(documents))
    oracle = fields.string("oracle", non_empty=False)
    assert question is not None and oracle is not None
    if oracle_index is not None and documents[oracle_index].text.strip() != oracle.strip():
        raise fields.error(f'field "oracle" does not match documents[{oracle_index}].text')
    return RaftRecord(
        id=fields.record_id(),
        question=question,
        documents=documents,
        oracle_index=oracle_index,
        oracle=oracle,
        cot_answer=fields.cot_answer(),
        instruction=fields.string("instruction", optional=True, non_empty=False),
    )


def _string_list(fields: _Fields, name: str, value: object) -> list[str]:
    """Accept the paper's list-holding-one-list shape and the flat list of strings."""
    if not isinstance(value, list):
        raise fields.error(f'field "{name}" must be a list, got {_type_name(value)}')
    if value and all(isinstance(item, list) for item in value):
        if len(value) != 1:
            raise fields.error(f'field "{name}" must hold one list, got {len(value)} lists')
        value = value[0]
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise fields.error(f'field "{name}[{i}]" must be a string, got {_type_name(item)}')
    return list(value)


def _paper_documents(fields: _Fields) -> tuple[Document, ...]:
    context = fields.require("context")
    if not isinstance(context, dict):
        raise fields.error(
            'field "context" must be an object {"title": [...], "sentences": [...]} '
            f"(raft_paper format), got {_type_name(context)}"
        )
    if "sentences" not in context:
        raise fields.error('missing required field "context.sentences" (raft_paper format)')
    texts = _string_list(fields, "context.sentences", context["sentences"])
    if not texts:
        raise fields.error('field "context.sentences" must not be empty')
    titles = _string_list(fields, "context.title", context.get("title") or [])
    if titles and len(titles) != len(texts):
        raise fields.error(
            f'field "context.title" has {len(titles)} titles for {len(texts)} sentences'
        )
    titles = [t if t != PAPER_PLACEHOLDER_TITLE else "" for t in titles] or [""] * len(texts)
    return tuple(
        Document(text=text, title=title) for text, title in zip(texts, titles, strict=True)
    )


def _parse_paper(fields: _Fields) -> RaftRecord:
    question = fields.string("question")
    documents = _paper_documents(fields)
    oracle = fields.string("oracle_context", non_empty=False)
    assert question is not None and oracle is not None
    target = oracle.strip()
    oracle_index = next((i for i, d in enumerate(documents) if d.text.strip() == target), None)
    return RaftRecord(
        id=fields.record_id(),
        question=question,
        documents=documents,
        oracle_index=oracle_index,
        oracle=oracle,
        cot_answer=fields.cot_answer(),
        instruction=fields.string("instruction", optional=True, non_empty=False),
    )


def _meta(fields: _Fields, used: tuple[str, ...]) -> dict:
    """The record's other keys (e.g. the seed's oracle_context), kept rather than dropped."""
    return {k: v for k, v in fields.obj.items() if k not in used and k != "id"}


def _parse_instruction(fields: _Fields) -> Example:
    instruction = fields.string("instruction")
    output = fields.string("output")
    extra = fields.string("input", optional=True, non_empty=False)
    assert instruction is not None and output is not None
    prompt = instruction + (f"\n\n{extra}" if extra else "") + "\n"
    meta = _meta(fields, ("instruction", "output", "input"))
    return Example(id=fields.record_id(), prompt=prompt, completion=output, meta=meta)


def _parse_prompt_completion(fields: _Fields) -> Example:
    prompt = fields.string("prompt")
    completion = fields.string("completion")
    assert prompt is not None and completion is not None
    meta = _meta(fields, ("prompt", "completion"))
    return Example(id=fields.record_id(), prompt=prompt, completion=completion, meta=meta)


def _parse_chat(fields: _Fields) -> Example:
    name = "messages" if "messages" in fields.obj else "conversations"
    role_key, text_key = _CHAT_KEYS[name]
    messages = fields.require(name)
    if not isinstance(messages, list) or not messages:
        raise fields.error(f'field "{name}" must be a non-empty list, got {_type_name(messages)}')
    roles, texts = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise fields.error(f'field "{name}[{i}]" must be an object')
        for key in (role_key, text_key):
            if not isinstance(message.get(key), str):
                raise fields.error(f'field "{name}[{i}].{key}" must be a string')
        role = message[role_key]
        roles.append(_SHAREGPT_ROLES.get(role, role) if name == "conversations" else role)
        texts.append(message[text_key])
    if roles not in _CHAT_SHAPES:
        raise fields.error(
            f"a chat record must hold one user and then one assistant message (a system "
            f"message may come first); found roles [{', '.join(map(shown, roles))}]"
        )
    prompt, completion = texts[-2], texts[-1]
    if len(texts) == 3:
        prompt = texts[0] + "\n\n" + prompt
    if not texts[-2].strip() or not completion.strip():
        raise fields.error("the user and assistant messages must not be empty")
    return Example(
        id=fields.record_id(), prompt=prompt, completion=completion, meta=_meta(fields, (name,))
    )


_PARSERS = {
    "raft": _parse_raft,
    "raft_paper": _parse_paper,
    "instruction": _parse_instruction,
    "prompt_completion": _parse_prompt_completion,
    "chat": _parse_chat,
}


def detect_format(obj: dict, path: object = "<record>", line: int | None = None) -> Format:
    """Pick the format from distinctive keys, so one file may mix shapes without a flag."""
    for fmt, keys in _FORMAT_RULES:
        if any(key in obj for key in keys):
            return fmt
    found = ", ".join(sorted(map(shown, obj))[:12]) or "none"
    expected = "; ".join(f"{fmt} ({fields})" for fmt, fields in _FORMAT_FIELDS.items())
    raise DataError(path, line, f"unknown record format: found keys [{found}]; expected {expected}")


def parse_record(obj: object, path: object, line: int | None) -> Record:
    """Validate one decoded JSON value; errors name the field, the expected and the found type."""
    if not isinstance(obj, dict):
        raise DataError(path, line, f"record must be a JSON object, got {_type_name(obj)}")
    fmt = detect_format(obj, path, line)
    return _PARSERS[fmt](_Fields(obj, path, line, fmt))


def to_example(rec: Record) -> Example:
    """The prompt comes from the shared template, never from a stored instruction, so training
    matches what evaluation and `ask` will show the model."""
    if isinstance(rec, Example):
        return rec
    return Example(
        id=rec.id, prompt=render_prompt(rec.question, rec.documents), completion=rec.cot_answer
    )


def to_json(record: Record) -> dict:
    """Native schema for RAFT records (prompt/completion for Examples); round-trips through
    `parse_record`."""
    if isinstance(record, Example):
        return {"id": record.id, "prompt": record.prompt, "completion": record.completion}
    documents = [
        {"title": d.title, "text": d.text} if d.title else {"text": d.text}
        for d in record.documents
    ]
    instruction = record.instruction
    if instruction is None:
        instruction = render_prompt(record.question, record.documents)
    return {
        "id": record.id,
        "question": record.question,
        "documents": documents,
        "oracle_index": record.oracle_index,
        "oracle": record.oracle,
        "cot_answer": record.cot_answer,
        "instruction": instruction,
    }
