"""Read and write Hugging Face Llama checkpoints one decoder layer at a time.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``.

Streaming design -- ``iter_checkpoint(directory)`` yields ``(layer, tensors)``:
  - first ``(None, {...})`` with every tensor outside the decoder layers (embed_tokens, norm, lm_head),
  - then ``(i, {...})`` for decoder layer i = 0, 1, ..., with that layer's tensors,
keyed by full HF names (``model.layers.3.mlp.up_proj.weight``). Each group comes from memory-mapped
files (``safe_open``) opened for that group only; safetensors 0.8 returns tensors that are private
(copy-on-write) views of the mapping, read from disk when touched and released when dropped. So at any
moment the process holds one layer's tensors plus whatever the caller keeps (drop your reference to a
group before asking for the next one, e.g. ``del tensors`` at the end of the loop body). Build the model on ``meta``, and
for each group quantize / shard / copy, then drop the tensors: peak memory is one layer, not the model.

A bitsandbytes pre-quantized 4-bit checkpoint (``weight`` as packed uint8 plus ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``) is recognised: such a weight arrives as ONE entry
``name -> {"weight": ..., "weight.absmax": ..., ...}``, the linear's state dict with prefix "weight",
untouched, ready for ``nf4.from_bnb_state_dict(sd, prefix="weight")``.

Every shape is checked against ``config.json`` and every key against the architecture; errors name
the file and the key. Nothing is unpickled: safetensors holds only raw tensors and a JSON header.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from .atomic_files import atomic_directory, link_other_files
from .config import LlamaConfig
from .hf_writer import StreamingWriter
from .model import Llama

CONFIG_FILE, SINGLE_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
QUANT_STATE = re.compile(r"^(.*\.weight)\.quant_state\.bitsandbytes__(nf4|fp4)$")
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")

Value = torch.Tensor | dict[str, torch.Tensor]


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of this config stores (a tied lm_head is not stored)."""
    with torch.device("meta"):
        model = Llama(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def stream_order(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor in the order ``iter_checkpoint`` yields them: the tensors
    outside the decoder layers, then layer 0, 1, ..., each in architecture order."""
    shapes = expected_shapes(config)
    groups = _by_layer(shapes)
    return [(name, shapes[name]) for layer in [None, *range(config.num_hidden_layers)] for name in groups[layer]]


def _by_layer(names) -> dict[int | None, list[str]]:
    """The names grouped by decoder layer (None: outside the layers), each group in the given order."""
    groups: dict[int | None, list[str]] = defaultdict(list)
    for name in names:
        groups[layer_of(name)].append(name)
    return groups


def layer_of(name: str) -> int | None:
    match = LAYER.match(name)
    return int(match.group(1)) if match else None


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError for bad headers / truncation
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None


def key_to_file(directory: str | Path) -> dict[str, Path]:
    """Which file holds each tensor (from the index, or from the single file's header)."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{directory / INDEX_FILE}: not a safetensors index ({err!r})") from None
        return {key: directory / file for key, file in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        with _open(directory / SINGLE_FILE) as f:
            return {key: directory / SINGLE_FILE for key in f.keys()}
    raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _group_bnb(files: dict[str, Path]) -> dict[str, list[str]]:
    """Entry name -> stored keys: a bnb 4-bit weight gathers its companions, any other key stands alone."""
    quantized = {m.group(1) for key in files if (m := QUANT_STATE.match(key))}
    entries: dict[str, list[str]] = {}
    for key in files:
        owner = next((key[: -len(s)] for s in BNB_SUFFIXES if key.endswith(s) and key[: -len(s)] in quantized), None)
        entries.setdefault(owner or key, []).append(key)
    return entries


def _check_keys(entries: dict[str, list[str]], files: dict[str, Path], shapes: dict) -> None:
    missing = sorted(set(shapes) - set(entries))
    unexpected = sorted(set(entries) - set(shapes))
    if missing:
        raise KeyError(f"checkpoint is missing {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                       f"(expected in {sorted({str(p) for p in files.values()})})")
    if unexpected:
        raise KeyError(f"unexpected key {unexpected[0]!r} in {files[entries[unexpected[0]][0]]}"
                       f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}")


def _read_entry(name: str, keys: list[str], files: dict[str, Path], handles: dict, shape) -> Value:
    def read(key: str) -> torch.Tensor:
        path = files[key]
        if key not in handles[path].keys():
            raise KeyError(f"{path}: the index lists {key!r} but the file does not hold it")
        try:
            return handles[path].get_tensor(key)
        except Exception as err:
            raise ValueError(f"{path}: cannot read tensor {key!r} ({err})") from None

    if keys == [name]:
        tensor = read(name)
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{files[name]}: tensor {name!r} is {tensor.dtype}; a Llama weight must be floating "
                             "point (a 4-bit weight comes with its bitsandbytes quant_state entries)")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{files[name]}: tensor {name!r} has shape {tuple(tensor.shape)} "
                             f"but config.json implies {shape}")
        return tensor
    state = {"weight" + key[len(name):]: read(key) for key in keys}  # keys relative to prefix "weight"
    state_key = next(k for k in state if k.startswith("weight.quant_state."))
    stored = tuple(json.loads(bytes(state[state_key].tolist()).decode())["shape"])
    if stored != shape:
        raise ValueError(f"{files[name]}: 4-bit tensor {name!r} has shape {stored} but config.json implies {shape}")
    return state


def iter_checkpoint(directory: str | Path, config: LlamaConfig | None = None) -> Iterator[tuple[int | None, dict]]:
    """Yield ``(None, non-layer tensors)``, then ``(i, layer i's tensors)`` for each decoder layer."""
    directory = Path(directory)
    config = config or LlamaConfig.from_hf(directory)
    files = key_to_file(directory)
    entries = _group_bnb(files)
    shapes = expected_shapes(config)
    _check_keys(entries, files, shapes)
    groups = _by_layer(shapes)
    for layer in [None, *range(config.num_hidden_layers)]:
        names = groups[layer]
        paths = {files[key] for name in names for key in entries[name]}
        with ExitStack() as stack:  # this group's files are mapped only while it is read
            handles = {path: stack.enter_context(_open(path)) for path in sorted(paths)}
            tensors = {name: _read_entry(name, entries[name], files, handles, shapes[name]) for name in names}
        yield layer, tensors
        del tensors  # keep no second reference while the next group is read: the peak stays one layer


def load_checkpoint(model: Llama | None, directory: str | Path,
                    on_tensor: Callable[[str, Value], torch.Tensor | None] | None = None) -> Llama:
    """Load ``directory`` into ``model`` (built from its config.json on ``meta`` if None), layer by layer.

    A parameter still on ``meta`` is replaced by the loaded tensor (keeping the checkpoint's dtype);
    a materialised one is copied into. ``on_tensor(name, value)``, if given, sees every entry first:
    it returns the tensor to load (possibly transformed) or None when it has consumed the entry itself
    (e.g. quantized it into a replacement module). A pre-quantized 4-bit entry must be consumed."""
    config = LlamaConfig.from_hf(directory)
    if model is None:
        with torch.device("meta"):
            model = Llama(config)
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a llama.Llama or None, got {type(model).__name__}")
    for _, tensors in iter_checkpoint(directory, config):
        for name, value in tensors.items():
            value = on_tensor(name, value) if on_tensor is not None else value
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name!r} in {directory} is pre-quantized 4-bit: pass an on_tensor that "
                                 "consumes it (e.g. nf4.from_bnb_state_dict), or use iter_checkpoint")
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            current = getattr(module, attr)
            if current.is_meta:
                setattr(module, attr, torch.nn.Parameter(value, requires_grad=current.requires_grad))
            else:
                with torch.no_grad():
                    current.copy_(value)
    if config.tie_word_embeddings:  # re-tie: assigning embed_tokens.weight replaced the shared Parameter
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def is_checkpoint_file(name: str) -> bool:
    """Whether ``save_checkpoint`` owns the file ``name`` (it is replaced, never carried over)."""
    return name in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE) or bool(SHARD_FILE.match(name))


