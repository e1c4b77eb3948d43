"""Whisper (speech encoder-decoder) generation: model_service's Generate with encoder_features equals
`WhisperForConditionalGeneration.generate` on the same tiny random model token for token (greedy in the
continuous batch, beams apart), for the prompts Whisper builds (detected or given language, task,
timestamps) and its logits rules."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from splitserve_pb import generation_pb2 as gpb
from tests import audio_helpers, model_factory, servers
from tests.generation_helpers import generation_stub

RATE = 16000


def save_whisper(root, model, tokenizer, fe, **mlmodel):
    return model_factory.save_audio_components(root, model, "automatic-speech-recognition",
                                               "AutomaticSpeechRecognitionPipeline", fe, tokenizer, **mlmodel)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper")
    model, tokenizer, fe = model_factory.build_whisper_asr(seed=0)
    directory = save_whisper(root / "model", model, tokenizer, fe)
    with servers.model_service(directory, "--metrics-port", "0", "--torch-threads", "1") as ms:
        yield {"model": model, "tokenizer": tokenizer, "fe": fe, "gen": generation_stub(ms.address), "dir": directory}


def features_of(fe, clip):
    return fe(clip, sampling_rate=RATE, return_tensors="np")["input_features"].astype(np.float32)


def request_of(features, prompt=(), speech=None, **settings):
    return gpb.GenerateRequest(
        input_ids=list(prompt), settings=gpb.GenerationSettings(**settings), speech=speech or gpb.SpeechOptions(),
        encoder_features=gpb.EncoderFeatures(name="input_features", shape=list(features.shape),
                                             data=features.tobytes()))


def served(stub, request):
    steps = list(stub.Generate(request))
    return list(steps[0].decoder_prompt_ids), [t for s in steps for t in s.token_ids], steps[-1].finish_reason


def reference(model, features, **kwargs):
    """generate's tokens for one segment, prompt included (force_unique_generate_call: one call, as
    model_service serves one segment per request)."""
    import torch

    out = model.generate(torch.from_numpy(features), force_unique_generate_call=True, **kwargs)
    return (out["sequences"] if isinstance(out, dict) else out)[0].tolist()


CASES = [
    ({}, {}),
    ({"return_timestamps": True}, {"return_timestamps": True}),
    ({"language": "fr"}, {"language": "fr"}),
    ({"language": "german", "task": "translate", "return_timestamps": True},
     {"language": "german", "task": "translate", "return_timestamps": True}),
]


@pytest.mark.parametrize("speech, kwargs", CASES)
def test_greedy_equals_generate_token_for_token(whisper, speech, kwargs):
    texts = set()
    for seed in range(3):
        features = features_of(whisper["fe"], audio_helpers.synth(1.5 + seed, seed=seed))
        prompt, tokens, _ = served(whisper["gen"], request_of(features, speech=gpb.SpeechOptions(**speech),
                                                               max_new_tokens=30, num_beams=1))
        want = reference(whisper["model"], features, max_new_tokens=30, num_beams=1, **kwargs)
        assert prompt + tokens == want[: len(prompt) + len(tokens)]
        assert len(prompt) + len(tokens) == len(want) or tokens[-1] == whisper["tokenizer"].eos_token_id
        texts.add(whisper["tokenizer"].decode(tokens, skip_special_tokens=True))
    assert len(texts) >= 2 and all(texts)  # the transcript depends on the audio, and is not empty


def test_rows_of_one_batch_keep_their_own_prompts_and_rules(whisper):
    """Requests with different prompt lengths and rules generate together, each as it would alone."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [CASES[i % len(CASES)] for i in range(8)]
    features = [features_of(whisper["fe"], audio_helpers.synth(2.0, seed=10 + i)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: served(whisper["gen"], request_of(
            features[i], speech=gpb.SpeechOptions(**cases[i][0]), max_new_tokens=25, num_beams=1)), range(8)))
    for (prompt, tokens, _), f, (_, kwargs) in zip(got, features, cases, strict=True):
        want = reference(whisper["model"], f, max_new_tokens=25, num_beams=1, **kwargs)
        assert prompt + tokens == want[: len(prompt) + len(tokens)]


