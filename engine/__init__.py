"""The inference engine (torch only; nothing here imports the UI or the store).

Importing the package first caps how long PyTorch's OpenMP workers spin after each parallel op
(`GOMP_SPINCOUNT`, unless the environment already sets it). libgomp spins ~300,000 polls by
default, milliseconds on these VMs, so a worker woken by any parallel PyTorch op in a decode
step (a logits copy, an argmax) held the second core through most of the step, and the CPU
kernels' own pool (engine/cpu/pool.c) got 8 % of the matmul work instead of half. At 20,000
polls, SmolLM2 bf16 batch 8 steps took 19.8 ms instead of 23.6 ms and fp32 ones 56.5 vs 54.7
(OMP_WAIT_POLICY=PASSIVE: 18.3, but fp32 65.3, as every parallel op then wakes its workers).
libgomp reads the variable once, when torch loads: imported after torch, this does nothing.
"""

import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
