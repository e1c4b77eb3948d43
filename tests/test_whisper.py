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
