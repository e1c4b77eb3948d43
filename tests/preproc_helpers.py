"""Shared pieces of the preproc_service tests: tiny task models, the two services started together."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from preproc_service import tasks as task_handlers
from preproc_service.deployment import Deployment
from preproc_service.model_dir import ModelDir
from splitserve_common import tasks
from splitserve_common.v2_codec import ModelMetadata
from tests import model_factory, servers

TASKS = model_factory.TASKS
SENTENCES = model_factory.SENTENCES


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


def local_deployment(task: str, model, tokenizer, feature_extractor=None, info: dict | None = None,
                     **model_dir) -> Deployment:
    """A Deployment for `task` with the model service's metadata taken from `model`'s config (and
    `info`, more ModelMetadata fields): enough for the task modules' sanitize_parameters, preprocess
    and postprocess, which never call the model."""
    config = model.config
    deployment = Deployment(ModelDir(path=Path("."), tokenizer_path=Path("."), task=task, **model_dir), tokenizer,
                            model=None, feature_extractor=feature_extractor)
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    deployment.set_model_info(ModelMetadata(
        task=task, id2label=id2label, problem_type=config.problem_type or "", num_labels=len(id2label),
        max_position_embeddings=getattr(config, "max_position_embeddings", 0), vocab_size=config.vocab_size,
        pad_token_id=config.pad_token_id, **(info or {})))
    return deployment


def run_local(task: str, deployment: Deployment, inputs, explicit: dict, forward) -> tuple[object, dict]:
    """(results, parameters applied) of the task module's sanitize_parameters -> preprocess ->
    postprocess, with `forward(model_inputs) -> model_outputs` (the model in process) where the
    module's forward calls the model service."""
    handler = task_handlers.HANDLERS[task]
    params = deployment.precedence.resolve(tasks.TASKS[task].pipeline_defaults, explicit).values
    params.update(handler.sanitize_parameters(deployment, params))
    model_inputs = asyncio.run(handler.preprocess(deployment, inputs, params))
    return handler.postprocess(deployment, model_inputs, forward(model_inputs), params), params


def model_in_process(deployment: Deployment, model) -> Deployment:
    """`deployment` with its hop to model_service replaced by `model` run in process (its outputs as
    numpy arrays), so a task module's own forward (sequential TAPAS, chunked ASR) runs unchanged."""
    async def forward(scope, inputs, outputs=None, parameters=None, output_parameters=None):
        assert not parameters and not output_parameters, "model_service options are not emulated in process"
        answer = torch_forward(model, inputs)
        return {name: answer[name] for name in outputs or answer}

    deployment.forward = forward
    return deployment


class LocalTask:
    """One task module run in process on a tiny model, no servers: `run` does the module's
    sanitize_parameters -> preprocess -> postprocess with the model called in process."""

    def __init__(self, task: str, seed: int, with_pipeline: bool = True, **model_dir):
        self.task = task
        self.model, self.tokenizer = model_factory.build_encoder(task, seed=seed)
        self.deployment = local_deployment(task, self.model, self.tokenizer, **model_dir)
        self.pipe = pipeline(task, self.model, self.tokenizer) if with_pipeline else None

    def run(self, inputs, explicit: dict, forward=None) -> tuple[object, dict]:
        """(results, parameters applied); `forward(model_inputs) -> model_outputs` stands where the
        model service is called (default: the model on model_inputs["batch"])."""
        return run_local(self.task, self.deployment, inputs, explicit, forward or self.forward_batch)

    def forward_batch(self, model_inputs: dict) -> dict:
        return torch_forward(self.model, model_inputs["batch"])

    def close(self) -> None:
        self.deployment.close()


@contextmanager
def local_task(task: str, seed: int, **kwargs):
    local = LocalTask(task, seed, **kwargs)
    try:
        yield local
    finally:
        local.close()


def torch_forward(model, batch: dict) -> dict:
    """The model on a padded batch, in process: {output name: numpy array}."""
    import torch

    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}, return_dict=True)
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def qa_reference(model, tok, question, context, top_k=1, max_answer_len=15, max_seq_len=64, stride=32,
                 impossible=False):
    """Brute force over every (start, end) of every window, by the 4.x pipeline's rules."""
    import torch

    enc = tok(question, context, truncation="only_second", max_length=max_seq_len, stride=stride,
              return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc.get("token_type_ids"))
    merged, null = {}, 1e6
    for w in range(enc["input_ids"].shape[0]):
        seq = enc.sequence_ids(w)
        context_tokens = [i for i, s in enumerate(seq) if s == 1]
        allowed = [0] + context_tokens  # CLS stays in the softmax
        start = out.start_logits[w].double().numpy()
        end = out.end_logits[w].double().numpy()
        ps = np.exp(start[allowed] - start[allowed].max())
        ps = dict(zip(allowed, ps / ps.sum(), strict=True))
        pe = np.exp(end[allowed] - end[allowed].max())
        pe = dict(zip(allowed, pe / pe.sum(), strict=True))
        null = min(null, ps[0] * pe[0])
        spans = sorted(((ps[s] * pe[e], s, e) for s in context_tokens for e in context_tokens
                        if s <= e < s + max_answer_len), reverse=True)[:top_k * 2 + 10]
        for score, s, e in spans:
            first = enc.word_to_chars(w, enc.token_to_word(w, s), sequence_index=1)[0]
            last = enc.word_to_chars(w, enc.token_to_word(w, e), sequence_index=1)[1]
            text = context[first:last]
            if text.lower() in merged:
                merged[text.lower()]["score"] += score
            else:
                merged[text.lower()] = {"score": score, "start": first, "end": last, "answer": text}
    answers = list(merged.values())
    if impossible:
        answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
