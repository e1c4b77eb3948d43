"""table-question-answering through client -> preproc_service (torch hidden) -> model_service equals
transformers' TableQuestionAnsweringPipeline on the same tiny TAPAS model, batched and sequential;
preproc_service/tasks/table_question_answering.py's stages without servers (model in process) too."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from client import cli
from client.preproc_client import PreprocClient
from preproc_service import tasks as task_handlers
from preproc_service.deployment import RequestScope
from preproc_service.tasks import table_question_answering as tqa_task
from splitserve_common import tasks
from splitserve_common.errors import FailedPrecondition, InvalidArgument
from tests import model_factory
from tests import preproc_helpers as h
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


# ---------------------------------------------------------------- the task module, no servers

TASK = "table-question-answering"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    import transformers

    model, tokenizer = model_factory.build_tapas(tmp_path_factory.mktemp("tapas_local"), seed=2)
    config = model.config
    deployment = h.local_deployment(TASK, model, tokenizer, info={
        "model_type": "tapas", "aggregation_labels": dict(config.aggregation_labels),
        "no_aggregation_label_index": config.no_aggregation_label_index})
    h.model_in_process(deployment, model)
    pipe = transformers.pipeline(TASK, model=model, tokenizer=tokenizer, device="cpu")
    yield {"deployment": deployment, "pipe": pipe, "tokenizer": tokenizer, "model": model}
    deployment.close()


def _run_local(local, items, explicit):
    """The task through preproc's runner (sanitize -> preprocess -> forward -> postprocess)."""
    params = local["deployment"].precedence.resolve(tasks.TASKS[TASK].pipeline_defaults, explicit).values
    items = [(json.dumps(table), queries) for table, queries in items]
    return asyncio.run(task_handlers.run(TASK, local["deployment"], RequestScope(), items, params)), params


@pytest.mark.parametrize("sequential", [False, True])
def test_module_answers_equal_pipeline(local, sequential):
    got, params = _run_local(local, [(CITIES, QUERIES), (CITIES, QUERIES[3:4])], {"sequential": sequential})
    _same_dicts(got[0], local["pipe"](table=CITIES, query=QUERIES, sequential=sequential))
    _same_dicts(got[1], [local["pipe"](table=CITIES, query=QUERIES[3], sequential=sequential)])
    assert params == {"sequential": sequential, "truncation": "drop_rows_to_fit"}


def _same_dicts(got, want):
    assert [g["answer"] for g in got] == [w["answer"] for w in want]
    assert [g["coordinates"] for g in got] == [w["coordinates"] for w in want]
    assert [g.get("aggregator") for g in got] == [w.get("aggregator") for w in want]


def test_predictions_equal_the_tokenizers(local):
    """convert_logits_to_predictions in numpy equals TapasTokenizer's (torch) on the same logits."""
    import pandas as pd
    import torch

    tokenizer = local["tokenizer"]
    inputs = tqa_task.encode(tokenizer, pd.DataFrame(CITIES).astype(str), QUERIES, "drop_rows_to_fit")
    outputs = h.torch_forward(local["model"], inputs)
    got = tqa_task.convert_logits_to_predictions(inputs, outputs["logits"], outputs["logits_aggregation"])
    want = tokenizer.convert_logits_to_predictions({k: torch.from_numpy(v) for k, v in inputs.items()},
                                                   torch.from_numpy(outputs["logits"]),
                                                   torch.from_numpy(outputs["logits_aggregation"]))
    assert got[0] == want[0] and got[1] == list(want[1])
    assert any(got[0])  # some query selects cells: the comparison means something


def test_module_refuses_bad_parameters_and_other_models(local):
    deployment = local["deployment"]
    with pytest.raises(InvalidArgument, match="truncation must be one of"):
        tqa_task.sanitize_parameters(deployment, {"truncation": "longest_first", "sequential": False})
    assert tqa_task.sanitize_parameters(deployment, {"truncation": None}) == {"truncation": "drop_rows_to_fit"}
    deployment.info.model_type = "bert"
    try:
        with pytest.raises(FailedPrecondition, match="TAPAS models; this one is bert"):
            tqa_task.sanitize_parameters(deployment, {})
    finally:
        deployment.info.model_type = "tapas"


def test_previous_answers_become_prev_labels():
    """sequential_inference's column 3: the question-table cells (segment 1) the previous query selected."""
    token_types = np.zeros((5, 7), dtype=np.int64)
    token_types[:, tqa_task.SEGMENT] = [0, 1, 1, 1, 1]
    token_types[:, tqa_task.COLUMN] = [0, 1, 2, 1, 2]
    token_types[:, tqa_task.ROW] = [0, 1, 1, 2, 2]
    logits = np.array([9.0, 5.0, -5.0, 1.0, -1.0])  # cells (0,0) and (0,1) selected
    selected = tqa_task.selected_cells(logits, np.ones(5, np.int64), token_types)
    assert selected == {(0, 0): True, (1, 0): False, (0, 1): True, (1, 1): False}
    assert list(tqa_task.prev_labels(token_types, selected)) == [0, 1, 0, 1, 0]
