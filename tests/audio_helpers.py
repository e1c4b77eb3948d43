"""Audio the tests synthesise (tones, sweeps and noise that change every 150 ms) and encode into
containers with PyAV: WAV (16-bit PCM), FLAC, MP3 and OGG/Opus."""

from __future__ import annotations

import io

import numpy as np

# container -> (format, codec, rate the codec runs at). Opus only runs at 48 kHz: decoding resamples.
CONTAINERS = {
    "wav": ("wav", "pcm_s16le", 16000),
    "flac": ("flac", "flac", 16000),
    "mp3": ("mp3", "libmp3lame", 16000),
    "ogg": ("ogg", "libopus", 48000),
}


def synth(seconds: float, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """Mono float32 in [-1, 1]: a new tone and noise level every 150 ms, so a model's output varies."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    out = np.zeros(n)
    segment = int(0.15 * rate)
    for start in range(0, n, segment):
        part = slice(start, start + segment)
        freq, amp = rng.uniform(100, 3000), rng.uniform(0, 0.6)
        out[part] = amp * np.sin(2 * np.pi * freq * t[part]) + rng.uniform(0, 0.2) * rng.standard_normal(
            len(t[part]))
    return np.clip(out, -1, 1).astype(np.float32)


def encode(samples: np.ndarray, container: str, rate: int = 16000) -> bytes:
    """`samples` (mono float32 at `rate`) as a file of `container` (see CONTAINERS)."""
    import av

    fmt, codec, codec_rate = CONTAINERS[container]
    if codec_rate != rate:
        samples = resample(samples, rate, codec_rate)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=codec_rate, layout="mono")
        sample_format = stream.codec_context.codec.audio_formats[0].name
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = codec_rate
        converter = av.AudioResampler(format=sample_format, layout="mono", rate=codec_rate)
        for converted in converter.resample(frame):
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    import av

    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
    frame.sample_rate = from_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
    pieces = [f.to_ndarray().reshape(-1) for f in (*resampler.resample(frame), *resampler.resample(None))]
    return np.concatenate(pieces).astype(np.float32)
