"""``tfweave serve``: a TF Serving-compatible model server with cross-model batching.

Flags are tensorflow_model_server's (``--port``, ``--rest_api_port``, ``--model_config_file``,
``--model_name``/``--model_base_path``, ``--enable_batching``, ``--batching_parameters_file``,
``--rest_api_num_threads``, ``--rest_api_timeout_in_ms``, ``--tensorflow_*_parallelism``,
``--enable_model_warmup``, ``--file_system_poll_wait_seconds``,
``--model_config_file_poll_wait_seconds``) plus
``--host``, ``--backend`` and ``--max_request_bytes``. TensorFlow is imported in ``main`` only.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--port", type=int, default=8500, help="gRPC port (0: pick a free one)")
    add("--rest_api_port", type=int, default=8501,
        help="REST port (0 disables REST, as in TF Serving)")
    add("--host", default="127.0.0.1",
        help="address to bind (default loopback; 0.0.0.0 to serve the network)")
    add("--model_config_file", default="",
        help="TF Serving ModelServerConfig text proto; merged models' members are configs with "
             "model_platform: \"netfuse\"")
    add("--model_name", default="default", help="name of the model given by --model_base_path")
    add("--model_base_path", default="",
        help="directory of numbered versions (BASE/1, BASE/2, ...); the newest is served. A "
             "merged model's members are served too, under their own names")
    add("--enable_batching", action="store_true",
        help="batch requests: per model, and across the members of merged models")
    add("--batching_parameters_file", default="",
        help="BatchingParameters text proto (max_batch_size, batch_timeout_micros, "
             "num_batch_threads, max_enqueued_batches)")
    add("--backend", default="embedded",
        help="'embedded' (in-process TensorFlow) or grpc://HOST:PORT to forward every run, "
             "merged batches included, to a TF Serving hosting the same models")
    add("--max_request_bytes", type=int, default=64 << 20,
        help="largest request accepted on gRPC and REST (larger: RESOURCE_EXHAUSTED / 413)")
    add("--rest_api_num_threads", type=int, default=256,
        help="most REST connections served at once (more get 503)")
    add("--rest_api_timeout_in_ms", type=int, default=30000,
        help="deadline of a REST request; 0 or less: none (TF Serving's meaning)")
    add("--tensorflow_intra_op_parallelism", type=int, default=0,
        help="threads per op of a model run; 0 (default): the cores divided among the batch "
             "threads (num_batch_threads), at least 1, rather than TensorFlow's every core "
             "per op, which the batch threads' runs would share")
    add("--tensorflow_inter_op_parallelism", type=int, default=0)
    add("--enable_model_warmup", type=_flag_bool, nargs="?", const=True, default=True,
        metavar="true|false",
        help="replay each SavedModel's assets.extra/tf_serving_warmup_requests when it loads "
             "(TF Serving's flag; default true)")
    add("--file_system_poll_wait_seconds", type=int, default=1,
        help="seconds between looks at the base paths for new versions, which are loaded (and "
             "the ones the version policy drops unloaded) while serving; 0 or less: only at "
             "startup (TF Serving's flag; default 1)")
    add("--model_config_file_poll_wait_seconds", type=int, default=0,
        help="re-read --model_config_file this often and apply a changed one (models added, "
             "removed or changed); 0: never (TF Serving's flag and default)")
    add("--shutdown_grace_seconds", type=float, default=10.0,
        help="on SIGTERM or SIGINT, new requests are refused at once and the ones already "
             "received get this long to be answered before the server exits (default 10)")
    add("--quiet", action="store_true", help="log warnings only")


def _flag_bool(text: str) -> bool:
    """TF Serving's boolean flag values: --flag, --flag=true, --flag=false (or 1 / 0)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _check_flags(args) -> None:
    """Flag values no server can run with, refused before anything loads (gRPC would bind
    --port 70000 as port 4464, and REST would die with a traceback)."""
    from tfweave.serving.model_config import ConfigError

    for flag, port in (("--port", args.port), ("--rest_api_port", args.rest_api_port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{flag} {port}: a TCP port is 0-65535")
    if args.rest_api_port and args.rest_api_port == args.port:
        raise ConfigError(f"--rest_api_port {args.rest_api_port} is also the gRPC --port; give "
                          "the REST API a port of its own (or --rest_api_port 0 to disable it)")
    if args.rest_api_num_threads < 1:
        raise ConfigError(f"--rest_api_num_threads {args.rest_api_num_threads}: at least one "
                          "REST connection must be served (--rest_api_port 0 disables REST)")
    if args.max_request_bytes < 1:
        raise ConfigError(f"--max_request_bytes {args.max_request_bytes}: must be at least 1")


def build_options(args):
    from tfweave.serving.model_config import (ConfigError, parse_batching_parameters,
                                              parse_model_server_config)
    from tfweave.serving.server import ServerOptions, entries_for_base_path

    _check_flags(args)
    if args.model_config_file and args.model_base_path:
        raise ConfigError("give either --model_config_file or --model_base_path, not both")
    if args.model_config_file:
        entries = parse_model_server_config(args.model_config_file, first_config=True)
    elif args.model_base_path:
        entries = entries_for_base_path(args.model_name, args.model_base_path)
    else:
        raise ConfigError("nothing to serve: give --model_base_path (with --model_name) or "
                          "--model_config_file")
    batching = None
    if args.enable_batching:
        batching = parse_batching_parameters(args.batching_parameters_file or None)
    elif args.batching_parameters_file:
        raise ConfigError("--batching_parameters_file needs --enable_batching")
    return ServerOptions(
        entries=entries, host=args.host, port=args.port, rest_api_port=args.rest_api_port,
        batching=batching, backend=args.backend, max_request_bytes=args.max_request_bytes,
        rest_api_num_threads=args.rest_api_num_threads,
        rest_api_timeout_ms=args.rest_api_timeout_in_ms,
        intra_op_threads=args.tensorflow_intra_op_parallelism,
        inter_op_threads=args.tensorflow_inter_op_parallelism,
        model_warmup=args.enable_model_warmup,
        poll_wait_s=args.file_system_poll_wait_seconds,
        config_file=args.model_config_file,
        config_poll_wait_s=args.model_config_file_poll_wait_seconds,
        shutdown_grace_s=max(0.0, args.shutdown_grace_seconds))


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tfweave.serving.model_config import ConfigError
    from tfweave.serving.server import ModelServer

    try:
        options = build_options(args)
        server = ModelServer(options).start()
    except (ConfigError, ValueError, OSError) as error:
        print(f"tfweave serve: {error}", file=sys.stderr)
        return 2
    # Loading TensorFlow and the models leaves millions of long-lived Python objects, and a
    # full collection walks them all: measured at 100-150 ms on a merged model, stalling every
    # request in flight (the sporadic p99 spikes under load). Freezing them keeps later full
    # collections down to what serving itself allocates.
    gc.collect()
    gc.freeze()
    server.metrics.watch_collector()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    models = ", ".join(sorted(server.manager.models))
    rest = f" REST {options.host}:{server.rest_port}" if server.rest_port else ""
    print(f"tfweave serve: ready gRPC {options.host}:{server.grpc_port}{rest} models: {models}",
          flush=True)
    while not stop.wait(0.5):  # a timed wait lets the signal handler run promptly
        pass
    server.stop()
    logging.getLogger(__name__).info("stopped")
    # The server is stopped and nothing is left to write; TensorFlow's and gRPC's interpreter
    # teardown would take seconds more, which a restarting supervisor (or a test) waits out.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)