def save_checkpoint(model: Llama, directory: str | Path, max_shard_bytes: int = 5 * 2**30,
                    dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``config.json`` plus one ``model.safetensors`` or, above ``max_shard_bytes``, shards and an
    index (``llama.hf_writer.StreamingWriter``: one tensor in memory at a time), all-or-nothing: the new
    directory is built beside ``directory`` and swapped into place (``llama.atomic_files.atomic_directory``),
    bringing along the other files ``directory`` held (a tokenizer, a log). A failure at any point leaves
    the previous checkpoint whole. ``dtype``: the stored dtype (None: the model's). Returns the tensor files."""
    if not isinstance(model, Llama):
        raise TypeError(f"model must be a llama.Llama, got {type(model).__name__}")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    if any(t.is_meta for t in state.values()):
        raise ValueError("cannot save a model whose parameters are still on the meta device")
    dtypes = {t.dtype for t in state.values()}
    if dtype is None and len(dtypes) > 1:
        raise ValueError(f"the model holds several dtypes {sorted(map(str, dtypes))}; pass dtype= to store one")
    layout = stream_order(model.config)
    with atomic_directory(directory) as tmp:
        link_other_files(directory, tmp, replaced=is_checkpoint_file)
        writer = StreamingWriter(tmp, layout, dtype or dtypes.pop(), max_shard_bytes)
        for name, _ in layout:
            writer.write(name, state[name])
        files = writer.finish(model.config.to_hf())
    return [Path(directory) / file.name for file in files]
