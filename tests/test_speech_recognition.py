"""preproc_service/tasks/speech_recognition.py without servers: the CTC model runs in process,
chunked or not, and the transcriptions equal the transformers pipeline's."""

from __future__ import annotations

import numpy as np
import pytest

from preproc_service.audio import AudioInput
from preproc_service.tasks import speech_recognition as sr
from splitserve_common.errors import InvalidArgument
from tests import audio_helpers, model_factory
from tests import preproc_helpers as h

TASK = "automatic-speech-recognition"
RATE = 16000
ALIGN = 80  # the tiny wav2vec2's input samples per output frame (conv strides 5 * 4 * 4)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    import transformers

    model, tokenizer, fe = model_factory.build_wav2vec2_ctc(tmp_path_factory.mktemp("ctc"), seed=0)
    assert model.config.inputs_to_logits_ratio == ALIGN
    deployment = h.local_deployment(TASK, model, tokenizer, feature_extractor=fe,
                                    info={"inputs_to_logits_ratio": ALIGN, "max_input_values": 4 * RATE})
    pipe = transformers.pipeline(TASK, model=model, tokenizer=tokenizer, feature_extractor=fe, device="cpu")
    yield {"model": model, "deployment": deployment, "pipe": pipe}
    deployment.close()


def _run(local, clips, explicit):
    def forward(model_inputs):  # model_service's top_k 1: the argmax of each chunk's logits
        return {"tokens": [h.torch_forward(local["model"], inputs)["logits"][0].argmax(-1)
                           for _, inputs, _ in model_inputs["chunks"]]}

    return h.run_local(TASK, local["deployment"], [AudioInput(samples=c, sampling_rate=RATE) for c in clips],
                       explicit, forward)


@pytest.mark.parametrize("explicit", [{}, {"chunk_length_s": 1.0},
                                      {"chunk_length_s": 1.5, "stride_length_s": [0.3, 0.1]},
                                      {"chunk_length_s": 1.0, "stride_length_s": 0.25}])
def test_transcriptions_equal_pipeline(local, explicit):
    clips = [audio_helpers.synth(seconds, seed=20 + i) for i, seconds in enumerate([3.5, 0.9])]
    got, _ = _run(local, clips, explicit)
    for g, clip in zip(got, clips, strict=True):
        want = local["pipe"](clip, **explicit)["text"]
        assert g["text"] == want and len(want) > 5


@pytest.mark.parametrize("stamps", ["char", "word"])
def test_timestamps_equal_pipeline(local, stamps):
    clip = audio_helpers.synth(3.0, seed=5)
    (got,), _ = _run(local, [clip], {"return_timestamps": stamps, "chunk_length_s": 1.0})
    want = local["pipe"](clip, return_timestamps=stamps, chunk_length_s=1.0)
    assert [c["text"] for c in got["chunks"]] == [c["text"] for c in want["chunks"]]
    assert np.allclose([c["timestamp"] for c in got["chunks"]], [c["timestamp"] for c in want["chunks"]], atol=1e-9)


@pytest.mark.parametrize("params, applied", [
    ({"chunk_length_s": 0, "stride_length_s": [1.0, 1.0]}, {"stride_length_s": None}),  # no chunks: no stride
    ({"chunk_length_s": 0, "stride_length_s": None}, {}),
    ({"chunk_length_s": 3.0, "stride_length_s": None}, {"stride_length_s": [0.5, 0.5]}),  # chunk / 6
    ({"chunk_length_s": 2.0, "stride_length_s": 0.25}, {"stride_length_s": [0.25, 0.25]}),
    ({"chunk_length_s": 2.0, "stride_length_s": [0.2, 0.4]}, {"stride_length_s": [0.2, 0.4]}),
])
def test_stride_is_normalised_as_the_pipeline(local, params, applied):
    assert sr.sanitize_parameters(local["deployment"], {"return_timestamps": None, **params}) == applied


@pytest.mark.parametrize("samples", [40000, 16000, 16100, 3000])
def test_chunks_follow_the_pipelines_chunk_iter(local, samples):
    """Chunk and strides rounded to the model's frames, cut as the pipeline's chunk_iter cuts them."""
    from transformers.pipelines.automatic_speech_recognition import chunk_iter

    chunking = sr.chunking_of(local["deployment"], 1.0, [0.2, 0.1])
    assert chunking == sr.Chunking(16000, 3200, 1600)
    clip = audio_helpers.synth(samples / RATE, seed=3)
    got = sr.chunk_iter(clip, chunking)
    want = list(chunk_iter(clip, local["deployment"].feature_extractor, 16000, 3200, 1600))
    assert [stride for _, stride in got] == [w["stride"] for w in want]
    for (chunk, _), w in zip(got, want, strict=True):
        assert np.allclose(sr.features(local["deployment"].feature_extractor, chunk)["input_values"],
                           w["input_values"].numpy())
    assert sr.rescale_stride((16000, 3200, 1600), 1 / ALIGN) == (200, 40, 20)
    assert list(sr.trim(np.arange(200), (16000, 3200, 1600), ALIGN)) == list(range(40, 180))


@pytest.mark.parametrize("params, fragment", [
    ({"return_timestamps": "segment"}, "return_timestamps"),
    ({"chunk_length_s": -1.0}, "chunk_length_s must be >= 0"),
    ({"chunk_length_s": 1.0, "stride_length_s": 0.5}, "longer than the two strides"),
    ({"chunk_length_s": 1.0, "stride_length_s": [0.1, 0.1, 0.1]}, "stride_length_s"),
    ({"chunk_length_s": 1.0, "stride_length_s": -0.1}, "stride_length_s"),
])
def test_bad_options_are_refused(local, params, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        sr.sanitize_parameters(local["deployment"], {"return_timestamps": None, "chunk_length_s": 0,
                                                     "stride_length_s": None, **params})


def test_a_clip_longer_than_the_model_takes_needs_chunks(local):
    with pytest.raises(InvalidArgument, match="send chunk_length_s"):
        _run(local, [audio_helpers.synth(4.5)], {})
    (got,), _ = _run(local, [audio_helpers.synth(4.5)], {"chunk_length_s": 2.0})
    assert got["text"]


def test_options_are_checked_for_the_model_kind(local):
    """Encoder-decoder models go to whisper_asr (tests/test_whisper.py), whose checks refuse CTC's word
    timestamps by name; a CTC model refuses Whisper's language, task and generation options by name."""
    deployment = local["deployment"]
    deployment.info.is_encoder_decoder = True
    try:
        with pytest.raises(InvalidArgument, match="'word'"):
            sr.sanitize_parameters(deployment, {"return_timestamps": "word"})
    finally:
        deployment.info.is_encoder_decoder = False
    for params, words in [({"language": "en"}, "language"), ({"generate_kwargs": {"num_beams": 2}}, "num_beams")]:
        with pytest.raises(InvalidArgument, match=words):
            sr.sanitize_parameters(deployment, params)
