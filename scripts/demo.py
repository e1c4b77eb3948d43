"""The README's first command (`make demo`): both services on the embedded all-MiniLM-L6-v2,
one real query through the client, then both services stop.

It ranks a few sentences by cosine similarity to a question: each text goes
client -> preproc_service (tokenizer, no torch) -> model_service (forward + mean pooling + normalize).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.preproc_client import PreprocClient  # noqa: E402
from tests import servers  # noqa: E402
from tests.model_factory import minilm_dir  # noqa: E402

QUESTION = "How do I keep my houseplants alive?"
SENTENCES = [
    "Water most indoor plants when the top inch of soil feels dry.",
    "The central bank raised interest rates by a quarter point.",
    "Place succulents near a bright window and avoid overwatering.",
    "Our team won the championship after a dramatic final.",
    "Yellowing leaves often mean a plant is getting too much water.",
    "The recipe calls for two cups of flour and a pinch of salt.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("sentences", nargs="*", default=SENTENCES)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = minilm_dir()
    started = time.perf_counter()
    print(f"starting model_service and preproc_service on all-MiniLM-L6-v2 ({model_dir}) ...", flush=True)
    with servers.model_service(model_dir, "--metrics-port", "0") as model, \
            servers.preproc_service(model_dir, model.address, "--metrics-port", "0") as preproc, \
            PreprocClient(preproc.address) as client:
        print(f"  model_service at {model.address}, preproc_service at {preproc.address} "
              f"(ready in {time.perf_counter() - started:.1f} s)\n")
        info = client.info()
        vectors = client.embed([args.question, *args.sentences])
        question, candidates = vectors[0], np.stack(vectors[1:])
        scores = candidates @ question  # the vectors are normalized: dot product = cosine
        print(f"task {info.task}, pooling {vectors.applied_parameters['pooling']}, "
              f"normalize {vectors.applied_parameters['normalize']}, {len(question)} dimensions\n")
        print(f"question: {args.question}\n")
        print(" rank  score   sentence")
        for rank, i in enumerate(np.argsort(-scores), start=1):
            print(f" {rank:>4}  {scores[i]:.3f}   {args.sentences[i]}")
    print("\nboth services stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
