"""audio-classification and CTC speech recognition through client -> preproc_service (torch hidden)
-> model_service equal the in-process transformers pipelines on the same tiny wav2vec2 models,
for audio the tests synthesise and encode as WAV, FLAC, MP3 and OGG/Opus."""

from __future__ import annotations

import json
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

from client import cli
from client.preproc_client import PreprocClient
from preproc_service import audio
from tests import audio_helpers, model_factory, servers
from tests.test_preproc_stack import NO_TORCH_LAUNCHER

TOL = 1e-4
RATE = 16000


@contextmanager
def no_torch_stack(model_dir, tmp_path, *preproc_args, model_args=()):
    """model_service + a preproc_service whose process cannot import torch."""
    (tmp_path / "no_torch_preproc.py").write_text(NO_TORCH_LAUNCHER)
    env = {"PYTHONPATH": f"{tmp_path}:{servers.ROOT}"}
    with servers.model_service(model_dir, "--metrics-port", "0", *model_args, wait=False) as model, \
            servers.service("no_torch_preproc", ["--model-dir", str(model_dir), "--model-service", model.address,
                                                 "--metrics-port", "0", *preproc_args], env=env) as preproc:
        model.wait_serving()
        assert "torch import blocked" in preproc.log()
        yield model, preproc


def decoded(data: bytes) -> np.ndarray:
    return audio.decode(data, RATE, 10**8)


def test_containers_decode_to_the_synthesised_audio():
    """Lossless containers give back the samples (16-bit quantisation); lossy ones the same signal."""
    samples = audio_helpers.synth(2.0, seed=3)
    for container in audio_helpers.CONTAINERS:
        got = decoded(audio_helpers.encode(samples, container))
        assert got.shape == samples.shape and got.dtype == np.float32
        if container in ("wav", "flac"):
            assert np.abs(got - samples).max() < 1e-4
        else:
            assert np.corrcoef(got, samples)[0, 1] > 0.8, container


# ---------------------------------------------------------------- audio-classification

