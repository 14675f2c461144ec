"""Write a Hugging Face checkpoint one tensor at a time, never holding a shard in memory.

    with atomic_directory("out/") as tmp:
        writer = StreamingWriter(tmp, layout, torch.bfloat16, max_shard_bytes=5 * 10**9)
        for name, tensor in produce():          # in layout order
            writer.write(name, tensor)
        writer.finish(config.to_hf())

A safetensors file is an 8-byte header length, a JSON header giving every tensor's dtype, shape and
byte range, then the bytes. The layout -- names and shapes in the order they will be produced -- is
known before any tensor exists (it follows from config.json), so the shards are planned first (greedy:
a new shard when the next tensor would pass ``max_shard_bytes``), each file's header is written when
the file is opened, and every tensor's bytes go straight to disk as it arrives. Memory: one tensor.

One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``, Hugging Face's names. ``llama.atomic_files.atomic_directory`` makes the
whole directory appear at once (built beside it under a temporary name, then renamed): an interrupted
export leaves the previous directory, or none, never half of one.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .atomic_files import atomic_directory  # noqa: F401  (the example above; recipe.export uses it)

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class StreamingWriter:
    """Writes the tensors of ``layout`` (a list of (name, shape)) in that order, cast to ``dtype``."""

    def __init__(self, directory: str | Path, layout: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int):
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"dtype must be one of {list(SAFETENSORS_DTYPES)}, got {dtype}")
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        self.directory, self.dtype, self.layout = Path(directory), dtype, list(layout)
        size = torch.empty((), dtype=dtype).element_size()
        self.shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, shape in self.layout:
            nbytes = size * int(torch.Size(shape).numel())
            if self.shards[-1] and used + nbytes > max_shard_bytes:
                self.shards.append([])
                used = 0
            self.shards[-1].append((name, tuple(shape), nbytes))
            used += nbytes
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_bytes = sum(nbytes for shard in self.shards for *_, nbytes in shard)
        self._next, self._shard, self._in_shard, self._file = 0, -1, 0, None

    def _open_next_shard(self) -> None:
        self._shard += 1
        header, offset = {}, 0
        for name, shape, nbytes in self.shards[self._shard]:
            header[name] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.directory / self.files[self._shard], "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._in_shard = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout (its name and shape must be the expected ones)."""
        if self._next >= len(self.layout):
            raise ValueError(f"every tensor of the layout is written; got an extra {name!r}")
        expected, shape = self.layout[self._next]
        if name != expected or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"expected tensor {expected!r} of shape {tuple(shape)} next, got {name!r} of shape "
                             f"{tuple(tensor.shape)}")
        if self._file is None or self._in_shard == len(self.shards[self._shard]):
            if self._file is not None:
                self._file.close()
            self._open_next_shard()
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous().reshape(-1)
        self._file.write(memoryview(data.view(torch.uint8).numpy()))  # no extra copy of the bytes
        self._in_shard += 1
        self._next += 1

    def finish(self, config: dict) -> list[Path]:
        """Close the last shard, write the index (when sharded) and ``config.json``; return the shards."""
        if self._next != len(self.layout):
            raise ValueError(f"{len(self.layout) - self._next} tensors of the layout were never written, "
                             f"the next being {self.layout[self._next][0]!r}")
        self._file.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: file for file, shard in zip(self.files, self.shards) for name, *_ in shard}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        dtype_name = str(self.dtype).removeprefix("torch.")
        config = {**config, "torch_dtype": dtype_name, "dtype": dtype_name}
        (self.directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return [self.directory / file for file in self.files]
