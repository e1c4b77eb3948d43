"""preproc_service/tasks/audio_classification.py without servers: the model runs in process,
the answers equal the transformers pipeline's."""

from __future__ import annotations

import numpy as np
import pytest

from preproc_service.audio import AudioInput
from preproc_service.tasks import audio_classification as ac
from splitserve_common.errors import InvalidArgument
from tests import audio_helpers, model_factory
from tests import preproc_helpers as h

TASK = "audio-classification"
RATE = 16000


@pytest.fixture(scope="module")
def local():
    import transformers

    model, fe = model_factory.build_audio_classifier(seed=2)
    deployment = h.local_deployment(TASK, model, None, feature_extractor=fe)
    pipe = transformers.pipeline(TASK, model=model, feature_extractor=fe, device="cpu")
    yield {"model": model, "deployment": deployment, "pipe": pipe}
    deployment.close()


def _run(local, clips, explicit):
    def forward(model_inputs):
        logits = [h.torch_forward(local["model"], features)["logits"][0] for features in model_inputs["clips"]]
        return {"logits": np.asarray(logits)}  # (not np.stack: tests/tiers.py would follow preproc_helpers.stack)

    return h.run_local(TASK, local["deployment"], [AudioInput(samples=c, sampling_rate=RATE) for c in clips],
                       explicit, forward)


@pytest.mark.parametrize("explicit", [{}, {"top_k": 2}, {"top_k": 50}, {"top_k": 3, "function_to_apply": "sigmoid"},
                                      {"function_to_apply": "none"}])
def test_labels_equal_pipeline(local, explicit):
    clips = [audio_helpers.synth(seconds, seed=i) for i, seconds in enumerate([0.7, 1.2])]
    got, params = _run(local, clips, explicit)
    for g, clip in zip(got, clips, strict=True):
        want = local["pipe"](clip, **explicit)
        assert [x["label"] for x in g] == [w["label"] for w in want]
        assert np.allclose([x["score"] for x in g], [w["score"] for w in want], atol=1e-5)
    assert len(got[0]) == min(explicit.get("top_k") or 99, len(model_factory.AUDIO_LABELS))
    assert params["function_to_apply"] == explicit.get("function_to_apply", "softmax")


@pytest.mark.parametrize("problem_type, function", [
    ("regression", "none"), ("multi_label_classification", "sigmoid"), ("single_label_classification", "softmax"),
    ("", "softmax")])
def test_default_function_follows_the_problem_type(local, problem_type, function):
    deployment = local["deployment"]
    saved = deployment.info.problem_type
    deployment.info.problem_type = problem_type
    try:
        assert ac.sanitize_parameters(deployment, {"top_k": None, "function_to_apply": None}) == {
            "function_to_apply": function}
    finally:
        deployment.info.problem_type = saved


@pytest.mark.parametrize("params, fragment", [
    ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"), ({"function_to_apply": "tanh"}, "function_to_apply")])
def test_bad_parameters_are_refused(local, params, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        ac.sanitize_parameters(local["deployment"], {"top_k": None, "function_to_apply": None, **params})


def test_empty_and_too_many_clips_are_refused(local):
    with pytest.raises(InvalidArgument, match="empty"):
        _run(local, [], {})
    clip = audio_helpers.synth(0.2)
    with pytest.raises(InvalidArgument, match="--max-audio-inputs"):
        _run(local, [clip] * (local["deployment"].audio.max_inputs + 1), {})