@pytest.fixture(scope="module")
def ac(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("audio_classification")
    model, fe = model_factory.build_audio_classifier(seed=2)
    directory = model_factory.save_audio_components(root / "model", model, "audio-classification",
                                                    "AudioClassificationPipeline", fe)
    pipe = transformers.pipeline("audio-classification", model=model, feature_extractor=fe, device="cpu")
    with no_torch_stack(directory, root, "--max-audio-inputs", "4", "--max-audio-seconds", "3") as (_, preproc), \
            PreprocClient(preproc.address, timeout=60) as client:
        yield {"client": client, "pipe": pipe, "address": preproc.address}


def _same_labels(got, want):
    assert [x.label for x in got] == [w["label"] for w in want]
    assert np.allclose([x.score for x in got], [w["score"] for w in want], atol=TOL)


class TestAudioClassification:
    def test_every_container_equals_pipeline(self, ac):
        clips = [audio_helpers.synth(seconds, seed=i) for i, seconds in enumerate([1.0, 1.7, 0.6, 2.3])]
        files = [audio_helpers.encode(clip, c) for clip, c in zip(clips, audio_helpers.CONTAINERS, strict=True)]
        got = ac["client"].classify_audio(files)
        assert len(got) == 4
        for g, data in zip(got, files, strict=True):
            want = ac["pipe"](decoded(data))
            assert len(want) == len(model_factory.AUDIO_LABELS)  # the pipeline's call default: every label
            _same_labels(g, want)
        assert got.applied_parameters == {"top_k": None, "function_to_apply": "softmax"}

    def test_samples_top_k_and_function(self, ac):
        clip = audio_helpers.synth(1.3, seed=9)
        for options in ({"top_k": 2}, {"top_k": 50}, {"top_k": 3, "function_to_apply": "sigmoid"},
                        {"function_to_apply": "none"}):
            (got,) = ac["client"].classify_audio([(clip, RATE)], **options)
            _same_labels(got, ac["pipe"]({"raw": clip, "sampling_rate": RATE}, **options))

    def test_resampled_samples_are_classified(self, ac):
        """8 kHz samples are resampled to the model's 16 kHz (libswresample, not torchaudio: close only)."""
        clip = audio_helpers.synth(1.0, seed=4)
        (got,) = ac["client"].classify_audio([(audio_helpers.resample(clip, RATE, 8000), 8000)], top_k=1)
        (want,) = ac["pipe"](clip, top_k=1)
        assert got[0].label == want["label"]

    @pytest.mark.parametrize("item, code, words", [
        (b"not audio at all", grpc.StatusCode.INVALID_ARGUMENT, "cannot decode"),
        ("https://example.com/a.wav", grpc.StatusCode.INVALID_ARGUMENT, "do not fetch URLs"),
        ("clips/a.wav", grpc.StatusCode.FAILED_PRECONDITION, "--audio-root"),
        ((np.zeros(0, np.float32), RATE), grpc.StatusCode.INVALID_ARGUMENT, "no samples"),
        ((np.ones(100, np.float32), 0), grpc.StatusCode.INVALID_ARGUMENT, "sampling_rate"),
        ((np.full(100, np.nan, np.float32), RATE), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ])
    def test_bad_audio_is_refused_and_service_keeps_serving(self, ac, item, code, words):
        with pytest.raises(grpc.RpcError) as exc:
            ac["client"].classify_audio([item])
        assert exc.value.code() == code and words in exc.value.details(), exc.value.details()
        assert ac["client"].classify_audio([(audio_helpers.synth(0.5), RATE)], top_k=1)[0]

    def test_request_sizes_are_bounded(self, ac):
        short = (audio_helpers.synth(0.3), RATE)
        for items, words in [([short] * 5, "--max-audio-inputs"),
                             ([audio_helpers.encode(audio_helpers.synth(3.5), "flac")], "--max-audio-seconds"),
                             ([(audio_helpers.synth(3.5), RATE)], "--max-audio-seconds")]:
            with pytest.raises(grpc.RpcError) as exc:
                ac["client"].classify_audio(items)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in exc.value.details()

    def test_cli_predict_reads_audio_files(self, ac, tmp_path, capsys):
        clips = [audio_helpers.synth(1.0, seed=40), audio_helpers.synth(0.5, seed=41)]
        paths = [tmp_path / "a.mp3", tmp_path / "b.wav"]
        for path, clip in zip(paths, clips, strict=True):
            path.write_bytes(audio_helpers.encode(clip, path.suffix[1:]))
        assert cli.main(["--address", ac["address"], "predict", "--top-k", "2", *map(str, paths)]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        for line, path in zip(lines, paths, strict=True):
            want = ac["pipe"](decoded(path.read_bytes()), top_k=2)
            assert [x["label"] for x in line] == [w["label"] for w in want]

    def test_wrong_task_rpc_is_refused(self, ac):
        with pytest.raises(grpc.RpcError) as exc:
            ac["client"].transcribe([(audio_helpers.synth(0.5), RATE)])
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_whisper_encoder_classifier_equals_pipeline(tmp_path):
    """Log-mel features (WhisperFeatureExtractor, numpy STFT in the torch-less preproc) cross the hop as
    input_features [1, mel, 3000]."""
    import transformers

    model, fe = model_factory.build_whisper_audio_classifier(seed=1)
    directory = model_factory.save_audio_components(tmp_path / "model", model, "audio-classification",
                                                    "AudioClassificationPipeline", fe)
    pipe = transformers.pipeline("audio-classification", model=model, feature_extractor=fe, device="cpu")
    clips = [audio_helpers.synth(seconds, seed=30 + i) for i, seconds in enumerate([0.7, 2.5, 1.2])]
    files = [audio_helpers.encode(clip, "flac") for clip in clips]
    with no_torch_stack(directory, tmp_path) as (_, preproc), PreprocClient(preproc.address, timeout=60) as client:
        got = client.classify_audio(files)
    for g, data in zip(got, files, strict=True):
        _same_labels(g, pipe(decoded(data)))


# ---------------------------------------------------------------- CTC speech recognition

@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    """A wav2vec2 CTC model saved with one components/processor/ (feature extractor + tokenizer)."""
    import transformers

    root = tmp_path_factory.mktemp("asr_ctc")
    model, tokenizer, fe = model_factory.build_wav2vec2_ctc(root, seed=0)
    directory = model_factory.save_audio_components(root / "model", model, "automatic-speech-recognition",
                                                    "AutomaticSpeechRecognitionPipeline", fe, tokenizer,
                                                    as_processor=True)
    clips_dir = root / "clips"
    clips_dir.mkdir()
    pipe = transformers.pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                                 feature_extractor=fe, device="cpu")
    with no_torch_stack(directory, root, "--audio-root", str(clips_dir),
                        model_args=("--max-input-values", str(4 * RATE))) as (_, preproc), \
            PreprocClient(preproc.address, timeout=60) as client:
        yield {"client": client, "pipe": pipe, "clips": clips_dir, "address": preproc.address}


class TestCtcSpeechRecognition:
    def test_every_container_equals_pipeline(self, asr):
        clips = [audio_helpers.synth(seconds, seed=10 + i) for i, seconds in enumerate([1.5, 2.0, 0.8, 3.1])]
        files = [audio_helpers.encode(clip, c) for clip, c in zip(clips, audio_helpers.CONTAINERS, strict=True)]
        got = asr["client"].transcribe(files)
        for g, data in zip(got, files, strict=True):
            want = asr["pipe"](decoded(data))["text"]
            assert g.text == want and len(want) > 10
            assert " " in want  # the word delimiter is decoded: a text with words, not one run

    def test_chunked_long_audio_equals_pipeline(self, asr):
        clip = audio_helpers.synth(9.0, seed=21)
        for options in ({"chunk_length_s": 2.0}, {"chunk_length_s": 1.5, "stride_length_s": [0.3, 0.1]},
                        {"chunk_length_s": 3.0, "stride_length_s": 0.5}):
            (got,) = asr["client"].transcribe([(clip, RATE)], **options)
            assert got.text == asr["pipe"](clip, **options)["text"], options
        unchunked = asr["client"].transcribe([(clip[: 3 * RATE], RATE)])[0].text
        assert unchunked == asr["pipe"](clip[: 3 * RATE])["text"]

    @pytest.mark.parametrize("stamps", ["char", "word"])
    def test_timestamps_equal_pipeline(self, asr, stamps):
        clip = audio_helpers.synth(6.0, seed=5)
        (got,) = asr["client"].transcribe([(clip, RATE)], return_timestamps=stamps, chunk_length_s=2.0)
        want = asr["pipe"](clip, return_timestamps=stamps, chunk_length_s=2.0)
        assert got.text == want["text"]
        assert [c["text"] for c in got.chunks] == [c["text"] for c in want["chunks"]]
        assert np.allclose([c["timestamp"] for c in got.chunks], [c["timestamp"] for c in want["chunks"]],
                           atol=1e-9)
        assert got.chunks[-1]["timestamp"][1] > 4.0

    def test_stream_equals_unary(self, asr):
        clip = audio_helpers.synth(8.0, seed=8)
        data = audio_helpers.encode(clip, "flac")
        pieces = list(asr["client"].transcribe_stream(data, chunk_length_s=1.0))
        *texts, final = pieces
        (unary,) = asr["client"].transcribe([data], chunk_length_s=1.0)
        assert "".join(texts) == unary.text == final.text
        assert len(texts) >= 3  # text arrived while later chunks were still being recognised

    def test_cli_predict_transcribes_files(self, asr, tmp_path, capsys):
        clip = audio_helpers.synth(5.0, seed=50)
        path = tmp_path / "speech.ogg"
        path.write_bytes(audio_helpers.encode(clip, "ogg"))
        args = ["--address", asr["address"], "predict", "--chunk-length-s", "2", "--return-timestamps", "word"]
        assert cli.main([*args, str(path)]) == 0
        (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        want = asr["pipe"](decoded(path.read_bytes()), chunk_length_s=2.0, return_timestamps="word")
        assert line["text"] == want["text"] and [c["text"] for c in line["chunks"]] == [
            c["text"] for c in want["chunks"]]

    def test_local_files_only_under_the_audio_root(self, asr):
        clip = audio_helpers.synth(1.0, seed=2)
        (asr["clips"] / "a.wav").write_bytes(audio_helpers.encode(clip, "wav"))
        (got,) = asr["client"].transcribe(["a.wav"])
        assert got.text == asr["pipe"](decoded((asr["clips"] / "a.wav").read_bytes()))["text"]
        for location, words in [("../model/MLmodel", "outside the audio root"), ("missing.wav", "no file"),
                                ("file:///etc/passwd", "do not fetch URLs")]:
            with pytest.raises(grpc.RpcError) as exc:
                asr["client"].transcribe([location])
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in exc.value.details()

    def test_limits_and_options_are_checked(self, asr):
        long_clip = (audio_helpers.synth(5.0), RATE)  # model_service takes 4 s per row here
        cases = [
            ({"inputs": [long_clip]}, "chunk_length_s"),
            ({"inputs": [long_clip], "chunk_length_s": 1.0, "stride_length_s": 0.5}, "longer than the two strides"),
            ({"inputs": [long_clip], "return_timestamps": "segment"}, "return_timestamps"),
            ({"inputs": [long_clip], "chunk_length_s": -1.0}, "chunk_length_s"),
        ]
        for kwargs, words in cases:
            with pytest.raises(grpc.RpcError) as exc:
                asr["client"].transcribe(**kwargs)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in exc.value.details(), kwargs
        (got,) = asr["client"].transcribe([long_clip], chunk_length_s=2.0)
        assert got.text
