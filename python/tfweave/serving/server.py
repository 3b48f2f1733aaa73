"""``ModelServer``: the manager, the batch scheduler and both protocol front ends, started and
stopped together; what ``tfweave serve`` runs and what the demo and benchmark embed."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from tfweave.serving.model_config import (NETFUSE_PLATFORM, BatchingParameters, ConfigError,
                                          ModelEntry, available_versions,
                                          read_netfuse_metadata, version_path)

LOG = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    entries: list[ModelEntry]
    host: str = "127.0.0.1"
    port: int = 8500                       # gRPC; 0 picks a free port
    rest_api_port: int = 8501              # 0 disables REST (TF Serving's meaning)
    batching: BatchingParameters | None = None   # None: --enable_batching not given
    backend: str = "embedded"
    max_request_bytes: int = 64 << 20
    rest_api_num_threads: int = 256
    rest_api_timeout_ms: int = 30000
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    model_warmup: bool = True              # replay assets.extra/tf_serving_warmup_requests
    # --file_system_poll_wait_seconds: look for new versions this often (<= 0: only at start)
    poll_wait_s: float = 1.0
    # --model_config_file and --model_config_file_poll_wait_seconds: re-read it this often
    config_file: str = ""
    config_poll_wait_s: float = 0.0
    # On stop (SIGTERM): new requests are refused, those already in get this long to be
    # answered before the models are closed
    shutdown_grace_s: float = 10.0
    extra: dict = field(default_factory=dict)


def entries_for_base_path(name: str, base_path: str) -> list[ModelEntry]:
    """--model_name/--model_base_path: the model itself, plus, when it is a merged model, each
    member under its own name (from the newest version's assets/netfuse.json)."""
    entries = [ModelEntry(name=name, base_path=base_path)]
    versions = available_versions(base_path)
    if versions:
        metadata = read_netfuse_metadata(version_path(base_path, versions[-1]))
        if metadata is not None:
            for member in metadata["members"]:
                if member["name"] == name:
                    raise ConfigError(f"--model_name {name} is also a member name of the merged "
                                      f"model {base_path}; pick another --model_name")
                entries.append(ModelEntry(name=member["name"], base_path=base_path,
                                          platform=NETFUSE_PLATFORM))
    return entries


class ModelServer:
    def __init__(self, options: ServerOptions):
        from tfweave.serving.backends import default_intra_op_threads, make_backend
        from tfweave.serving.metrics import Metrics
        from tfweave.serving.model_manager import ModelManager

        self.options = options
        self.metrics = Metrics()
        batch_threads = (options.batching or BatchingParameters()).num_batch_threads
        intra = options.intra_op_threads or default_intra_op_threads(batch_threads)
        backend = make_backend(options.backend, intra_op_threads=intra,
                               inter_op_threads=options.inter_op_threads)
        # The scheduler gets the same thread count the intra-op default divided the cores by.
        self.manager = ModelManager(options.entries, backend, options.batching, self.metrics,
                                    num_batch_threads=batch_threads,
                                    model_warmup=options.model_warmup)
        self.metrics.queue_depths = self.manager.scheduler.queue_depths
        self.metrics.is_model = lambda name: name in self.manager.models
        self._grpc = None
        self._rest = None
        self.grpc_port = None
        self.rest_port = None
        self._stop_watching = threading.Event()
        self._config_thread = None

    def start(self) -> "ModelServer":
        from tfweave.serving.grpc_service import GrpcServer
        from tfweave.serving.rest_api import HttpServer

        o = self.options
        try:
            self._grpc = GrpcServer(self.manager, self.metrics, o.host, o.port,
                                    o.max_request_bytes)
            self.grpc_port = self._grpc.start()
            if o.rest_api_port:
                self._rest = HttpServer(self.manager, self.metrics, o.host, o.rest_api_port,
                                        max_request_bytes=o.max_request_bytes,
                                        timeout_s=o.rest_api_timeout_ms / 1000,
                                        max_connections=o.rest_api_num_threads)
                self.rest_port = self._rest.start()
        except Exception:
            self.stop()
            raise
        if o.poll_wait_s > 0:
            self.manager.start_polling(o.poll_wait_s)
        if o.config_file and o.config_poll_wait_s > 0:
            from tfweave.serving.model_manager import run_periodically

            self._config_thread = run_periodically(
                "tfweave-config-poll", o.config_poll_wait_s, self._config_poller(),
                self._stop_watching)
        LOG.info("serving gRPC on %s:%s%s", o.host, self.grpc_port,
                 f", REST on {o.host}:{self.rest_port}" if self.rest_port else "")
        return self

    def _config_poller(self):
        """TF Serving's --model_config_file_poll_wait_seconds: returns the check to run every
        period. A changed file is applied as a HandleReloadConfigRequest would be; a bad one is
        logged and the old config kept."""
        from tfweave.serving.model_config import ConfigError, parse_model_server_config

        path = self.options.config_file

        def read() -> str:
            try:
                with open(path) as f:
                    return f.read()
            except OSError as error:
                return f"unreadable: {error}"

        applied = [read()]   # what the server started with (it was parsed moments ago)
        failed = [None]      # a changed text that did not apply: retried at every poll, as
                             # TF Serving re-applies its file (a base path may appear later)

        def check():
            text = read()
            if text == applied[0]:
                return
            try:
                self.manager.reload_config(parse_model_server_config(
                    path, first_config=not self.manager.entries))
            except ConfigError as error:
                if text != failed[0]:   # logged once per text, not once per poll
                    LOG.error("%s changed but was not applied (the old config keeps serving; "
                              "retried at every poll): %s", path, error)
                failed[0] = text
                return
            applied[0], failed[0] = text, None
            LOG.info("%s changed: now serving %s", path, ", ".join(sorted(self.manager.models)))

        return check

    def stop(self) -> None:
        self._stop_watching.set()
        if self._config_thread is not None:
            # a reload in progress may be draining the queues it retires (up to a minute)
            self._config_thread.join(timeout=self.manager.DRAIN_TIMEOUT_S + 10)
            self._config_thread = None
        # Both front ends stop taking requests at once and answer the ones they hold (the
        # batch queues still run) within the grace; only then are the models closed.
        grace = self.options.shutdown_grace_s
        if self._grpc is not None:
            self._grpc.stopping(grace)
        if self._rest is not None:
            self._rest.stop(grace)
            self._rest = None
        if self._grpc is not None:
            self._grpc.stop(grace)
            self._grpc = None
        self.manager.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
