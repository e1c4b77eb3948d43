"""automatic-speech-recognition, CTC models (wav2vec2-style): transformers'
AutomaticSpeechRecognitionPipeline preprocess/postprocess for `self.type == "ctc"`, numpy only.
Encoder-decoder models (Whisper) are served by whisper_asr.py: each stage here hands them over.

preprocess: audio -> mono float32 at the feature extractor's rate; with `chunk_length_s` the clip
is cut as the pipeline's `chunk_iter` cuts it (chunks of `chunk_length_s` overlapping by
`stride_length_s` on each side, default `chunk_length_s / 6`, all rounded to the model's
`inputs_to_logits_ratio`), each chunk run through the feature extractor with
`return_attention_mask=True`;
forward: one model request per chunk, all at once (model_service batches chunks of equal length);
the model side reduces `logits` to their argmax (`top_k` 1), so only token ids cross the wire;
postprocess: each chunk's stride rescaled to frames (`rescale_stride`) and cut off, the chunks'
tokens joined and decoded by the CTC tokenizer (repeats collapsed, blanks dropped, special tokens
kept as the pipeline keeps them), and `return_timestamps` "char" / "word" from its offsets.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from preproc_service import audio
from preproc_service.deployment import Deployment, RequestScope, all_or_nothing
from preproc_service.tasks import whisper_asr
from preproc_service.tasks.audio_classification import features, load_audio
from splitserve_common.errors import FailedPrecondition, InvalidArgument

TIMESTAMPS = ("char", "word")
PREPROCESS_STAGE = "features"  # decoding and feature extraction, as audio-classification


@dataclass(frozen=True)
class Chunking:
    chunk_len: int = 0       # samples per chunk; 0 = the whole clip at once
    stride_left: int = 0
    stride_right: int = 0


def is_whisper(dep: Deployment) -> bool:
    return dep.require_info().is_encoder_decoder


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    """return_timestamps, chunk_length_s and stride_length_s checked like the pipeline; the stride
    normalised to [left, right] seconds (dropped without chunks, as the pipeline ignores it)."""
    if is_whisper(dep):
        return {**whisper_asr.sanitize_parameters(dep, params), **chunk_parameters(dep, params)}
    require_ctc(dep)
    stamps = params.get("return_timestamps") or None
    if stamps is not None and stamps not in TIMESTAMPS:
        raise InvalidArgument(f"return_timestamps must be 'char' or 'word' for a CTC model, got {stamps!r}")
    asked = [key for key in ("language", "task") if params.get(key) is not None]
    asked += sorted(params.get("generate_kwargs") or {})
    if asked:  # refused by name, never dropped
        raise InvalidArgument(f"{', '.join(asked)} applies to encoder-decoder speech models (Whisper); this is a "
                              "CTC model")
    return chunk_parameters(dep, params)


def chunk_parameters(dep: Deployment, params: dict) -> dict:
    """chunk_length_s and stride_length_s checked like the pipeline (CTC and Whisper alike)."""
    chunk_length_s = params.get("chunk_length_s") or 0
    if chunk_length_s < 0:
        raise InvalidArgument(f"chunk_length_s must be >= 0, got {chunk_length_s}")
    if not chunk_length_s:
        return {"stride_length_s": None} if params.get("stride_length_s") else {}
    stride = params.get("stride_length_s")
    if stride is None:
        stride = chunk_length_s / 6
    stride = [float(s) for s in stride] if isinstance(stride, (list, tuple)) else [float(stride)]
    stride = stride * 2 if len(stride) == 1 else stride
    if len(stride) != 2 or min(stride) < 0:
        raise InvalidArgument(f"stride_length_s must be one number or [left, right] >= 0, got {stride}")
    chunking = chunking_of(dep, chunk_length_s, stride)
    if chunking.chunk_len <= chunking.stride_left + chunking.stride_right:
        raise InvalidArgument(f"chunk_length_s ({chunk_length_s}) must be longer than the two strides {stride}")
    return {"stride_length_s": stride}


def sampling_rate(dep: Deployment) -> int:
    return dep.feature_extractor.sampling_rate if dep.feature_extractor else 16000


def chunking_of(dep: Deployment, chunk_length_s: float, stride: list[float] | None) -> Chunking:
    """Chunk and strides in samples, rounded to the model's inputs_to_logits_ratio (0 chunk: no chunks)."""
    if not chunk_length_s:
        return Chunking()
    align_to, rate = dep.require_info().inputs_to_logits_ratio, sampling_rate(dep)

    def samples(seconds: float) -> int:
        return int(round(seconds * rate / align_to) * align_to)

    return Chunking(samples(chunk_length_s), samples(stride[0]), samples(stride[1]))


