"""Speech recognition through client -> preproc_service -> model_service vs in process, same run.

    python bench/bench_asr.py [--model ctc|whisper] [--clips 16] [--seconds 10] [--concurrency 1,8]
                              [--chunk-length-s 0] [--max-new-tokens 32] [--num-beams 1]

ctc: a wav2vec2-base-sized CTC model without its top layers (conv front end of 7 layers,
512 channels, 320 samples per frame; 4 transformer layers of 768; random seeded weights, a
character vocabulary): the compute of a real speech model per audio second, not a toy's.
whisper: a whisper-tiny-sized WhisperForConditionalGeneration (80 mel bins, d_model 384, 4 + 4
layers, random seeded weights; the tests' small byte-level vocabulary with Whisper's special and
timestamp tokens), greedy (--num-beams 1) with --max-new-tokens per 30-second segment on both sides;
the services' answers are checked equal to the pipeline's.
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


def build_whisper(root: Path):
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tokenizer = model_factory.whisper_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    eos = ids("<|endoftext|>")
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=384, encoder_layers=4, decoder_layers=4,
                           encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
                           decoder_ffn_dim=1536, num_mel_bins=80, decoder_start_token_id=ids("<|startoftranscript|>"),
                           pad_token_id=eos, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = model_factory.whisper_generation_config(tokenizer)
    fe = WhisperFeatureExtractor(feature_size=80)
    directory = model_factory.save_audio_components(root / "whisper", model, "automatic-speech-recognition",
                                                    "AutomaticSpeechRecognitionPipeline", fe, tokenizer)
    return directory, model, tokenizer, fe


def pipeline_rate(pipe, clips: list, options: dict, threads: int, answers: list | None = None) -> float:
    """Audio s/s of the pipeline called clip by clip, on a worker thread as model_service runs its forward
    (on this machine a wav2vec2 forward on the main thread measured 2.5x slower than on another thread)."""
    import torch

    def run():
        torch.set_num_threads(threads)
        pipe(clips[0], **options)  # warm
        started = time.perf_counter()
        for clip in clips:
            text = pipe(clip, **options)["text"]
            if answers is not None:
                answers.append(text)
        return sum(len(c) for c in clips) / RATE / (time.perf_counter() - started)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


async def services_rate(address: str, files: list[bytes], seconds: float, concurrency: int, options: dict,
                        answers: dict | None = None) -> float:
    async with AsyncPreprocClient(address, timeout=600) as client:
        await client.transcribe([files[0]], **options)  # warm
        queue = list(enumerate(files))
        started = time.perf_counter()

        async def worker():
            while queue:
                index, data = queue.pop()
                (result,) = await client.transcribe([data], **options)
                if answers is not None:
                    answers[index] = result.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(files) * seconds / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["ctc", "whisper"], default="ctc")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="whisper: new tokens per segment")
    parser.add_argument("--num-beams", type=int, default=1, help="whisper: 1 is greedy (the pipeline's default is 5)")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--chunk-length-s", type=float, default=0.0, help="0: whole clips")
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()

    import transformers

    options = {"chunk_length_s": args.chunk_length_s} if args.chunk_length_s else {}
    pipe_options, client_options = dict(options), dict(options)
    if args.model == "whisper":
        generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
        pipe_options.update(generation)
        client_options["generate_kwargs"] = generation
    with tempfile.TemporaryDirectory() as tmp:
        build = build_whisper if args.model == "whisper" else build_model
        directory, model, tokenizer, fe = build(Path(tmp))
        files = [audio_helpers.encode(audio_helpers.synth(args.seconds, seed=i), "flac") for i in range(args.clips)]
        clips = [audio.decode(data, RATE, 10**9) for data in files]
        pipe = transformers.pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                                     feature_extractor=fe, device="cpu")
        reference_answers: list = []
        before = pipeline_rate(pipe, clips, pipe_options, args.torch_threads, reference_answers)
        rows = []
        model_flags = ["--metrics-port", "0", "--torch-threads", str(args.torch_threads),
                       "--max-input-values", str(int(args.seconds * RATE) + RATE)]
        with servers.model_service(directory, *model_flags) as model_proc, \
                servers.preproc_service(directory, model_proc.address, "--metrics-port", "0") as preproc:
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                answers: dict = {}
                rows.append((concurrency, asyncio.run(services_rate(preproc.address, files, args.seconds,
                                                                    concurrency, client_options, answers))))
                if [answers[i] for i in range(len(files))] != reference_answers:
                    raise SystemExit(f"concurrency {concurrency}: the services' transcripts differ from the pipeline's")
        after = pipeline_rate(pipe, clips, pipe_options, args.torch_threads)
        reference = (before + after) / 2
        print(f"{args.model}: {args.clips} clips x {args.seconds:g} s, chunk_length_s {args.chunk_length_s:g}, "
              f"torch threads {args.torch_threads}; in-process pipeline {reference:.1f} audio s/s "
              f"(before {before:.1f}, after {after:.1f})")
        print("| concurrency | services audio s/s | vs in-process pipeline |")
        print("| ---: | ---: | ---: |")
        for concurrency, rate in rows:
            print(f"| {concurrency} | {rate:.1f} | {rate / reference:.2f} |")


if __name__ == "__main__":
    main()
