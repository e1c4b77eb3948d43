"""automatic-speech-recognition with Whisper (encoder-decoder): transformers'
AutomaticSpeechRecognitionPipeline for `self.type == "seq2seq_whisper"`, numpy only.

preprocess: audio -> mono float32 at the feature extractor's rate; with `chunk_length_s` cut as the
pipeline's `chunk_iter` cuts it (speech_recognition.chunk_iter), each chunk through the
WhisperFeatureExtractor (log-mel [1, n_mels, 3000]); without it, a clip longer than the extractor's 30 s
is featurised whole (`truncation=False`) for long-form generation;
forward: WhisperForConditionalGeneration.generate's loop over 30-second segments (seek), one model
service Generate per segment (model_service/generation/whisper.py builds the prompt and applies the
logits rules): a segment's tokens lose their eos, are cut at the last pair of timestamps unless a single
timestamp ends them (`_retrieve_segment`), and the next segment starts at that timestamp, or after
the segment; later segments reuse the first one's prompt (its detected language). Long-form
generation predicts timestamps, as generate forces it to;
postprocess: the chunks' tokens with their strides in seconds through the tokenizer's `_decode_asr`
(merging overlapping chunks, `return_timestamps` True: segment chunks with timestamps).

Streaming sends text as segments finish: only text that the next decode agreed with, up to its last
space, so it is never taken back; the end sends the rest of the final text.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import numpy as np

from preproc_service import audio
from preproc_service.deployment import Deployment, RequestScope, all_or_nothing
from preproc_service.generation.request_params import GENERATION_KEYS, typed_setting
from preproc_service.tasks.audio_classification import features, load_audio
from splitserve_common import call_context
from splitserve_common.errors import FailedPrecondition, InvalidArgument, Unavailable, peer_errors
from splitserve_pb import generation_pb2 as gpb

INPUT_STRIDE = 2  # WhisperEncoder: conv1 stride 1, conv2 stride 2 (frames per encoder position)
REFUSED_KEYS = ("stop", "return_full_text", "include_prompt", "collapse_whitespace", "logprobs")


@dataclass(frozen=True)
class Options:
    timestamps: bool               # return_timestamps True (segment timestamps in the answer)
    speech: gpb.SpeechOptions      # language, task (and timestamps, set per clip)
    settings: gpb.GenerationSettings


def options(params: dict, generate_kwargs: dict, model_default: bool = False) -> Options:
    """The request's Whisper options, checked as the pipeline checks them; refused by name otherwise.
    `model_default`: the generation config's return_timestamps, which the pipeline uses unless asked."""
    stamps = params.get("return_timestamps")
    if isinstance(stamps, str):
        stamps = {"true": True, "false": False, "": None}.get(stamps.lower(), stamps)
    if model_default:
        stamps = stamps or True
    if stamps == "char":
        raise InvalidArgument("return_timestamps 'char' is not available for Whisper: use true (segments)")
    if stamps == "word":
        raise InvalidArgument("return_timestamps 'word' (Whisper's cross-attention alignment) is not supported; "
                              "use true for segment timestamps")
    if stamps not in (None, True, False):
        raise InvalidArgument(f"return_timestamps must be true for a Whisper model, got {stamps!r}")
    refused = [key for key in REFUSED_KEYS if key in generate_kwargs]
    if refused:
        raise InvalidArgument(f"{', '.join(refused)} does not apply to speech recognition")
    settings = gpb.GenerationSettings()
    for key, value in generate_kwargs.items():
        if key not in GENERATION_KEYS:
            raise InvalidArgument(f"generation option {key!r} is not supported for speech recognition")
        setattr(settings, key, typed_setting(key, value))
    speech = gpb.SpeechOptions(**{k: params[k] for k in ("language", "task") if params.get(k) is not None})
    return Options(bool(stamps), speech, settings)


def options_of(dep: Deployment, params: dict) -> Options:
    return options(params, params.get("generate_kwargs") or {}, dep.require_info().return_timestamps)


def retrieve_segment(tokens: list[int], timestamp_begin: int, segment_frames: int) -> tuple[list[int], int]:
    """`_retrieve_segment` on one segment's tokens (eos removed): (the tokens kept, frames to seek on)."""
    is_stamp = [t >= timestamp_begin for t in tokens]
    single_ending = is_stamp[-2:] == [False, True]
    pairs = [i + 1 for i in range(len(tokens) - 1) if is_stamp[i] and is_stamp[i + 1]]
    if not pairs or single_ending:
        return tokens, segment_frames
    end = pairs[-1] + 1  # the last segment keeps its closing timestamp
    return tokens[:end], (tokens[end - 2] - timestamp_begin) * INPUT_STRIDE