def chunk_iter(samples: np.ndarray, chunking: Chunking) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """(chunk, (chunk length, left stride, right stride)) as the pipeline's chunk_iter yields them."""
    step = chunking.chunk_len - chunking.stride_left - chunking.stride_right
    chunks = []
    for start in range(0, samples.shape[0], step):
        end = start + chunking.chunk_len
        chunk = samples[start:end]
        left = 0 if start == 0 else chunking.stride_left
        is_last = end >= samples.shape[0]
        right = 0 if is_last else chunking.stride_right
        if chunk.shape[0] > left:
            chunks.append((chunk, (chunk.shape[0], left, right)))
        if is_last:
            break
    return chunks


def rescale_stride(stride: tuple[int, int, int], ratio: float) -> tuple[int, int, int]:
    """Samples -> frames, as the pipeline's rescale_stride."""
    input_n, left, right = stride
    token_n = int(round(input_n * ratio))
    return token_n, int(round(left / input_n * token_n)), int(round(right / input_n * token_n))


def require_ctc(dep: Deployment):
    tokenizer = dep.tokenizer
    if tokenizer is None:
        raise FailedPrecondition("this model directory has no tokenizer: CTC token ids cannot become text")
    return tokenizer


async def preprocess(dep: Deployment, inputs: list[audio.AudioInput], params: dict) -> dict:
    """{"chunks": (clip index, model inputs, stride or None) for every chunk of every clip, in order,
    "clips": how many clips}."""
    if is_whisper(dep):
        return await whisper_asr.preprocess(dep, inputs, params, chunking_of(dep, params.get("chunk_length_s") or 0,
                                                                            params.get("stride_length_s")), chunk_iter)
    chunking = chunking_of(dep, params.get("chunk_length_s") or 0, params.get("stride_length_s"))
    clips = await load_audio(dep, inputs)
    limit = dep.require_info().max_input_values
    fe = dep.feature_extractor
    chunks = []
    for i, clip in enumerate(clips):
        if not chunking.chunk_len:
            if limit and clip.shape[0] > limit:
                raise InvalidArgument(f"audio {i}: {clip.shape[0]} samples is more than the model service takes "
                                      f"in one piece ({limit}); send chunk_length_s to cut it into chunks")
            chunks.append((i, features(fe, clip, return_attention_mask=True), None))
        else:
            chunks.extend((i, features(fe, chunk, return_attention_mask=True), stride)
                          for chunk, stride in chunk_iter(clip, chunking))
    return {"chunks": chunks, "clips": len(clips)}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    """{"tokens": token ids per chunk}: one model request per chunk, all at once (model_service
    batches chunks of equal length)."""
    if is_whisper(dep):
        return await whisper_asr.forward(dep, scope, model_inputs, params)
    return {"tokens": await all_or_nothing(forward_chunk(dep, scope, inputs)
                                           for _, inputs, _ in model_inputs["chunks"])}


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list[dict]:
    """One transcription per clip: its chunks' tokens without their strides, joined and decoded."""
    if is_whisper(dep):
        return whisper_asr.postprocess(dep, model_inputs, model_outputs, params)
    align_to = dep.require_info().inputs_to_logits_ratio
    per_clip: list[list[np.ndarray]] = [[] for _ in range(model_inputs["clips"])]
    for (i, _, stride), tokens in zip(model_inputs["chunks"], model_outputs["tokens"], strict=True):
        per_clip[i].append(trim(tokens, stride, align_to))
    return [transcription(dep, np.concatenate(pieces), params) for pieces in per_clip]


