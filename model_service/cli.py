"""`model-service` / `python -m model_service`: every setting is a flag and a MODEL_SERVICE_* variable."""

from __future__ import annotations

import sys

from model_service.adapters_servicer import ADAPTER_OPTIONS
from model_service.backends import BACKENDS
from model_service.generation.options import GENERATION_OPTIONS
from splitserve_common import memory, serving
from splitserve_common.http_front import http_port_option
from splitserve_common.settings import Option, parse

ENV_PREFIX = "MODEL_SERVICE_"

MODEL_OPTIONS = [
    Option("model-dir", "", "model directory: MLflow transformers components layout or a save_pretrained dir"),
    Option("model-name", "", "name the model is served under (default: the model directory's base name)"),
    Option("task", "", "pipeline task, overriding MLmodel / the config (e.g. text-classification)"),
    Option("dtype", "auto", "dtype to load the weights in (auto: MLmodel torch_dtype, else float32)",
           choices=["auto", "float32", "float16", "bfloat16"]),
    Option("device", "auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"),
    Option("base-model-path", "", "directory of the base weights, overriding MLmodel local_base_model_path"),
    Option("merge-peft", False, "fold the MLflow model's own peft/ adapter into the weights at load (fastest; "
           "the base alone is then not servable) instead of serving it as a named adapter", bool),
    Option("allow-pickle", False, "allow pickle (.bin) weights, which can run code on load", bool),
    Option("trust-remote-code", False, "allow models whose code ships with the weights", bool),
    Option("port", 8001, "gRPC port", int),
    http_port_option(8000, "the v2 REST API (KServe / Triton HTTP: tritonclient.http)"),
    serving.metrics_port_option(8002),
    Option("max-batch-size", 32, "most rows in one forward pass (also the largest batch one request may send)",
           int),
    Option("max-wait-us", 2000, "while a batch computes, how long the next one waits for more rows, in µs "
           "(an idle worker starts at once)", int),
    Option("token-budget", 16384, "most tokens in one forward pass: rows x longest row, or the rows' own tokens "
           "with a padding-free engine (--engine eager on BERT encoders)", int),
    Option("max-pass-ms", 50.0, "a forward pass for a request of several rows is cut to take about this long "
           "by the measured cost (one row always fits), so a one-row request arriving meanwhile waits about one "
           "such pass; 0: only --token-budget bounds a pass", float),
    Option("lone-pass-ms", 30.0, "a forward pass with nothing else computing or waiting, expected to take at most "
           "this on one forward worker, runs alone with every worker's torch threads (kept only while that measures "
           "faster); a request arriving meanwhile waits for it; 0: every pass on a forward worker's share", float),
    Option("batch-overhead-tokens", 64, "fixed cost of one forward pass in padded-token equivalents: higher "
           "merges rows of different lengths into fewer, more padded batches (a padding-free engine merges them "
           "anyway)", int),
    Option("stream-window", 64, "most ModelStreamInfer requests of one stream in flight at once; the next is read "
           "when one is answered", int),
    Option("max-input-values", 480000, "audio models: most samples in one input_values row (480000: 30 s at "
                                       "16 kHz); longer clips are refused", int),
    Option("max-queue-rows", 1024, "rows waiting beyond this are refused with RESOURCE_EXHAUSTED", int),
    Option("forward-workers", 0, "batched forward passes run at once, each on its own share of the CPUs (0: 2 on "
           "a CPU node with 2 or more CPUs, else 1); batches with adapter rows run alone", int),
    Option("forward-bulk-nice", 10, "with 2 or more forward workers, passes for long requests (more than 8 passes "
           "of --max-pass-ms) run on workers of their own with this much more nice value, so one-row requests' "
           "passes beside them get most of the CPU (0: on the same workers; docs/model_service.md)", int),
    memory.release_memory_option(),
    memory.onednn_cache_option(),
    Option("torch-threads", 0, "CPU threads torch may use per forward worker (0: the process's CPUs split evenly "
           "between the workers)", int),
    Option("engine", "eager", "what runs the batched forward passes (model_service/backends.py): eager (padding-free "
           "for BERT encoders, the model's own forward otherwise) or eager-padded (always the model's own forward)",
           choices=list(BACKENDS)),
]
OPTIONS = MODEL_OPTIONS + serving.SERVER_OPTIONS + ADAPTER_OPTIONS + GENERATION_OPTIONS


def parse_args(argv=None):
    args = parse("model-service", "Serve a transformers model's forward pass over gRPC (v2 tensor API).",
                 OPTIONS, ENV_PREFIX, argv)
    if not args.model_dir:
        print("model-service: --model-dir (or MODEL_SERVICE_MODEL_DIR) is required", file=sys.stderr)
        raise SystemExit(2)
    return args


def main(argv=None) -> int:
    from model_service.server import serve

    args = parse_args(argv)
    serving.configure_logging(args.log_level, args.log_format)
    return serving.run_service("model-service", serve(args))


if __name__ == "__main__":
    sys.exit(main())
