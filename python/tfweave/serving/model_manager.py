"""The server core: loads what the config lists and answers predict/metadata/status.

Both protocol front ends call the same methods, so a request fails the same way on gRPC and
REST. Model resolution follows TF Serving's ServerCore: no version means the newest loaded one,
``version_label`` goes through the config's ``version_labels``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from tfweave.serving.batching import SharedBatchScheduler
from tfweave.serving.model_config import (NETFUSE_PLATFORM, BatchingParameters, ConfigError,
                                          ModelEntry, read_netfuse_metadata, versions_to_load)
from tfweave.serving.servables import (MemberServable, MergedModel, PlainServable, Servable,
                                       Signature)
from tfweave.serving.status import invalid_argument, not_found
from tfweave.serving.warmup import run_warmup

LOG = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    kind: str                                  # "plain" | "member"
    versions: dict[int, Servable] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    base_path: str = ""


class ModelManager:
    def __init__(self, entries: list[ModelEntry], backend, batching: BatchingParameters | None,
                 metrics, *, num_batch_threads: int | None = None, model_warmup: bool = True):
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
            versions = versions_to_load(entry)
            remote = self._remote_name(entries, entry)
            served = ServedModel(entry.name, "member" if entry.platform == NETFUSE_PLATFORM
                                 else "plain", labels=dict(entry.version_labels),
                                 base_path=entry.base_path)
            for version in versions:
                path = os.path.join(entry.base_path, str(version))
                model = self._loaded_model(path, remote, version)
                if entry.platform == NETFUSE_PLATFORM:
                    merged = self._merged_model(path, remote, version, model)
                    if entry.name not in merged.member_names:
                        raise ConfigError(
                            f"model {entry.name}: not a member of the merged model {path} "
                            f"(members: {', '.join(merged.member_names)}); a "
                            f"'{NETFUSE_PLATFORM}' config's name must be a member name")
                    servable = MemberServable(entry.name, merged,
                                              merged.member_names.index(entry.name))
                else:
                    servable = PlainServable(entry.name, version, model, self.scheduler,
                                             self.batching)
                served.versions[version] = servable
            self.models[entry.name] = served
            LOG.info("serving %s (%s) versions %s", entry.name, served.kind, versions)

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
        if version is None:
            return served.versions[max(served.versions)]
        if version not in served.versions:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return served.versions[version]

    def input_dtypes(self, name: str, version: int | None, label: str | None,
                     signature_name: str) -> dict[str, int]:
        return self.resolve(name, version, label).signature(signature_name).input_dtypes

    def predict(self, name: str, version: int | None, label: str | None, signature_name: str,
                inputs: dict[str, np.ndarray], output_filter=()
                ) -> tuple[Servable, Signature, Future]:
        servable = self.resolve(name, version, label)
        signature = servable.signature(signature_name)
        signature.check_inputs(inputs)
        output_keys = signature.check_output_filter(list(output_filter))
        return servable, signature, servable.submit(signature, inputs, output_keys)

    def status(self, name: str, version: int | None, label: str | None = None
               ) -> list[int]:
        """Loaded versions to report (TF Serving's GetModelStatus errors for unknown ones)."""
        if not name:
            raise invalid_argument("Missing model name in request.")
        served = self.models.get(name)
        if served is None:
            raise not_found(f"Could not find any versions of model {name}")
        if label:
            if label not in served.labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            version = served.labels[label]
        if version is not None:
            if version not in served.versions:
                raise not_found(f"Could not find version {version} of model {name}")
            return [version]
        return sorted(served.versions, reverse=True)

    def close(self) -> None:
        self.scheduler.stop()
        for model in self._loaded.values():
            try:
                model.close()
            except Exception:  # closing is best effort at shutdown
                LOG.debug("closing %s failed", getattr(model, "path", model), exc_info=True)
        self.backend.close()
