"""The server core: loads what the config lists and answers predict/metadata/status.

Both protocol front ends call the same methods, so a request fails the same way on gRPC and
REST. Model resolution follows TF Serving's ServerCore: no version means the newest loaded one,
``version_label`` goes through the config's ``version_labels``.

Versions come and go as in TF Serving's file-system polling (``poll``, which ``tfweave serve``
calls every ``--file_system_poll_wait_seconds``): a version directory that appears under a base
path and that the version policy names is loaded (and warmed up) beside the serving ones, then
made visible; only then are the versions the policy no longer names retired. A retired
version takes no new request (one that resolved it just before resolves again), answers what
it already queued, and its session is closed once its queues are empty. A version that fails
to load is logged and retried, as TF Serving does; what is serving keeps serving.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from tfweave.serving.batching import Retired, SharedBatchScheduler
from tfweave.serving.model_config import (NETFUSE_PLATFORM, BatchingParameters, ConfigError,
                                          ModelEntry, read_netfuse_metadata, version_path,
                                          versions_to_load)
from tfweave.serving.servables import (MemberServable, MergedModel, PlainServable, Servable,
                                       Signature)
from tfweave.serving.status import invalid_argument, not_found
from tfweave.serving.warmup import run_warmup

LOG = logging.getLogger(__name__)


def run_periodically(name: str, interval_s: float, fn, stop: threading.Event
                     ) -> threading.Thread:
    """Calls ``fn()`` every ``interval_s`` seconds on a daemon thread until ``stop`` is set;
    an exception is logged and the next call still happens (a poll must never take the
    server down)."""
    def loop():
        while not stop.wait(interval_s):
            try:
                fn()
            except Exception:
                LOG.exception("%s failed", name)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


def _refreeze() -> None:
    """After models were loaded while serving: if the startup heap was frozen (cli.main), the
    new sessions' long-lived objects join it, so full collections stay short."""
    if gc.get_freeze_count():
        gc.collect()
        gc.freeze()


@dataclass
class ServedModel:
    name: str
    kind: str                                  # "plain" | "member"
    versions: dict[int, Servable] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    base_path: str = ""


