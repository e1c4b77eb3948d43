"""Shared pieces of the preproc_service tests: tiny task models, the two services started together."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from tests import model_factory, servers

TASKS = list(model_factory.ENCODER_TASKS)

SENTENCES = [
    "Alice walked to the river in Paris.",
    "the old market",
    "Why does the gentle worker build a modern system every summer morning with Bob in Tokyo?",
    "Bob",
    "café naïve résumé",
]


def build_task_model(root: Path, task: str, seed: int = 0, **mlmodel):
    """(components dir, model, tokenizer) for `task`, saved in the MLflow components layout
    (`mlmodel`: model_config, signature_params, ... for the MLmodel file)."""
    model, tokenizer = model_factory.build_encoder(task, seed=seed)
    directory = model_factory.save_components(root / task, model, tokenizer, task, **mlmodel)
    return directory, model, tokenizer


@contextmanager
def stack(model_dir, *preproc_args: str, model_args=(), preproc_env=None):
    """model_service and preproc_service on loopback for `model_dir`; yields (model, preproc) handles.

    Both start at once: preproc's handshake waits for the model service by itself.
    """
    with servers.model_service(model_dir, "--metrics-port", "0", *model_args, wait=False) as model:
        with servers.preproc_service(model_dir, model.address, "--metrics-port", "0", *preproc_args,
                                     env=preproc_env) as preproc:
            model.wait_serving()
            yield model, preproc


def pipeline(task: str, model, tokenizer):
    """The in-process transformers pipeline: the reference answer."""
    import transformers

    return transformers.pipeline(task, model=model, tokenizer=tokenizer, device="cpu")
