"""Assemble and run the preproc gRPC server: servicer, health, reflection, metrics, handshake."""

from __future__ import annotations

import asyncio
import logging
import time

from preproc_service.audio import AudioSettings
from preproc_service.deployment import Deployment, TableLimits
from preproc_service.generation import GenerationHandlers
from preproc_service.handshake import disagreements
from preproc_service.http.app import build_front
from preproc_service.limits import RequestLimits
from preproc_service.model_client import ModelClient
from preproc_service.model_dir import read_model_dir
from preproc_service.model_room import ModelRoom
from preproc_service.servicer import PreprocServicer
from splitserve_common import memory, metrics, tasks
from splitserve_common.channels import ChannelSecurity
from splitserve_common.serving import (
    HealthReporter,
    add_port,
    configure_logging,
    create_server,
    enable_reflection,
    wait_for_termination,
)
from splitserve_pb import preproc_pb2, preproc_pb2_grpc

log = logging.getLogger("preproc_service")

SERVICE_NAME = preproc_pb2.DESCRIPTOR.services_by_name["Preproc"].full_name


def load_tokenizer(path):
    """The tokenizer from the directory's tokenizer files (transformers without torch); None without any."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_feature_extractor(path):
    """An audio model's feature extractor (numpy implementations); None without one."""
    if path is None:
        return None
    from transformers import AutoFeatureExtractor

    return AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)


def build_deployment(args) -> Deployment:
    model_dir = read_model_dir(args.model_dir)
    tokenizer = load_tokenizer(model_dir.tokenizer_path)
    feature_extractor = load_feature_extractor(model_dir.feature_extractor_path)
    model = ModelClient(args.model_service, args.model_name, args.max_in_flight, args.model_timeout,
                        args.max_message_mb, security=ChannelSecurity.from_args(args, "model-service"))
    audio = AudioSettings(root=args.audio_root, max_seconds=args.max_audio_seconds, max_inputs=args.max_audio_inputs,
                          max_bytes=args.max_message_mb * 1024 * 1024)
    return Deployment(model_dir, tokenizer, model, task_override=args.task, tokenize_batch=args.tokenize_batch,
                      feature_extractor=feature_extractor, audio=audio,
                      table_limits=TableLimits(args.max_table_cells, args.max_table_queries),
                      limits=RequestLimits.from_args(args), tokenize_round_chars=args.tokenize_round_chars,
                      release_memory_seconds=args.release_memory_seconds, tokenize_bulk_nice=args.tokenize_bulk_nice,
                      model_room=ModelRoom(args.max_waiting_large_requests))


async def handshake(dep: Deployment, health: HealthReporter, retry_seconds: float, recheck_seconds: float,
                    unreachable_grace: float) -> None:
    """Read model_service's metadata until tokenizer and model agree; SERVING only then.

    While the model service is down, keep retrying. Once serving, ask again every
    `unreachable_grace / 2` seconds (at most every `recheck_seconds`): a model service that stays
    unreachable for `unreachable_grace` seconds turns preproc NOT_SERVING until it answers again,
    and one replaced by a different model turns it NOT_SERVING (calls then get FAILED_PRECONDITION
    naming the mismatch, Deployment.require_agreement).
    """
    serving = False
    last_problem = None
    unreachable_since = None
    probe_every = max(0.1, min(recheck_seconds, unreachable_grace / 2))
    while True:
        try:
            info = await dep.model.metadata(timeout=max(1.0, probe_every))
            info.task = tasks.canonical(info.task)
        except Exception as exc:  # noqa: BLE001 - unreachable or not ready yet: retry
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if serving and now - unreachable_since >= unreachable_grace:
                log.error("NOT_SERVING: the model service at %s has been unreachable for %.1f s: %s",
                          dep.model.address, now - unreachable_since, exc)
                serving, last_problem = False, str(exc)
                await health.set(False)
            elif not serving and str(exc) != last_problem:
                log.warning("waiting for the model service at %s: %s", dep.model.address, exc)
                last_problem = str(exc)
            await asyncio.sleep(probe_every if serving else retry_seconds)
            continue
        unreachable_since = None
        local_task = dep.task_override or dep.model_dir.task
        problems = disagreements(dep.tokenizer, local_task, info)
        if not (local_task or info.task):
            problems.append("neither the model directory nor the model service names a task: pass --task")
        if problems:
            message = "; ".join(problems)
            if message != last_problem:
                log.error("NOT_SERVING: tokenizer and model at %s disagree: %s", dep.model.address, message)
                last_problem = message
            dep.disagreement = message
            serving = False
            await health.set(False)
        else:
            dep.set_model_info(info)
            dep.disagreement = None
            metrics.set_model(info.name)
            if not serving:
                log.info("SERVING %s (model %s at %s, max length %d)", dep.task, info.name, dep.model.address,
                         dep.max_length)
            serving, last_problem = True, None
            await health.set(True)
        await asyncio.sleep(probe_every if serving else max(retry_seconds, 2.0))


async def serve(args) -> None:
    configure_logging(args.log_level, args.log_format)
    dep = build_deployment(args)
    server = create_server(args, interceptors=[memory.release_after_calls(dep.memory)])
    servicer = PreprocServicer(dep, GenerationHandlers(dep, max_choices=args.max_choices), args.stream_window)
    preproc_pb2_grpc.add_PreprocServicer_to_server(servicer, server)
    health = HealthReporter(server, [SERVICE_NAME])
    await health.set(False)
    enable_reflection(server, [SERVICE_NAME])
    port = add_port(server, args, args.port)
    http = build_front(args, servicer, health) if args.http_port else None
    await server.start()
    if http is not None:
        http_port = await http.start()
        log.info("preproc_service HTTP (OpenAI, MLflow scoring) on %s:%d", args.host, http_port)
    log.info("preproc_service listening on %s:%d (model service %s)", args.host, port, args.model_service)
    checker = asyncio.ensure_future(
        handshake(dep, health, args.handshake_retry_seconds, args.handshake_recheck_seconds,
                  args.model_unreachable_grace_seconds))

    async def on_drain():
        checker.cancel()
        if http is not None:
            http.begin_drain()

    try:
        await wait_for_termination(server, health, args.drain_seconds, on_drain=on_drain,
                                   after_drain=http.stop if http is not None else None)
    finally:
        checker.cancel()
        await dep.model.close()
        dep.close()
