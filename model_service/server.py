"""Build and run model_service's grpc.aio server.

Three servicers, always: the v2 tensor API (inference_servicer), run-time adapters
(adapters_servicer) and generation (generation/servicer).

Start-up order: bind the port and answer health NOT_SERVING at once; load the weights; run
one warm-up forward pass (which also discovers the model's outputs); start the batcher;
install the adapter registry and load the start-up adapters; build the generation scheduler
(it reads the registry); then report SERVING. SIGTERM drains (serving.wait_for_termination).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from model_service import adapters_servicer, loader, v2_rest
from model_service.batcher import Batcher
from model_service.engine import Engine
from model_service.generation.scheduler import Limits
from model_service.generation.servicer import GenerationServicer
from model_service.inference_servicer import InferenceServicer
from model_service.loader import LoadError, LoadOptions
from model_service.runtime import Runtime
from model_service.served_model import discover
from splitserve_common import memory, metrics, serving
from splitserve_common.errors import ConfigurationError
from splitserve_pb import generation_pb2, generation_pb2_grpc, open_inference_pb2, open_inference_pb2_grpc

log = logging.getLogger(__name__)

INFERENCE_SERVICE = open_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


def load_options(args) -> LoadOptions:
    return LoadOptions(model_dir=args.model_dir, task=args.task, dtype=args.dtype, device=args.device,
                       allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                       base_model_path=args.base_model_path, merge_peft=args.merge_peft)


def served_name(args) -> str:
    return args.model_name or Path(args.model_dir).resolve().name


def _observe_batches(batcher) -> None:
    """Feed batch sizes and queue depth to the Prometheus metrics."""
    def observe(size: int, queued: int) -> None:
        metrics.observe_batch_size(size)
        metrics.set_queue_depth(queued)

    batcher.observers.append(observe)


async def load_runtime(runtime: Runtime, adapters: adapters_servicer.AdaptersServicer,
                       generation: GenerationServicer) -> None:
    """Load the weights, warm up, start the batcher, then get adapters and generation ready, in that order."""
    args = runtime.args
    memory.bound_onednn_cache(args.onednn_cache_entries)  # before the first forward pass, when oneDNN reads it
    loaded = await asyncio.to_thread(loader.load, load_options(args))
    engine = Engine(loaded, torch_threads=args.torch_threads, forward_workers=args.forward_workers,
                    backend=args.engine, release_memory_seconds=args.release_memory_seconds,
                    bulk_nice=args.forward_bulk_nice)
    info = await engine.run(discover, engine, served_name(args), args.max_batch_size,  # the warm-up forward
                            args.max_input_values)
    info.max_queue_rows = args.max_queue_rows
    info.max_message_bytes = args.max_message_mb * 1024 * 1024
    batcher = Batcher(engine, info, max_batch_size=args.max_batch_size, max_wait_us=args.max_wait_us,
                      token_budget=args.token_budget, max_queue_rows=args.max_queue_rows,
                      overhead_tokens=args.batch_overhead_tokens, max_pass_ms=args.max_pass_ms,
                      lone_pass_ms=args.lone_pass_ms)
    _observe_batches(batcher)
    batcher.start()
    runtime.engine, runtime.info, runtime.batcher = engine, info, batcher
    metrics.set_model(info.name)
    await adapters.on_ready(runtime)  # the start-up adapters into engine.adapters
    await generation.on_ready(runtime)  # after the registry: generation checks adapter names against it
    runtime.ready.set()
    log.info("serving %s (%s, %s) on %s/%s; outputs: %s", info.name, loaded.task, loaded.architecture,
             loaded.device, loaded.dtype, ", ".join(info.output_names))


@dataclass
class RunningServer:
    server: grpc.aio.Server
    runtime: Runtime
    generation: GenerationServicer
    health: serving.HealthReporter
    port: int
    http: object = None  # splitserve_common.http_front.HttpFront of the v2 REST door, when --http-port


def generation_servicer(runtime: Runtime) -> GenerationServicer:
    args = runtime.args
    limits = Limits(max_sequences=args.gen_max_sequences, max_tokens=args.gen_max_tokens,
                    max_waiting=args.gen_max_waiting)
    return GenerationServicer(runtime, limits, stream_interval=args.gen_stream_interval,
                              max_beams=args.gen_max_beams, torch_threads=args.gen_torch_threads,
                              onednn_matmuls=args.gen_onednn_matmuls, fused_gelu=args.gen_fused_gelu,
                              lanes=args.gen_lanes)


async def start(args) -> RunningServer:
    """Bind, start answering (NOT_SERVING), load and warm up, then report SERVING."""
    runtime = Runtime(args)
    server = serving.create_server(args)
    inference = InferenceServicer(runtime)
    open_inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    generation = generation_servicer(runtime)
    generation_pb2_grpc.add_GenerationServicer_to_server(generation, server)
    adapters = adapters_servicer.register(server, runtime)
    names = [INFERENCE_SERVICE, GENERATION_SERVICE, adapters_servicer.SERVICE_NAME]
    health = serving.HealthReporter(server, names)
    serving.enable_reflection(server, names)
    port = serving.add_port(server, args, args.port)
    await health.set(False)
    await server.start()
    http = v2_rest.build_front(args, inference) if args.http_port else None
    if http is not None:
        log.info("v2 REST on %s:%d", args.host, await http.start())
    log.info("listening on %s:%d (NOT_SERVING until the model is loaded)", args.host, port)
    try:
        await load_runtime(runtime, adapters, generation)
    except LoadError as exc:
        log.error("cannot serve %s: %s", args.model_dir, exc)
        await server.stop(0)
        raise ConfigurationError(str(exc)) from None  # the CLI prints it and exits 2
    # A model without a language-model head: the Generation service is there but cannot serve.
    await health.set(True, not_serving=[] if generation.can_generate else [GENERATION_SERVICE])
    return RunningServer(server, runtime, generation, health, port, http)


async def shutdown(running: RunningServer, grace: float | None = 0) -> None:
    if running.http is not None:
        running.http.begin_drain()
        await running.http.stop(grace or 0)
    await running.server.stop(grace)
    await running.generation.stop()
    if running.runtime.batcher is not None:
        await running.runtime.batcher.stop()
    if running.runtime.engine is not None:
        running.runtime.engine.close()


async def serve(args) -> None:
    running = await start(args)

    async def on_drain():
        if running.http is not None:
            running.http.begin_drain()  # new HTTP requests get 503, those in flight go on

    try:
        await serving.wait_for_termination(running.server, running.health, args.drain_seconds, on_drain=on_drain,
                                           after_drain=running.http.stop if running.http is not None else None)
    finally:
        await shutdown(running)
