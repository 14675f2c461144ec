"""recipe: the composition -- fine-tune a Llama with QLoRA + FSDP, every piece swappable for the library one.

    torchrun --nproc_per_node 2 -m recipe.train       # the main job (bundled tiny-llama, pydoc topics)
    python -m recipe.plan llama-2-70b --offload        # per-rank memory plan for any config
    python -m recipe.measure --preset llama-2-70b      # the plan checked against a real 2-rank run

Files, in reading order: data.py (corpus, `Batch`, resumable sampler), build.py (meta -> stream -> NF4
-> LoRA -> shard), twins/ (each component and its library twin behind one interface), loop.py (the
training loop, `LoopConfig`), job.py (the main job from a `JobConfig`), train.py (its command line),
checkpoint.py (atomic save, exact resume), adapter.py (PEFT-format adapter), files.py (atomic writes),
device.py (a rank's device and process group), plan.py (memory planner), memory.py + measure.py
(measuring what the plan predicts). Imports nf4, lora, sharding and llama; none of them imports recipe.
See ARCHITECTURE.md for the layers and the data flow of one step.
"""
