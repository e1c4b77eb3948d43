"""table-question-answering through client -> preproc_service (torch hidden) -> model_service equals
transformers' TableQuestionAnsweringPipeline on the same tiny TAPAS model, batched and sequential."""

from __future__ import annotations

import json

import grpc
import pytest

from client import cli
from client.preproc_client import PreprocClient
from tests import model_factory
from tests.test_audio_tasks import no_torch_stack

CITIES = {"city": ["paris", "london", "berlin", "tokyo"], "river": ["seine", "thames", "spree", "sumida"],
          "population": ["2", "9", "3", "14"], "country": ["france", "england", "germany", "japan"]}
PEOPLE = [{"name": "alice", "city": "paris", "age": "31"}, {"name": "bob", "city": "tokyo", "age": "45"},
          {"name": "carol", "city": "berlin", "age": "27"}, {"name": "dave", "city": "london", "age": "52"},
          {"name": "mary", "city": "paris", "age": "38"}]
QUERIES = ["which city has the river", "how many people", "what is the old market", "where does alice live",
           "who is the brave worker in tokyo"]


@pytest.fixture(scope="module")
def tqa(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("tapas")
    model, tokenizer = model_factory.build_tapas(root, seed=2)
    directory = model_factory.save_components(root / "model", model, tokenizer, "table-question-answering",
                                              instance_type="TableQuestionAnsweringPipeline")
    pipe = transformers.pipeline("table-question-answering", model=model, tokenizer=tokenizer, device="cpu")
    with no_torch_stack(directory, root, "--max-table-cells", "40", "--max-table-queries", "12") as (_, preproc), \
            PreprocClient(preproc.address, timeout=60) as client:
        yield {"client": client, "pipe": pipe, "address": preproc.address}


def _same(got, want):
    want = want if isinstance(want, list) else [want]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.answer == w["answer"]
        assert g.coordinates == [tuple(c) for c in w["coordinates"]]
        assert g.cells == w["cells"]
        assert g.aggregator == w.get("aggregator", "")


@pytest.mark.parametrize("sequential", [False, True])
def test_answers_equal_pipeline(tqa, sequential):
    got = tqa["client"].answer_table_question([(CITIES, QUERIES), (PEOPLE, QUERIES[:3]), (CITIES, QUERIES[3])],
                                              sequential=sequential)
    assert len(got) == 3
    _same(got[0], tqa["pipe"](table=CITIES, query=QUERIES, sequential=sequential))
    import pandas as pd

    _same(got[1], tqa["pipe"](table=pd.DataFrame(PEOPLE), query=QUERIES[:3], sequential=sequential))
    _same(got[2], tqa["pipe"](table=CITIES, query=QUERIES[3], sequential=sequential))
    assert got.applied_parameters == {"sequential": sequential, "truncation": "drop_rows_to_fit"}


def test_sequential_carries_answers_to_the_next_query(tqa):
    """The SQA mode feeds each query the cells the previous one selected: it answers differently here."""
    batched = tqa["client"].answer_table_question([(CITIES, QUERIES)])[0]
    sequential = tqa["client"].answer_table_question([(CITIES, QUERIES)], sequential=True)[0]
    assert [a.answer for a in batched] != [a.answer for a in sequential]
    assert {a.aggregator for a in batched} - {"NONE"}  # the aggregation head is read


def test_mlflow_input_shape(tqa):
    """MLflow's pyfunc input: {"query": ..., "table": <JSON text>}."""
    (got,) = tqa["client"].answer_table_question([{"query": QUERIES[1], "table": json.dumps(CITIES)}])
    _same(got, tqa["pipe"](table=CITIES, query=QUERIES[1]))


@pytest.mark.parametrize("item, words", [
    (("{not json", ["q"]), "not valid JSON"),
    (("[]", ["q"]), "non-empty"),
    ((CITIES, []), "query is empty"),
    ((CITIES, [""]), "query is empty"),
    (({"a": [str(i) for i in range(41)]}, ["q"]), "--max-table-cells"),
    ((CITIES, ["q"] * 13), "--max-table-queries"),
])
def test_bad_inputs_are_refused_and_service_keeps_serving(tqa, item, words):
    with pytest.raises(grpc.RpcError) as exc:
        tqa["client"].answer_table_question([item])
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in exc.value.details()
    assert tqa["client"].answer_table_question([(CITIES, ["q"])])[0]


def test_bad_truncation_is_refused_by_name(tqa):
    with pytest.raises(grpc.RpcError) as exc:
        tqa["client"].answer_table_question([(CITIES, ["q"])], truncation="longest_first")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncation" in exc.value.details()


def test_cli_predict_with_a_table_file(tqa, tmp_path, capsys):
    (tmp_path / "table.json").write_text(json.dumps(CITIES))
    args = ["--address", tqa["address"], "predict", "--table", f"@{tmp_path / 'table.json'}", "--sequential"]
    assert cli.main([*args, *QUERIES[:3]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = tqa["pipe"](table=CITIES, query=QUERIES[:3], sequential=True)
    assert [line["answer"] for line in lines] == [w["answer"] for w in want]
    assert [[tuple(c) for c in line["coordinates"]] for line in lines] == [w["coordinates"] for w in want]