def test_beam_search_equals_generate(whisper):
    features = features_of(whisper["fe"], audio_helpers.synth(2.5, seed=4))
    for speech, kwargs in CASES[:2]:
        prompt, tokens, _ = served(whisper["gen"], request_of(features, speech=gpb.SpeechOptions(**speech),
                                                               max_new_tokens=20, num_beams=3))
        want = reference(whisper["model"], features, max_new_tokens=20, num_beams=3, **kwargs)
        assert prompt + tokens == want[: len(prompt) + len(tokens)] and tokens


def test_given_prompt_is_used_as_is(whisper):
    """A later segment of a clip reuses the first segment's prompt (its detected language)."""
    features = features_of(whisper["fe"], audio_helpers.synth(2.0, seed=7))
    prompt, tokens, _ = served(whisper["gen"], request_of(features, max_new_tokens=10, num_beams=1))
    again, tokens_again, _ = served(whisper["gen"], request_of(features, prompt, max_new_tokens=10, num_beams=1))
    assert again == prompt and tokens_again == tokens


@pytest.mark.parametrize("change, words", [
    ({"shape": [1, 16, 100]}, "shape"),
    ({"data": b"\0" * 12}, "bytes"),
    ({"name": "input_values"}, "input_features"),
    ({"speech": gpb.SpeechOptions(language="klingon")}, "unsupported language"),
    ({"speech": gpb.SpeechOptions(task="summarize")}, "task"),
    ({"settings": gpb.GenerationSettings(do_sample=True, num_beams=1)}, "do_sample"),
    ({"settings": gpb.GenerationSettings(max_new_tokens=446)}, "max_new_tokens"),
])
def test_bad_speech_requests_are_refused(whisper, change, words):
    features = features_of(whisper["fe"], audio_helpers.synth(1.0))
    request = request_of(features, max_new_tokens=5)
    for key, value in change.items():
        if key in ("shape", "data", "name"):
            field = request.encoder_features
            if key == "shape":
                del field.shape[:]
                field.shape.extend(value)
            else:
                setattr(field, key, value)
        else:
            getattr(request, key).CopyFrom(value)
    with pytest.raises(grpc.RpcError) as exc:
        list(whisper["gen"].Generate(request))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in exc.value.details(), exc.value.details()
    assert served(whisper["gen"], request_of(features, max_new_tokens=3, num_beams=1))[1]


def test_features_without_speech_model_are_refused(tmp_path):
    """A text model refuses encoder_features by name."""
    from tests.generation_helpers import save_generative

    root = save_generative(tmp_path / "gpt2", "gpt2")
    with servers.model_service(root, "--metrics-port", "0") as ms:
        features = np.zeros((1, 16, 3000), np.float32)
        with pytest.raises(grpc.RpcError) as exc:
            list(generation_stub(ms.address).Generate(request_of(features, [5, 6], max_new_tokens=2)))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "speech models" in exc.value.details()


# ---------------------------------------------------------------- through the pair: client -> preproc -> model

@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    """The tiny Whisper in MLflow's components layout (feature_extractor + tokenizer), served by model_service
    and a preproc_service that cannot import torch; the in-process pipeline on the same model."""
    import transformers

    from client.preproc_client import PreprocClient
    from tests.test_audio_tasks import no_torch_stack

    root = tmp_path_factory.mktemp("whisper_asr")
    model, tokenizer, fe = model_factory.build_whisper_asr(seed=0)
    directory = save_whisper(root / "model", model, tokenizer, fe)
    pipe = transformers.pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                                 feature_extractor=fe, device="cpu")
    with no_torch_stack(directory, root, model_args=("--torch-threads", "1")) as (_, preproc), \
            PreprocClient(preproc.address, timeout=120) as client:
        yield {"client": client, "pipe": pipe, "tokenizer": tokenizer, "address": preproc.address}


def decoded(data: bytes) -> np.ndarray:
    from preproc_service import audio

    return audio.decode(data, RATE, 10**8)


def same(got, want):
    assert got.text == want["text"]
    if "chunks" in want:
        assert [c["text"] for c in got.chunks] == [c["text"] for c in want["chunks"]]
        assert [c["timestamp"] for c in got.chunks] == [tuple(c["timestamp"]) for c in want["chunks"]]


GREEDY = {"num_beams": 1, "max_new_tokens": 30}


