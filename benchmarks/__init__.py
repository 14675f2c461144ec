"""Side-by-side benchmarks, ours vs the library, one table each. Run them as modules from the repository
root (``python -m benchmarks.nf4``, ``torchrun --nproc_per_node 2 -m benchmarks.sharding``): as plain
scripts, ``benchmarks/nf4.py`` would shadow the ``nf4`` package it measures."""
