"""One module per non-generation task, each in the transformers pipeline's shape:

    sanitize_parameters(dep, params) -> params          every parameter check, values normalised
    preprocess(dep, inputs, params) -> model_inputs      inputs checked, tokenized / decoded to features
    forward(dep, scope, model_inputs, params) -> model_outputs
    postprocess(dep, model_inputs, model_outputs, params) -> results

`run` drives the four in that order and times the stages (preprocess as the module's
PREPROCESS_STAGE, "tokenize" unless it names another). Which module serves which task is the task
registry's `handler` (splitserve_common/tasks.py).
"""

from __future__ import annotations

from preproc_service.deployment import Deployment, RequestScope
from preproc_service.tasks import (
    audio_classification,
    feature_extraction,
    fill_mask,
    question_answering,
    speech_recognition,
    table_question_answering,
    text_classification,
    token_classification,
    zero_shot_classification,
)
from splitserve_common import tasks

_MODULES = {module.__name__.rsplit(".", 1)[-1]: module for module in (
    text_classification, token_classification, fill_mask, question_answering, zero_shot_classification,
    feature_extraction, audio_classification, speech_recognition, table_question_answering)}

# task -> its module, for every registry task whose handler is one of these modules.
HANDLERS = {spec.name: _MODULES[spec.handler] for spec in tasks.TASKS.values() if spec.handler in _MODULES}


async def run(task: str, dep: Deployment, scope: RequestScope, inputs, params: dict):
    """The task's answer for `inputs`; `params` (after precedence) is updated to the values applied."""
    handler = HANDLERS[task]
    params.update(handler.sanitize_parameters(dep, params))
    async with dep.room_for(len(inputs), scope):  # a large request waits for model queue room untokenized
        with scope.stage(getattr(handler, "PREPROCESS_STAGE", "tokenize")):
            model_inputs = await handler.preprocess(dep, inputs, params)
        model_outputs = await handler.forward(dep, scope, model_inputs, params)
    with scope.stage("postprocess"):
        return handler.postprocess(dep, model_inputs, model_outputs, params)
