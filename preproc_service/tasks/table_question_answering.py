"""table-question-answering, TAPAS models: transformers' TableQuestionAnsweringPipeline
preprocess/postprocess for `self.type == "tapas"`, numpy only.

preprocess: the JSON table (MLflow's input: `{"column": [cells...]}`) becomes a pandas DataFrame and
is encoded with every query of the item by the model's TapasTokenizer (`truncation`
"drop_rows_to_fit" by default, padded to the longest query): input_ids, attention_mask and the
seven token-type columns `[B, L, 7]`;
forward: batched (one model request for every query), or `sequential` (SQA-style conversations):
one request per query in order, where column 3 of the token types (prev_labels) marks the cells
the previous query selected, computed here from its logits (`sequential_inference`);
postprocess: `convert_logits_to_predictions` (token probabilities averaged per cell, cells over
0.5, aggregation argmax) and the answer string, coordinates, cells and aggregator.
"""

from __future__ import annotations

import asyncio
import collections
import json

import numpy as np

from preproc_service.deployment import Deployment, RequestScope, all_or_nothing
from preproc_service.tasks.common import sigmoid
from splitserve_common.errors import FailedPrecondition, InvalidArgument

TRUNCATIONS = ("drop_rows_to_fit", "do_not_truncate")
# Columns of TAPAS' token_type_ids.
SEGMENT, COLUMN, ROW, PREV_LABELS = 0, 1, 2, 3