class TestWhisperSpeechRecognition:
    def test_every_container_equals_pipeline(self, asr):
        clips = [audio_helpers.synth(seconds, seed=60 + i) for i, seconds in enumerate([1.5, 2.0, 0.8, 3.1])]
        files = [audio_helpers.encode(clip, c) for clip, c in zip(clips, audio_helpers.CONTAINERS, strict=True)]
        got = asr["client"].transcribe(files, generate_kwargs=GREEDY)
        texts = set()
        for g, data in zip(got, files, strict=True):
            want = asr["pipe"](decoded(data), **GREEDY)
            same(g, want)
            texts.add(want["text"])
        assert len(texts) >= 3 and all(texts)

    def test_pipeline_defaults_beam_search(self, asr):
        """No generation option: the pipeline's num_beams 5 and the config's max_length, as the pipeline."""
        clip = audio_helpers.synth(1.2, seed=70)
        (got,) = asr["client"].transcribe([(clip, RATE)], generate_kwargs={"max_new_tokens": 12})
        same(got, asr["pipe"](clip, max_new_tokens=12))

    @pytest.mark.parametrize("options", [
        {"return_timestamps": True},
        {"language": "fr"},
        {"language": "de", "task": "translate", "return_timestamps": True},
    ])
    def test_language_task_and_timestamps_equal_pipeline(self, asr, options):
        for seed in (71, 72):
            clip = audio_helpers.synth(2.5, seed=seed)
            (got,) = asr["client"].transcribe([(clip, RATE)], generate_kwargs=GREEDY, **options)
            same(got, asr["pipe"](clip, **GREEDY, **options))

    @pytest.mark.parametrize("options", [
        {"chunk_length_s": 2.0},
        {"chunk_length_s": 3.0, "stride_length_s": [0.5, 0.3], "return_timestamps": True},
    ])
    def test_chunked_long_audio_equals_pipeline(self, asr, options):
        clip = audio_helpers.synth(8.0, seed=73)
        (got,) = asr["client"].transcribe([(clip, RATE)], generate_kwargs=GREEDY, **options)
        want = asr["pipe"](clip, **GREEDY, **options)
        same(got, want)
        assert len(want["text"]) > 20

    def test_long_form_audio_equals_pipeline(self, asr):
        """Over 30 s without chunk_length_s: generate's own seek loop over 30-second segments."""
        clip = audio_helpers.synth(34.0, seed=74)
        (got,) = asr["client"].transcribe([(clip, RATE)], generate_kwargs={"num_beams": 1, "max_new_tokens": 20})
        same(got, asr["pipe"](clip, num_beams=1, max_new_tokens=20))

    def test_stream_equals_unary(self, asr):
        clip = audio_helpers.synth(8.0, seed=75)
        data = audio_helpers.encode(clip, "flac")
        options = {"chunk_length_s": 1.5, "generate_kwargs": GREEDY}
        *texts, final = list(asr["client"].transcribe_stream(data, **options))
        (unary,) = asr["client"].transcribe([data], **options)
        assert "".join(texts) == unary.text == final.text
        assert len(texts) >= 2  # text arrived while later chunks were still being transcribed
        (stamped,) = asr["client"].transcribe([data], return_timestamps=True, **options)
        *texts, final = list(asr["client"].transcribe_stream(data, return_timestamps=True, **options))
        assert "".join(texts) == stamped.text and final.chunks == stamped.chunks

    @pytest.mark.parametrize("options, words", [
        ({"return_timestamps": "word"}, "word"),
        ({"return_timestamps": "char"}, "char"),
        ({"generate_kwargs": {"stop": ["x"]}}, "stop"),
        ({"generate_kwargs": {"do_sample": True, "num_beams": 1}}, "do_sample"),
        ({"generate_kwargs": {"num_return_sequences": 2}}, "num_return_sequences"),
        ({"language": "klingon"}, "unsupported language"),
        ({"generate_kwargs": {"max_new_tokens": 500}}, "max_new_tokens"),
    ])
    def test_what_cannot_be_honoured_is_refused_by_name(self, asr, options, words):
        clip = (audio_helpers.synth(0.5), RATE)
        with pytest.raises(grpc.RpcError) as exc:
            asr["client"].transcribe([clip], **options)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in exc.value.details(), \
            exc.value.details()
        assert asr["client"].transcribe([clip], generate_kwargs={"num_beams": 1, "max_new_tokens": 3})[0]

    def test_cli_predict_transcribes_files(self, asr, tmp_path, capsys):
        import json

        from client import cli

        clip = audio_helpers.synth(4.0, seed=76)
        path = tmp_path / "speech.mp3"
        path.write_bytes(audio_helpers.encode(clip, "mp3"))
        args = ["--address", asr["address"], "predict", "--chunk-length-s", "2", "--return-timestamps", "true",
                "--num-beams", "1", "--max-new-tokens", "20", "--language", "en"]
        assert cli.main([*args, str(path)]) == 0
        (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        want = asr["pipe"](decoded(path.read_bytes()), chunk_length_s=2.0, return_timestamps=True, num_beams=1,
                           max_new_tokens=20, language="en")
        assert line["text"] == want["text"]
        assert [tuple(c["timestamp"]) for c in line["chunks"]] == [tuple(c["timestamp"]) for c in want["chunks"]]


def test_ctc_model_refuses_whisper_options(tmp_path):
    from client.preproc_client import PreprocClient

    model, tokenizer, fe = model_factory.build_wav2vec2_ctc(tmp_path, seed=0)
    directory = model_factory.save_audio_components(tmp_path / "ctc", model, "automatic-speech-recognition",
                                                    "AutomaticSpeechRecognitionPipeline", fe, tokenizer)
    with servers.model_service(directory, "--metrics-port", "0") as ms, \
            servers.preproc_service(directory, ms.address, "--metrics-port", "0") as pp, \
            PreprocClient(pp.address, timeout=60) as client:
        for options, words in [({"language": "en"}, "language"), ({"generate_kwargs": {"num_beams": 2}},
                                                                  "num_beams")]:
            with pytest.raises(grpc.RpcError) as exc:
                client.transcribe([(audio_helpers.synth(0.5), RATE)], **options)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in exc.value.details()


def test_processor_component_layout_equals_pipeline(tmp_path):
    """One components/processor/ (WhisperProcessor: feature extractor + tokenizer), as MLflow saves a pipeline
    built with a processor; a generation config with return_timestamps true gives timestamps unasked, as the
    pipeline does."""
    import transformers

    from client.preproc_client import PreprocClient

    model, tokenizer, fe = model_factory.build_whisper_asr(seed=0, return_timestamps=True)
    directory = model_factory.save_audio_components(tmp_path / "model", model, "automatic-speech-recognition",
                                                    "AutomaticSpeechRecognitionPipeline", fe, tokenizer,
                                                    as_processor=True)
    assert (directory / "components" / "processor").is_dir()
    pipe = transformers.pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                                 feature_extractor=fe, device="cpu")
    clip = audio_helpers.synth(2.0, seed=80)
    with servers.model_service(directory, "--metrics-port", "0", "--torch-threads", "1") as ms, \
            servers.preproc_service(directory, ms.address, "--metrics-port", "0") as pp, \
            PreprocClient(pp.address, timeout=60) as client:
        (got,) = client.transcribe([(clip, RATE)], generate_kwargs=GREEDY)
    want = pipe(clip, **GREEDY)
    assert want["chunks"]
    same(got, want)


