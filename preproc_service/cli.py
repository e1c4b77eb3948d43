"""`preproc-service` / `python -m preproc_service`: every setting is a flag and a PREPROC_* variable."""

from __future__ import annotations

import os
import sys

from preproc_service.limits import LIMIT_OPTIONS
from preproc_service.model_room import MAX_WAITING_OPTION
from splitserve_common import memory
from splitserve_common.channels import client_options
from splitserve_common.http_front import http_port_option
from splitserve_common.serving import SERVER_OPTIONS, run_service
from splitserve_common.settings import Option, parse, seconds

ENV_PREFIX = "PREPROC_"

OPTIONS = [
    Option("model-dir", "", "model directory (MLflow components layout or save_pretrained); only the tokenizer, "
                            "MLmodel and configs are read"),
    Option("model-service", "127.0.0.1:8001", "model_service address HOST:PORT, or dns:///NAME:PORT for replicas"),
    Option("model-name", "", "model name sent to the model service (empty: the one it serves)"),
    Option("task", "", "pipeline task, when the directory does not say (e.g. text-classification)"),
    Option("port", 8011, "gRPC port (0 picks a free one)", int),
    http_port_option(8010, "the OpenAI-compatible API and MLflow's scoring protocol"),
    Option("metrics-port", 8012, "Prometheus /metrics HTTP port (0 turns it off)", int),
    Option("max-in-flight", 256, "most requests in flight to the model service at once", int),
    MAX_WAITING_OPTION,
    Option("model-timeout", 30.0, "seconds a model call may take when the caller sets no deadline", float),
    Option("stream-window", 64, "most PredictStream items in flight per stream", int),
    Option("max-choices", 8, "most choices (n) one chat or completion request may ask for", int),
    Option("tokenize-batch", 512, "most texts per tokenizer batch call", int),
    Option("tokenize-round-chars", 16384, "most characters tokenized in one round: a larger request is tokenized "
           "a round at a time, so small requests pass it (a small one waits for at most one round: ~6 ms of "
           "one core here)", int),
    Option("tokenize-bulk-nice", 10, "requests of more than --tokenize-round-chars characters are tokenized on a "
           "thread of their own with this much more nice value, small ones on the normal thread (0: one thread for "
           "all; docs/preproc_service.md)", int),
    memory.release_memory_option(),
    Option("audio-root", "", "audio tasks: directory under which a request may name local audio files (empty: "
                             "file locations are refused; URLs are always refused)"),
    Option("max-audio-seconds", 600.0, "audio tasks: longest clip a request may send, in seconds", seconds),
    Option("max-audio-inputs", 32, "audio tasks: most clips in one request", int),
    Option("max-table-cells", 10000, "table-question-answering: most cells (rows x columns) in one table", int),
    Option("max-table-queries", 64, "table-question-answering: most queries in one request (all its tables together)",
           int),
    Option("handshake-retry-seconds", 1.0, "pause between handshake attempts while the model service is down",
           seconds),
    Option("handshake-recheck-seconds", 10.0, "pause between metadata re-checks once serving (at most; see "
           "--model-unreachable-grace-seconds)", seconds),
    Option("model-unreachable-grace-seconds", 3.0, "health turns NOT_SERVING once the model service has been "
           "unreachable this long, and SERVING again when it answers", seconds),
    *LIMIT_OPTIONS,
    *SERVER_OPTIONS,
    *client_options("model-service"),  # TLS/mTLS and bearer token towards model_service
]


def main(argv=None) -> int:
    args = parse("preproc-service", "splitserve preproc_service: tokenizer and task logic, text in, answers out.",
                 OPTIONS, ENV_PREFIX, argv)
    if not args.model_dir:
        print("preproc-service: --model-dir (or PREPROC_MODEL_DIR) is required", file=sys.stderr)
        return 2
    if args.tokenize_bulk_nice:
        # The two tokenizer threads replace the tokenizers library's own thread pool: with it, both threads'
        # texts would run on its threads (not niced, shared), a small request's behind a large one's.
        # TOKENIZERS_PARALLELISM=true set by the operator keeps the pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from preproc_service.torch_guard import hide_torch

    hide_torch()
    from preproc_service.server import serve

    return run_service("preproc-service", serve(args))