def require_components(dep: Deployment):
    """(tokenizer, feature extractor), or FAILED_PRECONDITION."""
    if dep.tokenizer is None or dep.feature_extractor is None:
        raise FailedPrecondition("a Whisper model directory needs its tokenizer and feature extractor components "
                                 "to transcribe")
    return dep.tokenizer, dep.feature_extractor


def featurise(fe, samples: np.ndarray) -> np.ndarray:
    """[1, n_mels, frames] float32: 3000 frames, or more for a clip longer than 30 s (long-form)."""
    if samples.shape[0] > fe.n_samples:
        out = features(fe, samples, truncation=False, padding="longest", return_attention_mask=True)
    else:
        out = features(fe, samples, return_attention_mask=True)
    return out["input_features"]


def decode(dep: Deployment, outputs: list[tuple[list[int], tuple | None]], timestamps: bool) -> dict:
    """The pipeline's postprocess: `_decode_asr` over (tokens, stride in samples or None) per chunk."""
    tokenizer, fe = require_components(dep)
    rate = fe.sampling_rate
    model_outputs = []
    for tokens, stride in outputs:
        output = {"tokens": np.asarray([tokens], dtype=np.int64)}
        if stride is not None:
            output["stride"] = tuple(value / rate for value in stride)
        model_outputs.append(output)
    time_precision = fe.chunk_length / (fe.nb_max_frames // INPUT_STRIDE)
    text, optional = tokenizer._decode_asr(model_outputs, return_timestamps=timestamps or None,
                                           return_language=None, time_precision=time_precision)
    result = {"text": text}
    if timestamps:
        result["chunks"] = [{"text": c["text"], "timestamp": tuple(c["timestamp"])} for c in optional["chunks"]]
    return result


class Whisper:
    """One request's generation: segments of features to tokens through model_service's Generate."""

    def __init__(self, dep: Deployment, scope: RequestScope):
        self.dep, self.scope = dep, scope
        tokenizer, fe = require_components(dep)
        self.segment_frames = int(fe.nb_max_frames)
        self.timestamp_begin = tokenizer.convert_tokens_to_ids("<|notimestamps|>") + 1
        self.eos = set(dep.require_info().eos_token_ids)
        self.stub = dep.model.generation

    async def generate(self, segment: np.ndarray, prompt: list[int], opts: Options, timestamps: bool):
        """One segment: (the decoder prompt used, the generated tokens, eos removed)."""
        request = gpb.GenerateRequest(
            model_name=self.dep.model.model_name, id=uuid.uuid4().hex, input_ids=prompt, settings=opts.settings,
            adapter=self.scope.adapter, speech=opts.speech,
            encoder_features=gpb.EncoderFeatures(name="input_features", shape=list(segment.shape),
                                                 data=np.ascontiguousarray(segment, dtype="<f4").tobytes()))
        request.speech.return_timestamps = timestamps
        stream = self.stub.Generate(request, timeout=self.scope.remaining(),
                                    metadata=call_context.outgoing_metadata())
        used, tokens, finish = list(prompt), [], gpb.FINISH_REASON_UNSPECIFIED
        try:
            with peer_errors(self.dep.model.address, "transcribe"):
                async for step in stream:
                    if step.decoder_prompt_ids:
                        used = list(step.decoder_prompt_ids)
                    tokens.extend(step.token_ids)
                    finish = step.finish_reason
        finally:
            stream.cancel()
        if finish == gpb.FINISH_REASON_UNSPECIFIED:
            raise Unavailable(f"{self.dep.model.address} ended the generation stream without a finish reason")
        if tokens and tokens[-1] in self.eos:
            tokens = tokens[:-1]
        return used, tokens

    async def transcribe_features(self, feats: np.ndarray, opts: Options, on_segment=None) -> list[int]:
        """generate()'s seek loop over one chunk's features: the tokens of every segment, concatenated."""
        frames = feats.shape[-1]
        long_form = frames > self.segment_frames
        timestamps = opts.timestamps or long_form  # generate predicts timestamps for long-form audio
        seek, prompt, tokens = 0, [], []
        while seek < frames:
            width = min(frames - seek, self.segment_frames)
            segment = feats[:, :, seek:seek + width]
            if width < self.segment_frames:
                segment = np.pad(segment, ((0, 0), (0, 0), (0, self.segment_frames - width)))
            prompt, generated = await self.generate(segment, prompt, opts, timestamps)
            kept, offset = retrieve_segment(generated, self.timestamp_begin, width)
            tokens += kept
            # An offset of 0 (a pair of <|0.00|>) would never move on (generate would loop): the chunk is done.
            seek = frames if offset <= 0 else seek + offset
            if on_segment is not None:
                on_segment(tokens, seek >= frames)
        return tokens


class TextStream:
    """Text deltas that are never taken back: the part two successive decodes agree on, up to its last
    space; `finish` sends the rest of the final text."""

    def __init__(self):
        self.previous = ""
        self.sent = ""

    def push(self, text: str) -> str:
        agreed = 0
        for a, b in zip(self.previous, text, strict=False):
            if a != b:
                break
            agreed += 1
        self.previous = text
        cut = text.rfind(" ", 0, agreed)
        if cut <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):cut], text[:cut]
        return delta

    def finish(self, text: str) -> str:
        if not text.startswith(self.sent):
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of the transcription {text!r}")
        delta, self.sent = text[len(self.sent):], text
        return delta


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    """Whisper's options checked (refused by name); chunking is checked by speech_recognition."""
    require_components(dep)
    options_of(dep, params)
    return {}


