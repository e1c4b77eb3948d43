"""What security costs: text-classification through client -> preproc -> model_service with
plaintext, with the bearer token, and with mutual TLS + token on both hops, vs in process, same run.

    python bench/bench_ops.py [SENTENCES] [--concurrency 1,16] [--limit 128]

SENTENCES defaults to ../shared/bench/sentences.txt (relative to the repo root). The model is the
real all-MiniLM-L6-v2 body with a seeded 3-label head (MLflow components layout); certificates
are made on the spot. Each configuration starts its own pair of services (metrics on, as in
production) and answers one sentence per request from N concurrent asyncio callers.

The in-process reference, measured in this process in the same run, is
`pipeline("text-classification")(sentences, batch_size=32)` (sentences/s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from client.preproc_client import AsyncPreprocClient  # noqa: E402
from splitserve_common.channels import ChannelSecurity, aio_channel  # noqa: E402
from splitserve_common.health_probe import check  # noqa: E402
from tests import model_factory, servers  # noqa: E402
from tests.ops_helpers import make_pki  # noqa: E402

DEFAULT_SENTENCES = ROOT.parent / "shared" / "bench" / "sentences.txt"
LABELS = ["negative", "neutral", "positive"]
TOKEN = "bench-token"


def build_model(root: Path):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = model_factory.minilm_dir()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(source), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)}).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return model_factory.save_components(root / "model", model, tokenizer, "text-classification"), model, tokenizer


def pipeline_rate(model, tokenizer, sentences: list[str]) -> float:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
    pipe(sentences[:8], truncation=True)  # warm up
    start = time.perf_counter()
    pipe(sentences, batch_size=32, truncation=True)
    return len(sentences) / (time.perf_counter() - start)


def configurations(pki) -> dict[str, tuple[list[str], list[str], ChannelSecurity]]:
    """name -> (server flags for both services, preproc's flags for its hop, client security)."""
    tls_server = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
                  "--tls-client-ca", str(pki.ca)]
    tls_hop = ["--model-service-tls-ca", str(pki.ca), "--model-service-tls-cert", str(pki.client.cert),
               "--model-service-tls-key", str(pki.client.key)]
    client_tls = {"ca": str(pki.ca), "cert": str(pki.client.cert), "key": str(pki.client.key)}
    token = ["--auth-token", TOKEN]
    return {
        "plaintext": ([], [], ChannelSecurity()),
        "bearer token": (token, ["--model-service-token", TOKEN], ChannelSecurity(token=TOKEN)),
        "mTLS + token, both hops": ([*tls_server, *token], [*tls_hop, "--model-service-token", TOKEN],
                                    ChannelSecurity(**client_tls, token=TOKEN)),
    }


def wait_serving(handle, security: ChannelSecurity, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(handle.log())
        if check(handle.address, security, timeout=1.0) == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(handle.log())


async def measure(address: str, security: ChannelSecurity, sentences: list[str], concurrency: int) -> dict:
    latencies: list[float] = []
    next_index = 0
    async with AsyncPreprocClient(address, timeout=120, channel=aio_channel(address, security)) as client:
        for sentence in sentences[:16]:  # warm the connections and the batcher
            await client.classify([sentence])

        async def caller():
            nonlocal next_index
            while next_index < len(sentences):
                sentence = sentences[next_index]
                next_index += 1
                start = time.perf_counter()
                await client.classify([sentence])
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"rate": len(sentences) / elapsed, "p50_ms": 1000 * statistics.median(latencies)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", type=Path, default=DEFAULT_SENTENCES)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--limit", type=int, default=128)
    args = parser.parse_args(argv)
    sentences = [s.strip() for s in args.sentences.read_text().splitlines() if s.strip()][:args.limit]
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model, tokenizer = build_model(Path(tmp))
        pki = make_pki(Path(tmp) / "pki")
        reference = pipeline_rate(model, tokenizer, sentences)
        rows = []
        for name, (server_flags, hop_flags, security) in configurations(pki).items():
            with servers.service("model_service", ["--model-dir", str(model_dir), "--metrics-port",
                                                   str(servers.free_port()), *server_flags], wait=False) as m:
                wait_serving(m, security)
                with servers.service("preproc_service",
                                     ["--model-dir", str(model_dir), "--model-service", m.address,
                                      "--metrics-port", str(servers.free_port()), *server_flags, *hop_flags],
                                     wait=False) as p:
                    wait_serving(p, security)
                    for level in levels:
                        rows.append((name, level, asyncio.run(measure(p.address, security, sentences, level))))
                        print(f"measured {name} at concurrency {level}", file=sys.stderr)
        reference = (reference + pipeline_rate(model, tokenizer, sentences)) / 2  # before and after the services

    print(f"{len(sentences)} sentences from {args.sentences}; "
          f"in-process pipeline batch 32: {reference:.1f} sentences/s")
    print()
    print("| configuration | concurrency | sentences/s | p50 ms | vs in-process pipeline | vs plaintext |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    plain = {level: r["rate"] for name, level, r in rows if name == "plaintext"}
    for name, level, r in rows:
        print(f"| {name} | {level} | {r['rate']:.1f} | {r['p50_ms']:.2f} | {r['rate'] / reference:.2f} | "
              f"{r['rate'] / plain[level]:.2f} |")


if __name__ == "__main__":
    main()
