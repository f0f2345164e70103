"""Settings shared by the qad tests (tests/test_qad*.py) and their fixtures (tests/conftest.py)."""

# The student: the trained tiny model quantized with the NVFP4 aggressive recipe (the release's case).
STUDENT = ("mamba_moe_nvfp4_aggressive", "model=tiny_trained", "calib.num_samples=8", "calib.max_seq_len=64")
# Three optimiser steps of four samples (<= 63 tokens: odd, so that TP2 pads them to a multiple of TP)
# from the default blend, a resumable checkpoint every two steps, held-out KL at steps 0, 2 and 3.
FAST = ("qad.tokens=600", "qad.global_batch_size=4", "qad.max_seq_len=63", "qad.save_every=2", "qad.eval_every=2",
        "qad.lr=3e-4", "qad.heldout_samples=4")
# The layouts compared with one process: expert parallel over two data-parallel ranks, and TP2
# (sequence parallel, TP-sharded logits in ModelOpt's KL).
EP2 = (["parallel.ep=2"], 2)
TP2 = (["parallel.tp=2"], 2)
