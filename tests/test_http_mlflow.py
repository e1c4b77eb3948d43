"""MLflow's scoring protocol on preproc_service's HTTP door, compared with `mlflow models serve`.

tests/fixtures/mlflow_scoring/<case>.json holds MLflow's recorded answers to every request of
tests/mlflow_cases.py on the same artifacts (record.py beside them). Each request goes to the
real pair here and must get the same status and the same JSON (scores and vectors within float
tolerance; an llm answer's id, created and model aside). Where MLflow's answer is wrong,
DIFFERENCES says what splitserve answers instead, in the same shape (docs/http.md).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import pytest

from splitserve_pb import preproc_pb2 as pb
from tests import mlflow_cases, servers
from tests.generation_helpers import preproc_stub
from tests.mlflow_cases import T1, T2

QUIET = ("--metrics-port", "0")
VOLATILE = {"id", "created", "model"}  # per-answer ids and times; MLflow writes model null


def call(url: str, content_type: str | None = None, body: str | None = None):
    request = urllib.request.Request(url, body.encode() if body is not None else None,
                                     {"content-type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def same(got, want, path="") -> None:
    """Equal JSON, floats within 1e-4 (relative) or 1e-5 (absolute), volatile llm keys aside."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5), \
            f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: {got!r} is not an object"
        keys = set(want) - VOLATILE
        assert set(got) - VOLATILE == keys, f"{path}: keys {sorted(got)} != {sorted(want)}"
        for key in keys:
            same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            same(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def recorded(case: str) -> dict:
    return json.loads((mlflow_cases.FIXTURES / f"{case}.json").read_text())


@pytest.fixture(scope="module", params=mlflow_cases.CASES)
def served(request, tmp_path_factory):
    case = request.param
    artifact = mlflow_cases.build(tmp_path_factory.mktemp("mlflow"), case)
    with servers.model_service(artifact, *QUIET) as ms, servers.preproc_service(artifact, ms.address, *QUIET) as pp:
        yield case, pp.http_url, preproc_stub(pp.address)


def test_invocations_answer_as_mlflow_models_serve(served):
    case, url, stub = served
    answers = recorded(case)["answers"]
    requests = mlflow_cases.requests(case)
    assert set(requests) == set(answers), "re-record: tests/mlflow_cases.py changed"
    for name, (content_type, body) in requests.items():
        status, got = call(url + "/invocations", content_type, body)
        want = answers[name]
        fix = DIFFERENCES.get((case, name))
        if fix is not None:
            assert status == 200, f"{case}/{name}: {got}"
            fix(got, want["json"] if want["status"] == 200 else None, url, stub)
            continue
        assert want["status"] == 200, f"{case}/{name}: MLflow failed ({want}); list the difference"
        assert status == 200, f"{case}/{name}: {got}"
        same(got, want["json"], f"{case}/{name}")


def test_probes(served):
    _case, url, _stub = served
    assert call(url + "/ping") == (200, "\n")
    assert call(url + "/health") == (200, "\n")
    status, version = call(url + "/version")
    assert status == 200 and isinstance(version, str) and version  # JSON string (MLflow: bare text)


def test_bad_input_answers_mlflow_error_object(served):
    _case, url, _stub = served
    status, got = call(url + "/invocations", "application/json", '{"nonsense": 1}')
    assert status == 400 and got["error_code"] == "BAD_REQUEST" and "inputs" in got["message"]
    status, got = call(url + "/invocations", "application/xml", "<a/>")
    assert status == 415
    status, got = call(url + "/invocations", "application/json", "{broken")
    assert status == 400 and got["error_code"] == "BAD_REQUEST"


# ---------------------------------------------------------------- where MLflow's answer is wrong
# Each check gets (splitserve's answer, MLflow's recorded answer or None when it failed, url, gRPC stub).


def _top_k_applied(got, want, url, stub):
    """MLflow ignores params when the signature declares none; splitserve applies top_k."""
    assert [len(row) for row in got["predictions"]] == [2, 2]
    same([row[0] for row in got["predictions"]], want["predictions"])


def _pair_kept(got, want, url, stub):
    """MLflow drops the text_pair of a dataframe_records row (and refuses it as inputs)."""
    answer = stub.Classify(pb.ClassifyRequest(texts=[T1], text_pairs=[T2]))
    same(got["predictions"], [{"label": answer.results[0].labels[0].label, "score": answer.results[0].labels[0].score}])
    alone = stub.Classify(pb.ClassifyRequest(texts=[T1])).results[0].labels[0].score
    assert got["predictions"][0]["score"] != pytest.approx(alone)


def _fill_mask_top_k(got, want, url, stub):
    assert len(got["predictions"]) == 1 and len(got["predictions"][0]) == 3
    assert got["predictions"][0][0] == want["predictions"][0]


def _every_embedding(got, want, url, stub):
    """MLflow answers only the first input's vectors; splitserve one entry per input."""
    first, second = got["predictions"]
    same(first, want["predictions"])
    status, alone = call(url + "/invocations", "application/json", json.dumps({"inputs": T2}))
    same(second, alone["predictions"])


def _shorter_generation(got, want, url, stub):
    """MLflow ignores max_new_tokens=3 (no params in the signature); splitserve applies it."""
    (text,), (full,) = got["predictions"], want["predictions"]
    assert text != full and full.startswith(text)


def _zero_shot_without_template(texts):
    """MLflow's signature makes hypothesis_template required; the pipeline (and splitserve) default it."""
    def check(got, want, url, stub):
        assert want is None
        answer = stub.ZeroShotClassify(pb.ZeroShotClassifyRequest(texts=texts, candidate_labels=["travel", "music",
                                                                                                 "food"]))
        same(got["predictions"], [{"sequence": r.sequence, "labels": label, "scores": score}
                                  for r in answer.results for label, score in zip(r.labels, r.scores, strict=True)])
    return check


def _aggregated_entities(got, want, url, stub):
    """MLflow ignores aggregation_strategy; splitserve groups the entities."""
    answer = stub.ClassifyTokens(pb.ClassifyTokensRequest(texts=[T1], aggregation_strategy="simple"))
    assert got["predictions"] == [",".join(e.entity_group for e in answer.results[0].entities)]
    assert got["predictions"] != want["predictions"]


DIFFERENCES = {
    ("text-classification", "params_top_k"): _top_k_applied,
    ("text-classification", "pair_records"): _pair_kept,
    ("text-classification", "pair_inputs"): _pair_kept,
    ("fill-mask", "params_top_k"): _fill_mask_top_k,
    **{("feature-extraction", name): _every_embedding
       for name in ("inputs", "instances", "dataframe_split", "dataframe_records", "csv")},
    ("text-generation", "params_max_new_tokens"): _shorter_generation,
    ("zero-shot-classification", "inputs"): _zero_shot_without_template([T1, T2]),
    ("zero-shot-classification", "dataframe_records"): _zero_shot_without_template([T1]),
    ("zero-shot-classification", "dataframe_split"): _zero_shot_without_template([T1]),
    ("token-classification", "params_aggregation"): _aggregated_entities,
}


def test_question_answering_without_a_recording(tmp_path):
    """MLflow cannot serve question-answering under transformers 5 (the pipeline is gone), so there is
    no recording: the answers are the gRPC API's, in MLflow's shape (one answer text per question)."""
    from tests import model_factory as mf

    model, tokenizer = mf.build_encoder("question-answering")
    artifact = mf.save_components(tmp_path / "qa", model, tokenizer, "question-answering")
    rows = [{"question": "Where did Alice walk?", "context": T1}, {"question": "What is old?", "context": T2}]
    with servers.model_service(artifact, *QUIET) as ms, servers.preproc_service(artifact, ms.address, *QUIET) as pp:
        answer = preproc_stub(pp.address).AnswerQuestion(pb.AnswerQuestionRequest(
            inputs=[pb.QuestionContext(**row) for row in rows]))
        expected = [r.answers[0].answer for r in answer.results]
        for content_type, body in (("application/json", json.dumps({"dataframe_records": rows})),
                                   ("application/json", json.dumps({"inputs": {k: [r[k] for r in rows]
                                                                              for k in rows[0]}})),
                                   ("text/csv", "question,context\n" + "".join(
                                       f'"{r["question"]}","{r["context"]}"\n' for r in rows))):
            status, got = call(pp.http_url + "/invocations", content_type, body)
            assert status == 200, got
            assert got == {"predictions": expected}
