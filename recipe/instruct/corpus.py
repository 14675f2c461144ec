"""A JSONL training file and its held-out examples as the rows the training loop samples.

    train, heldout = load_splits("chats.jsonl", tokenizer, model_dir, seq_len=256)       # CRC32 split
    train, heldout = load_splits("chats.jsonl", tokenizer, model_dir, heldout="eval.jsonl")
    rows = ExampleRows(train.examples, seq_len, packing=True)
    questions = held_out_questions(heldout, tokenizer, 4)

The held-out examples come from ``heldout`` when it is given (the bundled set ships its own,
``data/heldout.jsonl``, held out by module), else from the file itself: the CRC32 split of
``dataset.split_part`` (10% of the examples, chosen by the CRC32 of each example's JSON). Both sides
are rendered with the same template and fitted to the same ``seq_len``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .dataset import InstructData, load_instruct
from .encode import TextEncoder, special_tokens
from .templates import ChatTemplate, load_template

DATA = Path(__file__).resolve().parent / "data"
BUNDLED_TRAIN, BUNDLED_HELDOUT = DATA / "train.jsonl", DATA / "heldout.jsonl"


def load_splits(path: str | Path, tokenizer, model_dir, template: str = "auto", seq_len: int = 256,
                train_on_prompt: bool = False, drop_long: bool = False,
                heldout: str | Path | None = None) -> tuple[InstructData, InstructData]:
    """(train, held-out) examples of ``path``: ``heldout`` as the held-out file, or the CRC32 split."""
    options = dict(tokenizer=tokenizer, model_dir=model_dir, template=template, seq_len=seq_len,
                   train_on_prompt=train_on_prompt, drop_long=drop_long)
    if heldout is not None:
        return load_instruct(path, **options), load_instruct(heldout, **options)
    return load_instruct(path, part="train", **options), load_instruct(path, part="heldout", **options)


@dataclass
class Question:
    """A held-out question to answer greedily before and after training."""
    text: str                  # the last user turn before the first assistant turn ("" if none)
    reference: str             # the answer the data gives
    prompt_ids: list[int]      # the conversation up to that turn, with the assistant header


def held_out_questions(data: InstructData, tokenizer, n: int) -> list[Question]:
    """``n`` of the held-out conversations spread over the file (none for plain text), each cut before
    its first assistant turn and rendered with the generation prompt, as ``recipe.generate --chat``."""
    if data.format == "plain" or n < 1:
        return []
    encoder = TextEncoder(tokenizer, data.template.special_tokens)
    picked = [data.conversations[i * len(data.conversations) // n] for i in range(min(n, len(data.conversations)))]
    questions = []
    for conversation in picked:
        messages = conversation["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = data.template.render(messages[:first], add_generation_prompt=True)
        asked = next((m["content"] for m in reversed(messages[:first]) if m["role"] == "user"), "")
        questions.append(Question(asked, messages[first]["content"], encoder.encode(prompt)[0]))
    return questions


def chat_prompt(model_dir, adapter_dir, tokenizer, text: str) -> list[int]:
    """The ids of a one-turn conversation ``text``, rendered with the generation prompt in the template
    the adapter was trained with (its ``chat_template.jinja``, written by the main job), else the
    checkpoint's own, else ``chatml`` (``--template auto``): what ``recipe.generate --chat`` sends."""
    special = special_tokens(model_dir, tokenizer)
    saved = Path(adapter_dir) / "chat_template.jinja" if adapter_dir is not None else None
    template = (ChatTemplate(saved.read_text(encoding="utf-8"), special, name="adapter") if saved and saved.is_file()
                else load_template(model_dir, special, "auto"))
    rendered = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return TextEncoder(tokenizer, special).encode(rendered)[0]