def test_forced_decoder_ids_of_openai_checkpoints(tmp_path):
    """openai's generation configs carry forced_decoder_ids [[1, None], [2, <|transcribe|>], [3, <|notimestamps|>]]:
    the language slot is detected, the task and notimestamps kept, as generate builds the prompt."""
    tokenizer = model_factory.whisper_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    forced = [[1, None], [2, ids("<|transcribe|>")], [3, ids("<|notimestamps|>")]]
    model, tokenizer, fe = model_factory.build_whisper_asr(seed=0, forced_decoder_ids=forced)
    directory = save_whisper(tmp_path / "model", model, tokenizer, fe)
    with servers.model_service(directory, "--metrics-port", "0", "--torch-threads", "1") as ms:
        stub = generation_stub(ms.address)
        for seed, speech, kwargs in [(1, {}, {}), (2, {"return_timestamps": True}, {"return_timestamps": True})]:
            features = features_of(fe, audio_helpers.synth(2.0, seed=seed))
            prompt, tokens, _ = served(stub, request_of(features, speech=gpb.SpeechOptions(**speech),
                                                        max_new_tokens=20, num_beams=1))
            want = reference(model, features, max_new_tokens=20, num_beams=1, **kwargs)
            assert prompt[2] == ids("<|transcribe|>") and prompt + tokens == want[: len(prompt) + len(tokens)]
