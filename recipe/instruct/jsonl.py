"""Read a JSONL file of training examples: one JSON object per line, one format per file.

Three formats are recognised by their keys (detected from the first example, then required of all):

- ``plain``:  ``{"text": "..."}`` -- every token is a target (continued pretraining);
- ``alpaca``: ``{"instruction": "...", "input": "..." (optional), "output": "..."}`` -- the format of
  Stanford Alpaca (Taori et al. 2023), the default dataset of the QLoRA reference system;
- ``chat``:   ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` -- the
  conversation format ``transformers``' ``apply_chat_template`` takes.

Every example is returned either as ``{"text": str}`` or as ``{"messages": [...]}``: an Alpaca record
becomes one user turn (the instruction, then a blank line and the input when there is one) and one
assistant turn (the output), so a single template renders all of them. Blank lines are skipped.
"""
from __future__ import annotations

import json
from pathlib import Path

FORMATS = {"plain": {"text"}, "alpaca": {"instruction", "output"}, "chat": {"messages"}}
ROLES = ("system", "user", "assistant")


def detect_format(record: dict) -> str:
    """The format whose required keys the record has (``plain``, ``alpaca`` or ``chat``)."""
    found = [name for name, keys in FORMATS.items() if keys <= record.keys()]
    if len(found) != 1:
        raise ValueError(f"keys {sorted(record)} match {found or 'none'} of the formats "
                         f"plain {{text}}, alpaca {{instruction, input?, output}}, chat {{messages}}")
    return found[0]


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _chat(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise ValueError(f'messages[{i}] must be an object with "role" and "content", got {message!r:.80}')
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{i}] role {message['role']!r} is not one of {', '.join(ROLES)}")
        turns.append({"role": message["role"], "content": _string(message, "content")})
    if not any(turn["role"] == "assistant" for turn in turns):
        raise ValueError("a conversation needs at least one assistant turn (nothing to learn otherwise)")
    return turns


def normalize(record: dict, fmt: str) -> dict:
    """The example as ``{"text"}`` or ``{"messages"}`` (see the module docstring)."""
    if fmt == "plain":
        return {"text": _string(record, "text")}
    if fmt == "alpaca":
        prompt = _string(record, "instruction")
        if record.get("input"):
            prompt += "\n\n" + _string(record, "input")
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": _string(record, "output")}]}
    return {"messages": _chat(record["messages"])}


def read_jsonl(path: str | Path) -> tuple[str, list[dict]]:
    """``(format, examples)`` of a JSONL file; a malformed line raises ValueError naming file and line."""
    path = Path(path)
    fmt, examples = None, []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                line_format = detect_format(record)
                if fmt is not None and line_format != fmt:
                    raise ValueError(f"this line is {line_format} but the file's first example is {fmt}")
                fmt = line_format
                examples.append(normalize(record, fmt))
            except ValueError as err:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{number}: {err}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return fmt, examples
