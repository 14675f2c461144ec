"""The job's data: ``--data`` to the training and held-out rows, what rank 0 reports, what a resume must match.

    corpus = load_corpus(config, model_config, world)   # corpus.train / corpus.heldout: rows for the Sampler

``--data`` (``JobConfig.data``) is one of

- nothing: the bundled instruction set (``recipe/instruct/data``: ``train.jsonl``, held out
  ``heldout.jsonl``);
- ``FILE.jsonl``: one example a line, its format (plain / Alpaca / chat) detected and reported
  (``recipe.instruct``); held out: ``--heldout FILE.jsonl``, else 10% of the file's examples chosen by the
  CRC32 of each example (``recipe.instruct.dataset.split_part``). Rendered with ``--template``, targets
  the responses only unless ``--train-on-prompt``, packed into ``--seq-len`` rows (or padded with
  ``--no-packing``), longer examples truncated (counted) or dropped with ``--drop-long``;
- ``pydoc``: the English documentation of ``pydoc_data/topics.py`` as plain text; or a text file or a
  directory of text files: windows of ``--seq-len`` tokens, every token a target (``recipe.data``).

The fingerprint (file SHA-256, format, template, packing, ...) goes into every checkpoint, so a run
resumes only on the very data it was saving from.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import llama

from . import data
from .instruct.batching import ExampleRows
from .instruct.corpus import BUNDLED_HELDOUT, BUNDLED_TRAIN, Question, held_out_questions, load_splits

if TYPE_CHECKING:
    from .job import JobConfig

PYDOC = "pydoc"


@dataclasses.dataclass
class Corpus:
    train: object                       # rows: data.TextWindows or instruct.ExampleRows
    heldout: object
    report: list[str]                   # what rank 0 prints
    fingerprint: dict                   # what a checkpoint must match
    questions: list[Question] = dataclasses.field(default_factory=list)  # answered before and after
    template: object = None             # the ChatTemplate of JSONL data (None for text)


def is_jsonl(config: JobConfig) -> bool:
    return config.data is None or Path(config.data).suffix == ".jsonl"


def tokenizer_of(config: JobConfig):
    return llama.ByteTokenizer() if config.tokenizer == "byte" else llama.load_tokenizer(config.build.model)


def text_corpus(config: JobConfig, tokenizer) -> Corpus:
    documents = data.load_documents(None if config.data == PYDOC else config.data)
    train_ids, heldout_ids = data.tokenize_splits(documents, tokenizer)
    digest = hashlib.sha256()
    for name, text in documents.items():
        digest.update(name.encode() + b"\0" + text.encode("utf-8", "replace") + b"\0")
    source = "the pydoc topics" if config.data == PYDOC else config.data
    return Corpus(data.TextWindows(data.windows(train_ids, config.seq_len)),
                  data.TextWindows(data.windows(heldout_ids, config.seq_len)),
                  [f"data: {source} as plain text, {len(documents)} documents, {len(train_ids)} + "
                   f"{len(heldout_ids)} tokens (train + held-out), windows of {config.seq_len}"],
                  {"kind": "text", "sha256": digest.hexdigest(), "seq_len": config.seq_len})


def jsonl_corpus(config: JobConfig, tokenizer) -> Corpus:
    path = config.data or BUNDLED_TRAIN
    heldout = config.heldout or (BUNDLED_HELDOUT if config.data is None else None)
    train, held = load_splits(path, tokenizer, config.build.model, config.template, config.seq_len,
                              config.train_on_prompt, config.drop_long, heldout)
    pad_id = getattr(tokenizer, "eos_token_id", 0)  # never scored nor attended to
    rows = [ExampleRows(part.examples, config.seq_len, config.packing, pad_id) for part in (train, held)]
    layout = f"packed into rows of {config.seq_len}" if config.packing else "one a row, padded per batch"
    report = [f"data: {part.report()}" for part in (train, held)]
    report.append(f"examples {layout}: {len(rows[0])} + {len(rows[1])} rows (train + held-out); targets: "
                  + ("every token" if config.train_on_prompt or train.format == "plain" else "the responses only"))
    fingerprint = {"kind": "jsonl", "train": train.fingerprint(), "heldout": held.fingerprint(),
                   "packing": config.packing}
    samples = config.samples if config.samples is not None else (4 if config.data is None else 0)
    return Corpus(rows[0], rows[1], report, fingerprint, held_out_questions(held, tokenizer, samples),
                  train.template if train.format != "plain" else None)


def largest_id(rows) -> int:
    if isinstance(rows, data.TextWindows):
        return int(rows.windows.max())
    return max(max(example.ids) for row in rows.rows for example in row)


def load_corpus(config: JobConfig, model_config: llama.LlamaConfig, world: int) -> Corpus:
    """Read and tokenize the data; refuse a tokenizer that does not fit the model and a world size the
    data cannot feed, naming both sides."""
    tokenizer = tokenizer_of(config)
    corpus = (jsonl_corpus if is_jsonl(config) else text_corpus)(config, tokenizer)
    largest = max(largest_id(corpus.train), largest_id(corpus.heldout))
    if largest >= model_config.vocab_size:
        raise ValueError(f"the tokenizer of --model {config.build.model} produces token id {largest}, but the model's "
                         f"vocab_size is {model_config.vocab_size}: tokenizer.json and config.json do not belong together")
    if world * config.batch_size > min(len(corpus.train), len(corpus.heldout)):
        raise ValueError(f"world size {world} is larger than this run can use: {world} ranks x --batch-size "
                         f"{config.batch_size} needs that many rows of {config.seq_len} tokens, the data has "
                         f"{len(corpus.train)} (train) and {len(corpus.heldout)} (held-out)")
    return corpus
