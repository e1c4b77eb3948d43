"""CTC speech recognition through client -> preproc_service -> model_service vs in process, same run.

    python bench/bench_asr.py [--clips 16] [--seconds 10] [--concurrency 1,8] [--chunk-length-s 0]

The model is a wav2vec2-base-sized CTC model without its top layers (conv front end of 7 layers,
512 channels, 320 samples per frame; 4 transformer layers of 768; random seeded weights, a
character vocabulary): the compute of a real speech model per audio second, not a toy's.
The clips are synthesised audio encoded as FLAC, so the services decode them as they would real
uploads; the in-process pipeline gets the decoded samples (its ffmpeg path needs a binary).

Measured: audio seconds transcribed per wall second, (a) the in-process pipeline called clip by
clip (before and after the services, mean), (b) the services at each concurrency (N asyncio
callers, one clip per call). Both sides give torch the same threads (--torch-threads).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.preproc_client import AsyncPreprocClient  # noqa: E402
from preproc_service import audio  # noqa: E402
from tests import audio_helpers, model_factory, servers  # noqa: E402

RATE = 16000


def build_model(root: Path):
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    tokenizer = model_factory.ctc_tokenizer(root / "vocab")
    config = Wav2Vec2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_hidden_layers=4,
                            feat_extract_norm="group", do_stable_layer_norm=False)
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(config).eval()
    fe = model_factory.wav2vec2_feature_extractor()
    directory = model_factory.save_audio_components(root / "wav2vec2-ctc", model, "automatic-speech-recognition",
                                                    "AutomaticSpeechRecognitionPipeline", fe, tokenizer)
    return directory, model, tokenizer, fe


def pipeline_rate(pipe, clips: list, options: dict, threads: int) -> float:
    """Audio s/s of the pipeline called clip by clip, on a worker thread as model_service runs its forward
    (on this machine a wav2vec2 forward on the main thread measured 2.5x slower than on another thread)."""
    import torch

    def run():
        torch.set_num_threads(threads)
        pipe(clips[0], **options)  # warm
        started = time.perf_counter()
        for clip in clips:
            pipe(clip, **options)
        return sum(len(c) for c in clips) / RATE / (time.perf_counter() - started)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


async def services_rate(address: str, files: list[bytes], seconds: float, concurrency: int, options: dict) -> float:
    async with AsyncPreprocClient(address, timeout=600) as client:
        await client.transcribe([files[0]], **options)  # warm
        queue = list(files)
        started = time.perf_counter()

        async def worker():
            while queue:
                await client.transcribe([queue.pop()], **options)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(files) * seconds / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--chunk-length-s", type=float, default=0.0, help="0: whole clips")
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()

    import transformers

    options = {"chunk_length_s": args.chunk_length_s} if args.chunk_length_s else {}
    with tempfile.TemporaryDirectory() as tmp:
        directory, model, tokenizer, fe = build_model(Path(tmp))
        files = [audio_helpers.encode(audio_helpers.synth(args.seconds, seed=i), "flac") for i in range(args.clips)]
        clips = [audio.decode(data, RATE, 10**9) for data in files]
        pipe = transformers.pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                                     feature_extractor=fe, device="cpu")
        before = pipeline_rate(pipe, clips, options, args.torch_threads)
        rows = []
        model_flags = ["--metrics-port", "0", "--torch-threads", str(args.torch_threads),
                       "--max-input-values", str(int(args.seconds * RATE) + RATE)]
        with servers.model_service(directory, *model_flags) as model_proc, \
                servers.preproc_service(directory, model_proc.address, "--metrics-port", "0") as preproc:
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                rows.append((concurrency, asyncio.run(services_rate(preproc.address, files, args.seconds,
                                                                    concurrency, options))))
        after = pipeline_rate(pipe, clips, options, args.torch_threads)
        reference = (before + after) / 2
        print(f"{args.clips} clips x {args.seconds:g} s, chunk_length_s {args.chunk_length_s:g}, "
              f"torch threads {args.torch_threads}; in-process pipeline {reference:.1f} audio s/s "
              f"(before {before:.1f}, after {after:.1f})")
        print("| concurrency | services audio s/s | vs in-process pipeline |")
        print("| ---: | ---: | ---: |")
        for concurrency, rate in rows:
            print(f"| {concurrency} | {rate:.1f} | {rate / reference:.2f} |")


if __name__ == "__main__":
    main()