async def preprocess(dep: Deployment, inputs: list[audio.AudioInput], params: dict, chunking, chunk_iter) -> dict:
    """{"chunks": (clip index, features, stride in samples or None) per chunk, "clips": how many}: the clips
    cut as the pipeline's chunk_iter cuts them (chunking from speech_recognition), log-mel per chunk."""
    _, fe = require_components(dep)
    clips = await load_audio(dep, inputs)
    pieces = []
    for i, clip in enumerate(clips):
        if not chunking.chunk_len:
            pieces.append((i, clip, None))
        else:
            pieces.extend((i, chunk, stride) for chunk, stride in chunk_iter(clip, chunking))
    feats = await asyncio.gather(*(asyncio.to_thread(featurise, fe, samples) for _, samples, _ in pieces))
    return {"chunks": [(i, f, stride) for (i, _, stride), f in zip(pieces, feats, strict=True)], "clips": len(clips)}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict,
                  on_segment=None) -> dict:
    """{"tokens": per chunk, its segments' tokens}: every chunk at once, its segments in turn."""
    whisper = Whisper(dep, scope)
    opts = options_of(dep, params)
    return {"tokens": await all_or_nothing(
        whisper.transcribe_features(feats, opts, on_segment and on_segment(k))
        for k, (_, feats, _) in enumerate(model_inputs["chunks"]))}


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list[dict]:
    timestamps = options_of(dep, params).timestamps
    per_clip: list[list] = [[] for _ in range(model_inputs["clips"])]
    for (i, _, stride), tokens in zip(model_inputs["chunks"], model_outputs["tokens"], strict=True):
        per_clip[i].append((tokens, stride))
    return [decode(dep, outputs, timestamps) for outputs in per_clip]


async def transcribe_stream(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict):
    """After preprocess: yields text deltas in order as segments finish, then the final result dict."""
    chunks = model_inputs["chunks"]
    timestamps = options_of(dep, params).timestamps
    progress: list[list[int]] = [[] for _ in chunks]
    finished = [False] * len(chunks)
    updated = asyncio.Event()

    def on_segment(index):
        def record(tokens, done=False):
            progress[index] = list(tokens)
            finished[index] = finished[index] or done
            updated.set()
        return record

    running = asyncio.ensure_future(forward(dep, scope, model_inputs, params, on_segment))
    running.add_done_callback(lambda _: updated.set())
    stream = TextStream()
    try:
        while not running.done():
            await updated.wait()
            updated.clear()
            # Finished chunks in order (a later chunk's merge only changes the tail of the one before it);
            # an unchunked clip's segments as they finish.
            done = next((k for k, flag in enumerate(finished) if not flag), len(chunks))
            partial = [(progress[0], None)] if len(chunks) == 1 else \
                [(progress[k], stride) for k, (_, _, stride) in enumerate(chunks[:done])]
            delta = stream.push(decode(dep, partial, timestamps)["text"]) if partial else ""
            if delta:
                yield delta
        model_outputs = running.result()
    finally:
        running.cancel()
    with scope.stage("postprocess"):
        (result,) = postprocess(dep, model_inputs, model_outputs, params)
    delta = stream.finish(result["text"])
    if delta:
        yield delta
    yield result
