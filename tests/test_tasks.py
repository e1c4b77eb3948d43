"""splitserve_common/tasks.py: the one task registry, and that both services follow it."""

from __future__ import annotations

import importlib.util

from preproc_service import tasks as task_handlers
from preproc_service.servicer import TASKS_OF_RPC
from splitserve_common import tasks
from splitserve_pb import preproc_pb2


def test_names_aliases_and_translation_pairs():
    assert tasks.canonical("sentiment-analysis") == "text-classification"
    assert tasks.canonical("ner") == "token-classification"
    assert tasks.canonical("image-to-text") == "image-to-text" and tasks.spec("image-to-text") is None
    assert tasks.spec("translation_en_to_fr").auto_class == "AutoModelForSeq2SeqLM"
    assert tasks.spec("ner").default_outputs == ("logits",)
    assert tasks.spec("question-answering").default_outputs == ("start_logits", "end_logits")


def test_tasks_on_the_same_head_agree():
    assert tasks.same_model("zero-shot-classification", "text-classification")
    assert tasks.same_model("sentiment-analysis", "text-classification")
    assert not tasks.same_model("fill-mask", "text-classification")
    assert not tasks.same_model("unknown-task", "other-task")


def test_every_handler_exists_and_every_encoder_rpc_is_served():
    for spec in tasks.TASKS.values():
        module = f"preproc_service.{spec.handler}" if spec.generates else f"preproc_service.tasks.{spec.handler}"
        assert spec.handler == "" or importlib.util.find_spec(module) is not None, module
        if spec.name in task_handlers.HANDLERS:
            assert task_handlers.HANDLERS[spec.name].__name__ == module
        assert spec.generates == (spec.handler == "generation")
    served_rpcs = set(TASKS_OF_RPC)
    preproc_rpcs = set(preproc_pb2.DESCRIPTOR.services_by_name["Preproc"].methods_by_name)
    task_free = {"PredictStream", "Tokenize", "Detokenize", "Info"}
    assert served_rpcs == preproc_rpcs - task_free
