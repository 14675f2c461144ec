"""recipe.instruct.jsonl: the three formats detected per file, and malformed lines named by file and line."""
import json

import pytest

from recipe.instruct.jsonl import read_jsonl


def write(tmp_path, *records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_plain_alpaca_and_chat_are_detected_and_normalized(tmp_path):
    assert read_jsonl(write(tmp_path, {"text": "a"}, "", {"text": "b"})) == ("plain", [{"text": "a"}, {"text": "b"}])
    fmt, examples = read_jsonl(write(tmp_path, {"instruction": "Add.", "input": "1 2", "output": "3"},
                                     {"instruction": "Say hi.", "input": "", "output": "hi"}))
    assert fmt == "alpaca" and examples == [
        {"messages": [{"role": "user", "content": "Add.\n\n1 2"}, {"role": "assistant", "content": "3"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}]
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a", "weight": 1}]}
    fmt, examples = read_jsonl(write(tmp_path, chat))
    assert fmt == "chat" and examples[0]["messages"][2] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("line, message", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"prompt": "x"}, r"keys \['prompt'\] match none of the formats"),
    ({"text": "x", "messages": []}, r"match \['plain', 'chat'\]"),
    ({"text": 3}, '"text" must be a string, got int'),
    ({"instruction": "x", "output": "y"}, "this line is alpaca but the file's first example is plain"),
    ({"messages": [{"role": "user", "content": "x"}]}, "needs at least one assistant turn"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages\\[0\\] role 'bot' is not one of system, user, assistant"),
    ({"messages": [{"content": "x"}]}, 'messages\\[0\\] must be an object with "role" and "content"'),
    ({"messages": "hi"}, '"messages" must be a non-empty list'),
])
def test_a_malformed_line_names_file_line_and_fault(tmp_path, line, message):
    chat = isinstance(line, dict) and "messages" in line and "text" not in line
    first = {"messages": [{"role": "assistant", "content": "fine"}]} if chat else {"text": "fine"}
    path = write(tmp_path, first, line)
    with pytest.raises(ValueError, match=f"data.jsonl:2: .*{message}"):
        read_jsonl(path)


def test_an_empty_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="holds no examples"):
        read_jsonl(write(tmp_path, ""))