class ModelManager:
    # TF Serving's defaults (--max_num_load_retries, --load_retry_interval_micros).
    MAX_LOAD_RETRIES = 5
    LOAD_RETRY_INTERVAL_S = 60.0
    # How long a retired version may take to answer what it had queued before it is closed.
    DRAIN_TIMEOUT_S = 60.0

    def __init__(self, entries: list[ModelEntry], backend, batching: BatchingParameters | None,
                 metrics, *, num_batch_threads: int | None = None, model_warmup: bool = True):
        self.entries = list(entries)
        self.backend = backend
        self.model_warmup = model_warmup
        self.batching = batching
        self.metrics = metrics
        threads = num_batch_threads or (batching.num_batch_threads if batching else
                                        BatchingParameters().num_batch_threads)
        self.scheduler = SharedBatchScheduler(threads, metrics)
        self.models: dict[str, ServedModel] = {}
        self._loaded: dict[tuple[str, int], object] = {}   # (version dir) -> LoadedModel
        self._merged: dict[tuple[str, int], MergedModel] = {}
        self._poll_lock = threading.Lock()
        # (base path, version) -> (failed attempts, next attempt at, last error)
        self._failed: dict[tuple[str, int], tuple[int, float, str]] = {}
        self._warned: dict[str, str] = {}   # model name -> the policy error last logged
        self._poll_thread: threading.Thread | None = None
        self._stop_polling = threading.Event()
        try:
            self._load(entries)
        except Exception:
            self.close()
            raise

    # ----------------------------------------------------------------- loading
    def _loaded_model(self, path: str, remote_name: str, version: int):
        key = (os.path.realpath(path), version)
        if key not in self._loaded:
            LOG.info("loading %s (backend %s)", path, self.backend.name)
            try:
                model = self.backend.load(path, remote_name, version)
            except Exception as error:
                raise ConfigError(f"cannot load SavedModel {path}: {error}") from error
            # a remote TF Serving warms up its own models
            if self.model_warmup and self.backend.name == "embedded":
                try:
                    run_warmup(model, path, self.metrics)
                except ConfigError:
                    model.close()
                    raise
            self._loaded[key] = model
        return self._loaded[key]

    def _remote_name(self, entries: list[ModelEntry], entry: ModelEntry) -> str:
        """The name a grpc backend hosts this SavedModel under: a plain entry with the same
        base path gives it; otherwise the base path's last component (TF Serving's
        /models/NAME convention)."""
        real = os.path.realpath(entry.base_path)
        for other in entries:
            if other.platform != NETFUSE_PLATFORM and os.path.realpath(other.base_path) == real:
                return other.name
        return os.path.basename(real.rstrip("/"))

    def _load(self, entries: list[ModelEntry]) -> None:
        for entry in entries:
            served = self._served_model(entry, entries)
            self.models[entry.name] = served
            LOG.info("serving %s (%s) versions %s", entry.name, served.kind,
                     sorted(served.versions))

    def _served_model(self, entry: ModelEntry, entries: list[ModelEntry]) -> ServedModel:
        """``entry`` with every version its policy names loaded (ConfigError if one fails)."""
        served = ServedModel(entry.name, "member" if entry.platform == NETFUSE_PLATFORM
                             else "plain", labels=dict(entry.version_labels),
                             base_path=entry.base_path)
        for version in versions_to_load(entry):
            served.versions[version] = self._servable(entry, version, entries)
        return served

    def _servable(self, entry: ModelEntry, version: int,
                  entries: list[ModelEntry] | None = None) -> Servable:
        path = version_path(entry.base_path, version)
        remote = self._remote_name(self.entries if entries is None else entries, entry)
        model = self._loaded_model(path, remote, version)
        if entry.platform != NETFUSE_PLATFORM:
            return PlainServable(entry.name, version, model, self.scheduler, self.batching)
        merged = self._merged_model(path, remote, version, model)
        if entry.name not in merged.member_names:
            raise ConfigError(
                f"model {entry.name}: not a member of the merged model {path} "
                f"(members: {', '.join(merged.member_names)}); a "
                f"'{NETFUSE_PLATFORM}' config's name must be a member name")
        return MemberServable(entry.name, merged, merged.member_names.index(entry.name))

    # ----------------------------------------------------------------- version polling
    def start_polling(self, interval_s: float) -> None:
        """Calls ``poll`` every ``interval_s`` seconds on a daemon thread until ``close``."""
        self._poll_thread = run_periodically("tfweave-poll", interval_s, self.poll,
                                             self._stop_polling)

    def poll(self) -> bool:
        """One pass of TF Serving's file-system polling over every configured model; True if
        a version was loaded or unloaded."""
        with self._poll_lock:
            changed, retired, failed = False, [], False
            remote_has = {}   # (remote name, version) -> bool: one backend call per pass
            for entry in self.entries:
                served = self.models[entry.name]
                try:
                    wanted = versions_to_load(entry, served.versions)
                except ConfigError as error:
                    # e.g. the base path emptied: TF Serving keeps serving what it has loaded
                    message = f"{error}; keeping versions {sorted(served.versions)}"
                    if self._warned.get(entry.name) != message:   # once, not every second
                        self._warned[entry.name] = message
                        LOG.warning("%s", message)
                    continue
                self._warned.pop(entry.name, None)
                current = served.versions
                if set(wanted) == set(current):
                    continue
                versions, missing = {}, False
                for version in wanted:
                    if version in current:
                        versions[version] = current[version]
                    elif not self._remote_has(entry, version, remote_has):
                        missing = True   # not a failure: asked again at the next poll
                    elif self._may_load(entry, version):
                        try:
                            versions[version] = self._servable(entry, version)
                        except Exception as error:   # any failure: log, retry, keep serving
                            self._load_failed(entry, version, error)
                            missing = failed = True
                        else:
                            self._failed.pop((entry.base_path, version), None)
                            LOG.info("model %s: version %d loaded", entry.name, version)
                    else:
                        missing = True
                # Availability first: while a wanted version is not loaded, nothing unloads.
                if missing:
                    versions.update({v: s for v, s in current.items() if v not in versions})
                if set(versions) == set(current):
                    continue
                served.versions = versions     # one assignment: readers see old or new
                for version in sorted(set(current) - set(versions)):
                    LOG.info("model %s: version %d unloading", entry.name, version)
                    retired.append(current[version])
                changed = True
            if retired or failed:   # a failed load may have left a session nothing uses
                self._unload(retired)
            if changed:
                _refreeze()
            return changed

    def reload_config(self, entries: list[ModelEntry]) -> None:
        """Serves ``entries`` from now on (TF Serving's HandleReloadConfigRequest): models new
        to the config, or whose entry changed, are loaded first; if any fails, nothing changes
        and ConfigError says why. Then the new set is swapped in and the models (or versions)
        it no longer names are retired as polling retires versions."""
        with self._poll_lock:
            old = {e.name: e for e in self.entries}
            models: dict[str, ServedModel] = {}
            try:
                for entry in entries:
                    models[entry.name] = (self.models[entry.name] if old.get(entry.name) == entry
                                          else self._served_model(entry, entries))
            except Exception as error:
                self._unload([])   # close what the failed attempt loaded and nothing serves
                if isinstance(error, ConfigError):
                    raise
                raise ConfigError(f"reloading the model config failed: {error}") from error
            retired = [s for name, served in self.models.items()
                       if models.get(name) is not served for s in served.versions.values()]
            self.entries = list(entries)
            self.models = models               # one assignment: readers see old or new
            for name in sorted(set(old) - set(models)):
                LOG.info("model %s: removed from the config", name)
            self._unload(retired)
            _refreeze()

    def _remote_has(self, entry: ModelEntry, version: int, asked: dict) -> bool:
        """For a grpc:// backend, whether the remote serves this version yet (the local
        directory can appear first); always true in process. ``asked`` keeps the answers of
        this poll pass: a merged model's members share one remote model."""
        available = getattr(self.backend, "available", None)
        if available is None or (os.path.realpath(version_path(entry.base_path, version)),
                                 version) in self._loaded:
            return True
        key = (self._remote_name(self.entries, entry), version)
        if key not in asked:
            asked[key] = available(*key)
        return asked[key]

    def _may_load(self, entry: ModelEntry, version: int) -> bool:
        failures, retry_at, _ = self._failed.get((entry.base_path, version), (0, 0.0, ""))
        return failures <= self.MAX_LOAD_RETRIES and time.monotonic() >= retry_at

    def _load_failed(self, entry: ModelEntry, version: int, error: Exception) -> None:
        key = (entry.base_path, version)
        failures = self._failed.get(key, (0, 0.0, ""))[0] + 1
        self._failed[key] = (failures, time.monotonic() + self.LOAD_RETRY_INTERVAL_S,
                             f"{type(error).__name__}: {error}" if not isinstance(
                                 error, ConfigError) else str(error))
        if failures <= self.MAX_LOAD_RETRIES:
            LOG.error("model %s: loading version %d failed (retry %d of %d in %.0f s): %s",
                      entry.name, version, failures, self.MAX_LOAD_RETRIES,
                      self.LOAD_RETRY_INTERVAL_S, error)
        else:
            LOG.error("model %s: loading version %d failed %d times; giving up on it until "
                      "the server restarts: %s", entry.name, version, failures, error)

    def _unload(self, retired: list[Servable]) -> None:
        """Drains and closes what no served version uses any more."""
        live = [s for m in self.models.values() for s in m.versions.values()]
        live_merged = {id(s.merged) for s in live if isinstance(s, MemberServable)}
        live_models = {id(s.model) for s in live if isinstance(s, PlainServable)}
        live_models |= {id(s.merged.model) for s in live if isinstance(s, MemberServable)}
        queues = []
        for servable in retired:
            if isinstance(servable, PlainServable):
                queues += servable.retire()
        for key, merged in list(self._merged.items()):
            if id(merged) not in live_merged:
                queues.append(merged.queue)
                del self._merged[key]
        for queue in queues:
            if not self.scheduler.retire(queue, self.DRAIN_TIMEOUT_S):
                LOG.warning("model %s: requests still queued after %.0f s failed UNAVAILABLE "
                            "when its version unloaded", queue.name, self.DRAIN_TIMEOUT_S)
        for key, model in list(self._loaded.items()):
            if id(model) not in live_models:
                del self._loaded[key]
                try:
                    model.close()
                except Exception:
                    LOG.warning("closing %s failed", key[0], exc_info=True)
                LOG.info("unloaded %s", key[0])

    def _merged_model(self, path, remote, version, model) -> MergedModel:
        key = (os.path.realpath(path), version)
        if key not in self._merged:
            metadata = read_netfuse_metadata(path)
            if metadata is None:
                raise ConfigError(f"{path}: model_platform '{NETFUSE_PLATFORM}' needs a merged "
                                  "model with assets/netfuse.json (made by tfweave merge)")
            self._merged[key] = MergedModel(remote, version, model, metadata, self.scheduler,
                                            self.batching)
        return self._merged[key]

    # ----------------------------------------------------------------- requests
    def resolve(self, name: str, version: int | None = None,
                label: str | None = None) -> Servable:
        served = self.models.get(name)
        if version is not None and label:
            raise invalid_argument(f"Both model version ({version}) and model version label "
                                   f"({label}) cannot be supplied.")
        if served is None:
            if version is not None:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            if label:
                raise not_found(f"Servable not found for request: Label({name}, {label})")
            raise not_found(f"Servable not found for request: Latest({name})")
        if label:
            if label not in served.labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            version = served.labels[label]
        versions = served.versions   # once: polling may swap in a new dict meanwhile
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return versions[version]

    def input_dtypes(self, name: str, version: int | None, label: str | None,
                     signature_name: str) -> dict[str, int]:
        return self.resolve(name, version, label).signature(signature_name).input_dtypes

    def predict(self, name: str, version: int | None, label: str | None, signature_name: str,
                inputs: dict[str, np.ndarray], output_filter=()
                ) -> tuple[Servable, Signature, Future]:
        while True:
            servable = self.resolve(name, version, label)
            signature = servable.signature(signature_name)
            signature.check_inputs(inputs)
            output_keys = signature.check_output_filter(list(output_filter))
            try:
                return servable, signature, servable.submit(signature, inputs, output_keys)
            except Retired:
                continue   # its version was unloaded just now: the next resolve sees that

    def status(self, name: str, version: int | None, label: str | None = None
               ) -> list[tuple[int, str | None]]:
        """(version, None) for each loaded version to report, newest first, and (version,
        error) for versions under the base path whose loading failed, as TF Serving reports
        them in state END (GetModelStatus errors for versions it never saw)."""
        if not name:
            raise invalid_argument("Missing model name in request.")
        served = self.models.get(name)
        if served is None:
            raise not_found(f"Could not find any versions of model {name}")
        if label:
            if label not in served.labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            version = served.labels[label]
        versions = served.versions
        failed = {v: error for (base, v), (_, _, error) in self._failed.items()
                  if base == served.base_path and v not in versions
                  and os.path.isdir(version_path(base, v))}   # not if since deleted
        if version is not None:
            if version in versions:
                return [(version, None)]
            if version in failed:
                return [(version, failed[version])]
            raise not_found(f"Could not find version {version} of model {name}")
        return sorted([(v, None) for v in versions] + list(failed.items()), reverse=True,
                      key=lambda item: item[0])

    def close(self) -> None:
        self._stop_polling.set()
        if self._poll_thread is not None:
            self._poll_thread.join(timeout=self.DRAIN_TIMEOUT_S + 5)
        self.scheduler.stop()
        for model in self._loaded.values():
            try:
                model.close()
            except Exception:  # closing is best effort at shutdown
                LOG.debug("closing %s failed", getattr(model, "path", model), exc_info=True)
        self.backend.close()
