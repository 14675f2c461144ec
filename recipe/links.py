"""Collective bytes per link class for full sharding vs hybrid sharding, and which is faster on a given interconnect.

    python -m recipe.plan llama-2-70b --nodes 2 --gpus-per-node 8 --intra-gbs 300 --inter-gbs 25

With N nodes of G GPUs (world W = N x G), per rank and per optimizer step of one micro-batch:

* full sharding: one group of all W ranks. Each unit is all-gathered in forward and again in backward
  (checkpointing's recompute reuses the backward gather; the embedding, whose backward never runs, is
  gathered once, and so is the root unit holding the final norm, which stays gathered from its forward
  through its backward), and each trainable group's gradient is reduce-scattered once. With N > 1 that group
  crosses nodes, so every byte counts as "inter".
* hybrid sharding (shard within a node, replicate across nodes): the same all-gathers and
  reduce-scatters, inside the node's group of G ("intra"), then the reduce-scattered gradient shard
  (1/G of the LoRA gradients, fp32) all-reduced across the N replicas ("inter").

``collective_bytes`` counts the *payload* of each call the way a counter wrapped around the collectives
would: the full gathered tensor of an all-gather, the full input of a reduce-scatter, the tensor of an
all-reduce, summed per group class. The bytes a rank actually puts on the wire follow from a ring
algorithm over n ranks: (n-1)/n of the payload for all-gather and reduce-scatter, 2(n-1)/n for all-reduce
(Patarasuk & Yuan 2009). ``comm_seconds`` turns them into time with the slowest link a ring crosses:
a ring over W ranks spread over nodes is as slow as one inter-node hop per step, and the G ranks of a
node share its network link (``inter_gbs`` is per node).
"""
from __future__ import annotations

import dataclasses

from .plan import Setup, llama_config, unit_bytes


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """Bandwidths in GB/s (1e9 bytes/s), one direction: between GPUs of a node, and a node's network link."""
    intra_gbs: float = 25.0    # PCIe 4.0 x16 between consumer GPUs without NVLink (32 GB/s theoretical)
    inter_gbs: float = 12.5    # 100 Gb/s Ethernet or InfiniBand EDR

    def __post_init__(self):
        for name in ("intra_gbs", "inter_gbs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 GB/s, got {getattr(self, name)}")


def step_payloads(config, setup: Setup) -> dict[str, int]:
    """Bytes per step of all units' all-gathers and of the trainable gradients reduce-scattered (full
    sizes, one micro-batch), and of the LoRA gradients (fp32, full)."""
    shape = llama_config(config)
    units, n_layers = unit_bytes(shape, setup), shape.num_hidden_layers
    root = shape.hidden_size * setup.compute_bytes  # the final norm, in the root unit: gathered once per step
    gathered = units["embedding"] + 2 * (n_layers * units["layer"] + units["head"]) + root  # embedding: forward only
    return {"all_gather": gathered, "reduce_scatter": 4 * n_layers * units["lora_params"],
            "lora_grads": 4 * n_layers * units["lora_params"]}


def collective_bytes(config, setup: Setup, nodes: int, gpus_per_node: int, strategy: str) -> dict[str, dict[str, int]]:
    """{"all_gather" | "reduce_scatter" | "all_reduce": {"intra": bytes, "inter": bytes}} per rank and step,
    for ``strategy`` "full" or "hybrid" on ``nodes`` x ``gpus_per_node`` ranks (payload per call, summed)."""
    if strategy not in ("full", "hybrid"):
        raise ValueError(f"strategy must be 'full' or 'hybrid', got {strategy!r}")
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    payload = step_payloads(config, setup)
    empty = {"intra": 0, "inter": 0}
    if strategy == "full":
        where = "inter" if nodes > 1 else "intra"
        return {"all_gather": {**empty, where: payload["all_gather"]},
                "reduce_scatter": {**empty, where: payload["reduce_scatter"]}, "all_reduce": dict(empty)}
    return {"all_gather": {**empty, "intra": payload["all_gather"]},
            "reduce_scatter": {**empty, "intra": payload["reduce_scatter"]},
            "all_reduce": {**empty, "inter": payload["lora_grads"] // gpus_per_node if nodes > 1 else 0}}


def comm_seconds(counts: dict, nodes: int, gpus_per_node: int, strategy: str, link: Interconnect) -> float:
    """Seconds of collective traffic per step, nothing overlapped (ring algorithms, see the module doc)."""
    world = nodes * gpus_per_node
    intra, inter = link.intra_gbs * 1e9, link.inter_gbs * 1e9
    if strategy == "full":
        ring = (world - 1) / world
        bandwidth = inter if nodes > 1 else intra  # every ring step crosses each node's link once
        return ring * sum(counts[op]["inter"] + counts[op]["intra"] for op in ("all_gather", "reduce_scatter")) / bandwidth
    ring = (gpus_per_node - 1) / gpus_per_node
    seconds = ring * (counts["all_gather"]["intra"] + counts["reduce_scatter"]["intra"]) / intra
    replicas = 2 * (nodes - 1) / nodes
    return seconds + replicas * counts["all_reduce"]["inter"] * gpus_per_node / inter  # G ranks share the node link


def compare_strategies(config, setup: Setup, nodes: int, gpus_per_node: int, link: Interconnect) -> str:
    """A table of bytes per link class and seconds per step for both strategies, and the verdict."""
    lines = [f"{nodes} node(s) x {gpus_per_node} GPUs, intra-node {link.intra_gbs:g} GB/s, inter-node "
             f"{link.inter_gbs:g} GB/s per node; per rank and step (payload of the calls, GiB):",
             f"{'strategy':<8}{'AG intra':>10}{'AG inter':>10}{'RS intra':>10}{'RS inter':>10}{'AR inter':>10}"
             f"{'comm s':>9}  persistent shards split over"]
    seconds = {}
    for strategy in ("full", "hybrid"):
        counts = collective_bytes(config, setup, nodes, gpus_per_node, strategy)
        seconds[strategy] = comm_seconds(counts, nodes, gpus_per_node, strategy, link)
        cells = [counts["all_gather"]["intra"], counts["all_gather"]["inter"], counts["reduce_scatter"]["intra"],
                 counts["reduce_scatter"]["inter"], counts["all_reduce"]["inter"]]
        lines.append(f"{strategy:<8}" + "".join(f"{b / 2**30:>10.2f}" for b in cells) + f"{seconds[strategy]:>9.2f}  "
                     + (f"{nodes * gpus_per_node} ranks" if strategy == "full" else f"{gpus_per_node} ranks"))
    faster = min(seconds, key=seconds.get)
    lines.append(f"verdict: {faster} sharding moves its bytes faster ({seconds[faster]:.2f} s vs "
                 f"{max(seconds.values()):.2f} s per step); hybrid holds {nodes}x more persistent memory per rank")
    return "\n".join(lines)