async def forward_chunk(dep: Deployment, scope: RequestScope, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Token ids [frames] of one chunk: the argmax of its logits, computed on the model side."""
    answer = await dep.forward(scope, inputs, ["logits"], {"top_k": 1})
    return answer["logits_topk_indices"][0, :, 0]


def trim(tokens: np.ndarray, stride: tuple[int, int, int] | None, align_to: int) -> np.ndarray:
    """A chunk's tokens without its strides (postprocess's cut, after _forward's rescale)."""
    if stride is None:
        return tokens
    total_n, left, right = rescale_stride(stride, 1 / align_to)
    return tokens[left:total_n - right]


def transcription(dep: Deployment, tokens: np.ndarray, params: dict) -> dict:
    """{"text"} of a clip's CTC tokens, with "chunks" (char or word offsets in seconds) for return_timestamps."""
    tokenizer, align_to, rate = dep.tokenizer, dep.require_info().inputs_to_logits_ratio, sampling_rate(dep)
    stamps = params.get("return_timestamps") or None
    ids = [int(t) for t in tokens]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    result = {"text": text}
    if stamps:
        offsets = tokenizer.decode(ids, skip_special_tokens=False, output_char_offsets=True)["char_offsets"]
        if stamps == "word":
            offsets = tokenizer._get_word_offsets(offsets, tokenizer.replace_word_delimiter_char)
        result["chunks"] = [{"text": item[stamps], "timestamp": (
            item["start_offset"] * align_to / rate, item["end_offset"] * align_to / rate)} for item in offsets]
    return result


class TextStream:
    """Text as chunks' tokens arrive, never taking back what was sent.

    Only text decoded from tokens before the last run (a repeat may go on in the next chunk) and
    before the last space (the tokenizer's clean-up can remove a space before punctuation) is
    sent; `finish` sends the rest of the final text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, tokens: np.ndarray) -> str:
        self.tokens.extend(int(t) for t in tokens)
        end = len(self.tokens)
        while end > 0 and self.tokens[end - 1] == self.tokens[-1]:
            end -= 1
        text = self.tokenizer.decode(self.tokens[:end], skip_special_tokens=False)
        cut = text.rfind(" ")
        if cut <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):cut], text[:cut]
        return delta

    def finish(self, text: str) -> str:
        if not text.startswith(self.sent):  # cannot happen for CTC decoding; never send a wrong total
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of the transcription {text!r}")
        delta, self.sent = text[len(self.sent):], text
        return delta


async def transcribe_stream(dep: Deployment, scope: RequestScope, item: audio.AudioInput, params: dict):
    """The streamed form of sanitize_parameters -> preprocess -> forward -> postprocess for one clip:
    yields text deltas in order as its chunks are recognised, then the final result dict (text, chunks)."""
    params.update(sanitize_parameters(dep, params))
    with scope.stage(PREPROCESS_STAGE):
        model_inputs = await preprocess(dep, [item], params)
    if is_whisper(dep):
        async for piece in whisper_asr.transcribe_stream(dep, scope, model_inputs, params):
            yield piece
        return
    align_to = dep.require_info().inputs_to_logits_ratio
    running = [asyncio.ensure_future(forward_chunk(dep, scope, inputs)) for _, inputs, _ in model_inputs["chunks"]]
    stream = TextStream(dep.tokenizer)
    pieces = []
    try:
        for task, (_, _, stride) in zip(running, model_inputs["chunks"], strict=True):
            pieces.append(trim(await task, stride, align_to))
            delta = stream.push(pieces[-1])
            if delta:
                yield delta
    finally:
        for task in running:
            task.cancel()
    with scope.stage("postprocess"):
        result = transcription(dep, np.concatenate(pieces), params)
    delta = stream.finish(result["text"])
    if delta:
        yield delta
    yield result
