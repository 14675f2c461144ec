"""recipe: the composition -- fine-tune a Llama with QLoRA + FSDP, every piece swappable for the library one.

    torchrun --nproc_per_node 2 -m recipe.train       # the main job (bundled tiny-llama, bundled instruction set)
    python -m recipe.plan llama-2-70b --offload        # per-rank memory plan for any config
    python -m recipe.measure --preset llama-2-70b      # the plan checked against a real 2-rank run

Files, in reading order: data.py (plain-text corpus, `Batch`, resumable sampler), instruct/ (JSONL
examples, chat templates, packing, token-weighted loss), corpus.py (``--data`` to rows), build.py (meta -> stream -> NF4
-> LoRA -> shard), twins/ (each component and its library twin behind one interface), loop.py (the
training loop, `LoopConfig`), job.py (the main job from a `JobConfig`), train.py (its command line),
checkpoint.py (atomic save, exact resume), adapter.py (PEFT-format adapter), files.py (atomic writes),
fingerprint.py (what a resume must match), device.py (a rank's device and process group), plan.py +
plan_cli.py + phases.py (memory planner), timemodel.py + microbench.py (step time), links.py (bytes per
link class), memory.py + phase_memory.py + measure.py (measuring what the plan predicts), generate.py
and export.py (commands on a trained adapter). Imports nf4, lora, sharding and llama; none of them imports recipe.
See ARCHITECTURE.md for the layers and the data flow of one step.
"""