def sanitize_parameters(dep: Deployment, params: dict) -> dict:
    """A TAPAS model and its tokenizer are required; truncation is one the tokenizer knows."""
    require_tapas(dep)
    truncation = params.get("truncation") or "drop_rows_to_fit"
    if truncation not in TRUNCATIONS:
        raise InvalidArgument(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    return {"truncation": truncation}


def parse_table(table_json: str, max_cells: int, index: int = 0):
    """MLflow's JSON-encoded table ({"column": [cells...]} or a list of row objects) -> DataFrame."""
    import pandas as pd

    try:
        table = json.loads(table_json)
    except ValueError as exc:
        raise InvalidArgument(f"input {index}: table is not valid JSON: {exc}") from None
    if not isinstance(table, (dict, list)) or not table:
        raise InvalidArgument(f"input {index}: table must be a non-empty JSON object of columns or list of rows")
    if isinstance(table, dict) and not all(isinstance(v, list) for v in table.values()):
        raise InvalidArgument(f"input {index}: every column of the table must be a list of cells")
    try:
        frame = pd.DataFrame(table)
    except ValueError as exc:
        raise InvalidArgument(f"input {index}: cannot make a table of it: {exc}") from None
    if frame.empty:
        raise InvalidArgument(f"input {index}: table is empty")
    if frame.size > max_cells:
        raise InvalidArgument(f"input {index}: table has {frame.size} cells, more than the limit of {max_cells} "
                              "(--max-table-cells)")
    return frame.astype(str)


async def preprocess(dep: Deployment, inputs: list[tuple[str, list[str]]], params: dict) -> dict:
    """Every (table JSON, queries) item checked and bounded, its table parsed and encoded with its
    queries: {"tables": DataFrames, "encodings": per table input_ids, attention_mask, token_type_ids}."""
    limits = dep.table_limits
    if not inputs:
        raise InvalidArgument("inputs is empty: send at least one table with its queries")
    for i, (_, queries) in enumerate(inputs):
        if not queries or any(not q for q in queries):
            raise InvalidArgument(f"input {i}: query is empty: send at least one non-empty query per table")
    total = sum(len(queries) for _, queries in inputs)
    if total > limits.max_queries:  # every table has a query: this bounds the tables too
        raise InvalidArgument(f"{total} queries in the request, more than the limit of {limits.max_queries} "
                              "(--max-table-queries)")
    tables = [parse_table(table_json, limits.max_cells, i) for i, (table_json, _) in enumerate(inputs)]
    encodings = await asyncio.gather(*(asyncio.to_thread(encode, dep.tokenizer, table, list(queries),
                                                         params["truncation"])
                                       for table, (_, queries) in zip(tables, inputs, strict=True)))
    return {"tables": tables, "encodings": encodings}


def encode(tokenizer, table, queries: list[str], truncation: str) -> dict[str, np.ndarray]:
    """The TapasTokenizer's arrays for one table and its queries, padded to the longest query."""
    encoded = tokenizer(table, queries, return_tensors="np", truncation=truncation, padding=True)
    return {name: np.asarray(encoded[name], dtype=np.int64)
            for name in ("input_ids", "attention_mask", "token_type_ids")}


async def forward(dep: Deployment, scope: RequestScope, model_inputs: dict, params: dict) -> dict:
    """{"logits": per table [B, L], "logits_aggregation": per table [B, A] or None}; the tables at once."""
    aggregate, sequential = bool(dep.require_info().aggregation_labels), bool(params.get("sequential"))
    answers = await all_or_nothing(forward_table(dep, scope, inputs, sequential, aggregate)
                                   for inputs in model_inputs["encodings"])
    return {"logits": [logits for logits, _ in answers], "logits_aggregation": [agg for _, agg in answers]}


async def forward_table(dep: Deployment, scope: RequestScope, inputs: dict, sequential: bool, aggregate: bool):
    """(logits [B, L], logits_aggregation [B, A] or None), batched or one query after the other."""
    outputs = ["logits", "logits_aggregation"] if aggregate else ["logits"]
    if not sequential:
        answer = await dep.forward(scope, inputs, outputs)
        return answer["logits"], answer.get("logits_aggregation")
    all_logits, all_aggregations = [], []
    prev_answers = None
    for index in range(len(inputs["input_ids"])):
        token_types = inputs["token_type_ids"][index].copy()
        if prev_answers is not None:
            token_types[:, PREV_LABELS] = prev_labels(token_types, prev_answers)
        one = {"input_ids": inputs["input_ids"][index:index + 1],
               "attention_mask": inputs["attention_mask"][index:index + 1],
               "token_type_ids": token_types[None]}
        answer = await dep.forward(scope, one, outputs)
        all_logits.append(answer["logits"])
        if aggregate:
            all_aggregations.append(answer["logits_aggregation"])
        prev_answers = selected_cells(answer["logits"][0], inputs["attention_mask"][index], token_types)
    return np.concatenate(all_logits), (np.concatenate(all_aggregations) if aggregate else None)


def postprocess(dep: Deployment, model_inputs: dict, model_outputs: dict, params: dict) -> list[list[dict]]:
    """One list of answers (one per query) for every table."""
    info = dep.require_info()
    return [table_answers(inputs, table, logits, logits_agg, info.aggregation_labels, info.no_aggregation_label_index)
            for inputs, table, logits, logits_agg in zip(model_inputs["encodings"], model_inputs["tables"],
                                                         model_outputs["logits"], model_outputs["logits_aggregation"],
                                                         strict=True)]


def prev_labels(token_types: np.ndarray, prev_answers: dict) -> np.ndarray:
    """Column 3 of a query's token types: 1 on the question-table cells the previous query selected."""
    labels = np.zeros(len(token_types), dtype=np.int64)
    for i, (segment, col, row) in enumerate(token_types[:, [SEGMENT, COLUMN, ROW]].tolist()):
        if row - 1 >= 0 and col - 1 >= 0 and segment == 1:
            labels[i] = int(prev_answers[(col - 1, row - 1)])
    return labels


def selected_cells(logits: np.ndarray, attention_mask: np.ndarray, token_types: np.ndarray) -> dict:
    """(col, row) -> mean token probability > 0.5, as sequential_inference keeps between queries."""
    probabilities = sigmoid(logits.astype(np.float32)) * attention_mask.astype(np.float32)
    cell_probs = mean_cell_probs(probabilities.tolist(), token_types[:, SEGMENT].tolist(), token_types[:, ROW].tolist(),
                                 token_types[:, COLUMN].tolist())
    return {cell: prob > 0.5 for cell, prob in cell_probs.items()}


def convert_logits_to_predictions(inputs: dict, logits: np.ndarray, logits_agg: np.ndarray | None,
                                  threshold: float = 0.5):
    """TapasTokenizer.convert_logits_to_predictions on numpy arrays."""
    logits = logits.astype(np.float32)
    logits[logits < -88.7] = -88.7
    probabilities = sigmoid(logits) * inputs["attention_mask"]
    token_types = inputs["token_type_ids"]
    coordinates = []
    for i in range(inputs["input_ids"].shape[0]):
        segment_ids, row_ids, column_ids = (token_types[i, :, SEGMENT], token_types[i, :, ROW],
                                            token_types[i, :, COLUMN])
        max_width, max_height = column_ids.max(), row_ids.max()
        if max_width == 0 and max_height == 0:
            continue  # as the tokenizer: no row for this query (and later indices shift, as there)
        cell_probs = mean_cell_probs(probabilities[i].tolist(), segment_ids.tolist(), row_ids.tolist(),
                                     column_ids.tolist())
        answer = [(row, col) for col in range(max_width) for row in range(max_height)
                  if cell_probs.get((col, row)) is not None and cell_probs[(col, row)] > threshold]
        coordinates.append(sorted(answer))
    if logits_agg is None:
        return coordinates, None
    return coordinates, logits_agg.argmax(axis=-1).tolist()


def mean_cell_probs(probabilities: list, segment_ids: list, row_ids: list, column_ids: list) -> dict:
    """TapasTokenizer._get_mean_cell_probs: (col, row) -> mean probability of the cell's tokens."""
    coords_to_probs = collections.defaultdict(list)
    for i, prob in enumerate(probabilities):
        col, row = column_ids[i] - 1, row_ids[i] - 1
        if col >= 0 and row >= 0 and segment_ids[i] == 1:
            coords_to_probs[(col, row)].append(prob)
    return {coords: np.array(cell_probs).mean() for coords, cell_probs in coords_to_probs.items()}


def table_answers(inputs: dict, table, logits: np.ndarray, logits_agg: np.ndarray | None,
                aggregation_labels: dict[int, str], no_aggregation_index: int | None) -> list[dict]:
    coordinates_batch, agg_predictions = convert_logits_to_predictions(inputs, logits, logits_agg)
    aggregators, prefixes = {}, {}
    if agg_predictions is not None:
        aggregators = {i: aggregation_labels[pred] for i, pred in enumerate(agg_predictions)}
        prefixes = {i: aggregators[i] + " > " for i, pred in enumerate(agg_predictions)
                    if pred != no_aggregation_index}
    answers = []
    for index, coordinates in enumerate(coordinates_batch):
        cells = [table.iat[coordinate] for coordinate in coordinates]
        answer = {"answer": prefixes.get(index, "") + ", ".join(cells), "coordinates": coordinates, "cells": cells}
        if aggregators.get(index, ""):
            answer["aggregator"] = aggregators[index]
        answers.append(answer)
    return answers


def require_tapas(dep: Deployment):
    info = dep.require_info()
    if info.model_type != "tapas":
        raise FailedPrecondition(f"table-question-answering is served for TAPAS models; this one is "
                                 f"{info.model_type or 'of an unknown type'}")
    if dep.tokenizer is None or not hasattr(dep.tokenizer, "convert_logits_to_predictions"):
        raise FailedPrecondition("table-question-answering needs the model's TapasTokenizer")
    return info
