"""Audio in: container bytes, float32 samples or a local file, to mono float32 at the model's rate.

Decoding and resampling use PyAV (FFmpeg's libraries, bundled in its wheels): WAV, FLAC, MP3,
OGG (Vorbis/Opus) and whatever else FFmpeg reads. Down-mixing and resampling go through
libswresample, as `ffmpeg -ac 1 -ar RATE` does for the transformers pipelines' `ffmpeg_read`.
Samples sent at another rate than the model's are resampled the same way (the in-process
pipeline would use torchaudio's sinc resampler there, so those answers are close, not equal).

A string is a location (MLflow's audio input may be a path or URL): URLs are refused, since the
services never fetch anything, and local paths are read only under the operator's
`--audio-root`. Every clip is bounded by `--max-audio-seconds`, checked while decoding.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitserve_common.errors import FailedPrecondition, InvalidArgument

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass(frozen=True)
class AudioSettings:
    root: str = ""                  # --audio-root: local files are readable only below it ("" = none)
    max_seconds: float = 600.0      # --max-audio-seconds, per clip
    max_inputs: int = 32            # --max-audio-inputs, clips per request
    max_bytes: int = 64 * 1024 * 1024


@dataclass
class AudioInput:
    """One request item: exactly one of data (container bytes), samples (+ sampling_rate) or location."""
    data: bytes = b""
    samples: np.ndarray | None = None
    sampling_rate: int = 0
    location: str = ""


def load(item: AudioInput, rate: int, settings: AudioSettings, index: int = 0) -> np.ndarray:
    """Mono float32 samples at `rate` (blocking: call it from a worker thread)."""
    limit = int(settings.max_seconds * rate)
    if item.samples is not None:
        if item.sampling_rate <= 0:
            raise InvalidArgument(f"audio {index}: samples need their sampling_rate (> 0)")
        samples = np.asarray(item.samples, dtype=np.float32)
        if samples.size == 0:
            raise InvalidArgument(f"audio {index}: no samples")
        if not np.isfinite(samples).all():
            raise InvalidArgument(f"audio {index}: samples hold NaN or infinite values")
        if samples.size / item.sampling_rate > settings.max_seconds:
            raise InvalidArgument(f"audio {index}: {samples.size / item.sampling_rate:.1f} s is longer than the "
                                  f"limit of {settings.max_seconds:g} s (--max-audio-seconds)")
        if item.sampling_rate == rate:
            return samples
        return _resample(samples, item.sampling_rate, rate, limit, index)
    data = item.data or (read_location(item.location, settings, index) if item.location else b"")
    if not data:
        raise InvalidArgument(f"audio {index}: empty; send container bytes, samples with their rate, or a location")
    return decode(data, rate, limit, settings.max_seconds, index)


def read_location(location: str, settings: AudioSettings, index: int = 0) -> bytes:
    if _URL.match(location):
        raise InvalidArgument(f"audio {index}: {location!r} is a URL; the services do not fetch URLs: send the "
                              "audio bytes instead")
    if not settings.root:
        raise FailedPrecondition(f"audio {index}: reading local files is off on this server (no --audio-root); "
                                 "send the audio bytes instead")
    root = Path(settings.root).resolve()
    path = (root / location).resolve()
    if not path.is_relative_to(root):
        raise InvalidArgument(f"audio {index}: {location!r} is outside the audio root")
    if not path.is_file():
        raise InvalidArgument(f"audio {index}: no file {location!r} under the audio root")
    if path.stat().st_size > settings.max_bytes:
        raise InvalidArgument(f"audio {index}: {location!r} is larger than {settings.max_bytes} bytes")
    return path.read_bytes()


def decode(data: bytes, rate: int, limit: int, max_seconds: float = 0.0, index: int = 0) -> np.ndarray:
    """Container bytes -> mono float32 at `rate`, refusing more than `limit` samples."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidArgument(f"audio {index}: the data holds no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            pieces: list[np.ndarray] = []
            total = 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
                    total += pieces[-1].size
                if total > limit:
                    raise InvalidArgument(f"audio {index} is longer than the limit of {max_seconds:g} s "
                                          "(--max-audio-seconds)")
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as exc:
        raise InvalidArgument(f"audio {index}: cannot decode the data as audio: {exc}") from None
    samples = np.concatenate(pieces).astype(np.float32, copy=False) if pieces else np.zeros(0, np.float32)
    if samples.size == 0:
        raise InvalidArgument(f"audio {index}: decoded to no samples")
    return samples[:limit] if samples.size > limit else samples


def _resample(samples: np.ndarray, from_rate: int, to_rate: int, limit: int, index: int) -> np.ndarray:
    import av

    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = from_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
    try:
        pieces = [out.to_ndarray().reshape(-1) for out in (*resampler.resample(frame), *resampler.resample(None))]
    except av.error.FFmpegError as exc:
        raise InvalidArgument(f"audio {index}: cannot resample from {from_rate} Hz: {exc}") from None
    return np.concatenate(pieces).astype(np.float32, copy=False)[:limit]
