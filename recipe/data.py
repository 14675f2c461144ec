"""The fine-tuning corpus and a sampler that can stop and resume at the exact same batch.

The plain-text corpus (``--data pydoc``; the job's default is the bundled instruction set,
``recipe.instruct``) is a different domain from the one the bundled model was pretrained on (Python
source, ``llama/corpus.py``): the English documentation in the standard library's
``pydoc_data/topics.py`` -- the text ``help("if")`` prints -- found through ``sysconfig`` and read by
importing the module and taking its ``topics`` dict (a plain dict literal; nothing is unpickled).
``--data`` may point to a text file or a directory of ``.txt``/``.md``/``.rst`` files instead.

Every document goes to the held-out split when the CRC32 of its name falls in the last
``heldout_percent`` buckets (``llama.corpus.in_heldout``, the pretraining corpus's rule: a property of
the name alone, the same split on every machine); a corpus of a single document is cut at
``1 - heldout_percent / 100`` of its tokens instead. Token streams are cut into windows by
``llama.corpus.windows``.

What the loop consumes is a `Batch`: ``input_ids`` and ``labels`` (the same tensor for plain text: the
model shifts them), plus ``position_ids`` and ``attention_mask``, None for plain text, filled for packed
or padded instruction data (``recipe.instruct``). The `Sampler` and `eval_batches` draw rows from any
*rows* object (``len(rows)`` and ``rows.batch(indices) -> Batch``): `TextWindows` here, or
``recipe.instruct.ExampleRows`` (packed or padded JSONL examples).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sysconfig
from pathlib import Path

import torch

from llama.corpus import in_heldout, windows
from llama.tokenizer import encode_document

__all__ = ["Batch", "Sampler", "TextWindows", "eval_batches", "load_documents", "pydoc_topics_path",
           "tokenize_splits", "windows"]

TEXT_SUFFIXES = (".txt", ".md", ".rst")


@dataclasses.dataclass
class Batch:
    """One rank's micro-batch. ``labels`` holds the token each position's next token is checked against
    (the model shifts it by one); ``position_ids`` / ``attention_mask`` stay None for plain text."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    @classmethod
    def of_text(cls, ids: torch.Tensor) -> Batch:
        """Plain next-token prediction on windows of text: the labels are the ids themselves."""
        return cls(input_ids=ids, labels=ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    def to(self, device: torch.device) -> Batch:
        return Batch(**{f.name: None if getattr(self, f.name) is None else
                        getattr(self, f.name).to(device, non_blocking=True) for f in dataclasses.fields(self)})

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward, without the fields that are None."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def pydoc_topics_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"


def load_documents(data: str | Path | None = None) -> dict[str, str]:
    """``{name: text}``: the pydoc topics (default), one text file, or every text file under a directory."""
    if data is None:
        path = pydoc_topics_path()
        spec = importlib.util.spec_from_file_location("_pydoc_topics", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return {name: module.topics[name] for name in sorted(module.topics)}
    path = Path(data)
    if path.is_file():
        return {path.name: path.read_text(encoding="utf-8", errors="replace")}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return {p.relative_to(path).as_posix(): p.read_text(encoding="utf-8", errors="replace") for p in files}
    raise FileNotFoundError(f"--data {path} is neither a file nor a directory")


def tokenize_splits(documents: dict[str, str], tokenizer, heldout_percent: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids) as 1-D int64 tensors, documents (each BOS ... EOS: ``llama.tokenizer.encode_document``)
    concatenated in name order."""
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be in 1..99, got {heldout_percent}")
    if len(documents) == 1:
        ids = torch.tensor(encode_document(tokenizer, next(iter(documents.values()))), dtype=torch.int64)
        cut = int(len(ids) * (1 - heldout_percent / 100))
        return ids[:cut], ids[cut:]
    splits = {"train": [], "heldout": []}
    for name, text in documents.items():
        splits["heldout" if in_heldout(name, heldout_percent) else "train"] += encode_document(tokenizer, text)
    return tuple(torch.tensor(splits[s], dtype=torch.int64) for s in ("train", "heldout"))


class TextWindows:
    """Rows of plain text: the ``(n, seq_len)`` windows, every token a target."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, indices: torch.Tensor) -> Batch:
        return Batch.of_text(self.windows[indices])


def as_rows(rows):
    """A tensor of windows as `TextWindows`; any other rows object as it is."""
    return TextWindows(rows) if isinstance(rows, torch.Tensor) else rows


class Sampler:
    """Shuffled rows, one global batch per call, each rank taking its rows; resumable exactly.

    ``rows``: a tensor of windows, or any rows object (``len``, ``batch(indices) -> Batch``). Epoch e
    visits the rows in ``randperm(n, generator seeded with seed + e)``; a global batch is
    ``batch_size * world_size`` consecutive rows of that order (wrapping into the next epoch), and rank
    r takes rows ``[r * batch_size, (r + 1) * batch_size)``. The whole state is a few integers
    (``state_dict``: epoch, position, seed and the number of rows, checked on load), so a resumed run
    draws the very same batches as an uninterrupted one.
    """

    def __init__(self, rows, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.rows = as_rows(rows)
        if len(self.rows) < batch_size * world_size:
            raise ValueError(f"{len(self.rows)} rows cannot fill one global batch of "
                             f"{batch_size} x {world_size} ranks; use a smaller --batch-size or --seq-len")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_batch(self) -> Batch:
        """This rank's ``batch_size`` rows of the next global batch."""
        rows = []
        for _ in range(self.batch_size * self.world_size):
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            rows.append(self._order[self.position])
            self.position += 1
        return self.rows.batch(torch.stack(rows)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a `state_dict`; one that does not belong to these rows and this seed is refused."""
        if not isinstance(state, dict) or not {"epoch", "position", "seed", "rows"} <= state.keys() or \
                not all(isinstance(state[k], int) and not isinstance(state[k], bool) for k in state):
            raise ValueError(f"sampler state must hold integers epoch, position, seed and rows, got {state!r:.200}")
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler seed {state['seed']} != --seed {self.seed}")
        if state["rows"] != len(self.rows):
            raise ValueError(f"checkpoint sampler was drawing from {state['rows']} rows, this data has "
                             f"{len(self.rows)}: not the same data, --seq-len or packing")
        if state["epoch"] < 0 or not 0 <= state["position"] <= len(self.rows):
            raise ValueError(f"checkpoint sampler position {state['epoch']}:{state['position']} is outside "
                             f"0..{len(self.rows)} rows")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def eval_batches(rows, batch_size: int, n_batches: int, rank: int = 0, world_size: int = 1):
    """The first ``n_batches`` global batches of the held-out rows (windows or a rows object), in
    order, this rank's rows."""
    if batch_size < 1 or n_batches < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"eval_batches needs batch_size >= 1, n_batches >= 1 and 0 <= rank < world_size, got "
                         f"batch_size={batch_size}, n_batches={n_batches}, rank={rank}, world_size={world_size}")
    rows, per_global = as_rows(rows), batch_size * world_size
    n_batches = min(n_batches, len(rows) // per_global)
    if n_batches == 0:
        raise ValueError(f"held-out split has {len(rows)} rows, fewer than one global batch ({per_global})")
    for b in range(n_batches):
        start = b * per_global + rank * batch_size
        yield rows.batch(torch.arange(start, start + batch_size))
