"""What the server hosts: TF Serving's ModelServerConfig and BatchingParameters text protos.

``--model_config_file`` is TF Serving's own text-proto ``ModelServerConfig``. A merged NetFuse
model's members are listed as ordinary ``config`` entries with ``model_platform: "netfuse"``
whose ``base_path`` is the merged model and whose ``name`` is the member's name in the merged
model's ``assets/netfuse.json``; the merged model itself may also be listed with the usual
``model_platform: "tensorflow"``. Stock ``tensorflow_model_server`` rejects the "netfuse"
platform, so a config meant for both servers lists only the merged model (see serving/).

``--batching_parameters_file`` is TF Serving's ``BatchingParameters`` text proto. Its proto is
not shipped in the tensorflow-serving-api wheel, so the message is declared here with the same
field names, numbers and wrapper types, and real TF Serving files parse unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

from tfweave.serving.status import ServingError

LOG = logging.getLogger(__name__)

NETFUSE_PLATFORM = "netfuse"
NETFUSE_METADATA = os.path.join("assets", "netfuse.json")


class ConfigError(ValueError):
    """A config file or flag that cannot be served; the message names the file and field."""


@dataclass
class BatchingParameters:
    """TF Serving's batching knobs with TF Serving's defaults (BasicBatchScheduler options)."""
    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    num_batch_threads: int = max(1, os.cpu_count() or 1)
    max_enqueued_batches: int = 10


@dataclass
class VersionPolicy:
    kind: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: tuple[int, ...] = ()


@dataclass
class ModelEntry:
    """One ``config`` of the ModelServerConfig (or the --model_name/--model_base_path pair)."""
    name: str
    base_path: str
    platform: str = "tensorflow"
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    version_labels: dict[str, int] = field(default_factory=dict)


def parse_model_server_config(path: str, *, first_config: bool = False) -> list[ModelEntry]:
    """Reads a text-proto ModelServerConfig into entries, validating what can be checked early.

    As in TF Serving, an empty ``model_config_list`` means no models, and so does a file that
    sets no config at all while the server has none yet (``first_config``: at start-up, or
    until one is set); a server that serves a config keeps it when the file loses it."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        # text protos are UTF-8, whatever the locale (a model name need not be ASCII)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read --model_config_file {path}: {error}") from error
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ConfigError(f"{path}: not a ModelServerConfig text proto: {error}") from error
    if first_config and config.WhichOneof("config") is None:
        return []
    return entries_from_config(config, path)


def entries_from_config(config, where: str) -> list[ModelEntry]:
    """A ModelServerConfig proto (from a file, or a ReloadConfigRequest) as entries; errors
    name ``where``. An empty model_config_list is no models (a reload to it unloads them all,
    as TF Serving's does)."""
    path = where
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{path}: expected a model_config_list (custom_model_config is not "
                          "supported)")
    entries = []
    seen = set()
    for i, model in enumerate(config.model_config_list.config):
        where = f"{path}: config #{i} ({model.name or 'no name'})"
        if not model.name:
            raise ConfigError(f"{where}: every config needs a name")
        if model.name in seen:
            raise ConfigError(f"{where}: model name {model.name!r} is listed twice")
        seen.add(model.name)
        if not model.base_path:
            raise ConfigError(f"{where}: every config needs a base_path")
        platform = model.model_platform or "tensorflow"
        if platform not in ("tensorflow", NETFUSE_PLATFORM):
            raise ConfigError(f"{where}: model_platform {platform!r} is not served; use "
                              f"'tensorflow' or '{NETFUSE_PLATFORM}'")
        policy = VersionPolicy()
        which = model.model_version_policy.WhichOneof("policy_choice")
        if which == "all":
            policy = VersionPolicy(kind="all")
        elif which == "specific":
            policy = VersionPolicy(kind="specific",
                                   versions=tuple(model.model_version_policy.specific.versions))
            if not policy.versions:
                raise ConfigError(f"{where}: a specific version policy needs versions")
        elif which == "latest":
            policy = VersionPolicy(num_versions=max(
                1, model.model_version_policy.latest.num_versions))
        entries.append(ModelEntry(name=model.name, base_path=model.base_path, platform=platform,
                                  policy=policy, version_labels=dict(model.version_labels)))
    return entries


_BATCHING_PROTO = None


def _batching_parameters_message():
    """Declares TF Serving's BatchingParameters proto (session_bundle_config.proto) once."""
    global _BATCHING_PROTO
    if _BATCHING_PROTO is not None:
        return _BATCHING_PROTO
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf import wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="tfweave/batching_parameters.proto", package="tensorflow.serving",
        dependency=["google/protobuf/wrappers.proto"], syntax="proto3")
    message = file.message_type.add(name="BatchingParameters")
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    msg_type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    # (name, number, wrapper type) as in TF Serving's session_bundle_config.proto.
    for name, number, wrapper in [
            ("max_batch_size", 1, "Int64Value"), ("batch_timeout_micros", 2, "Int64Value"),
            ("max_enqueued_batches", 3, "Int64Value"), ("num_batch_threads", 4, "Int64Value"),
            ("thread_pool_name", 5, "StringValue"), ("max_execution_batch_size", 10,
                                                     "Int64Value"),
            ("enable_large_batch_splitting", 11, "BoolValue"),
            ("batch_padding_policy", 12, "StringValue")]:
        message.field.add(name=name, number=number, label=optional, type=msg_type,
                          type_name=f".google.protobuf.{wrapper}")
    message.field.add(name="allowed_batch_sizes", number=6, label=repeated,
                      type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64)
    message.field.add(name="pad_variable_length_inputs", number=7, label=optional,
                      type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL)
    pool.Add(file)
    _BATCHING_PROTO = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
    return _BATCHING_PROTO


def parse_batching_parameters(path: str | None) -> BatchingParameters:
    """Reads ``--batching_parameters_file``; fields it leaves out keep TF Serving's defaults."""
    params = BatchingParameters()
    if not path:
        return params
    from google.protobuf import text_format

    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(f"cannot read --batching_parameters_file {path}: {error}") from error
    message = _batching_parameters_message()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ConfigError(f"{path}: not a BatchingParameters text proto: {error}") from error
    for name in ("max_batch_size", "batch_timeout_micros", "num_batch_threads",
                 "max_enqueued_batches"):
        if message.HasField(name):
            setattr(params, name, int(getattr(message, name).value))
    for name in ("allowed_batch_sizes", "pad_variable_length_inputs",
                 "enable_large_batch_splitting", "max_execution_batch_size"):
        present = (len(message.allowed_batch_sizes) > 0 if name == "allowed_batch_sizes"
                   else bool(message.pad_variable_length_inputs)
                   if name == "pad_variable_length_inputs" else message.HasField(name))
        if present:
            LOG.warning("%s: %s is accepted but not used by tfweave serve", path, name)
    if params.max_batch_size < 1:
        raise ConfigError(f"{path}: max_batch_size must be >= 1, got {params.max_batch_size}")
    if params.num_batch_threads < 1:
        raise ConfigError(f"{path}: num_batch_threads must be >= 1")
    if params.max_enqueued_batches < 1:
        raise ConfigError(f"{path}: max_enqueued_batches must be >= 1")
    if params.batch_timeout_micros < 0:
        raise ConfigError(f"{path}: batch_timeout_micros must be >= 0")
    return params


_VERSION_DIR = re.compile(r"^\d+$")
# TF Serving takes a version as a signed 64-bit number (safe_strto64)
_MAX_VERSION = 2**63 - 1


def available_versions(base_path: str) -> list[int]:
    """Numeric version directories under ``base_path`` holding a SavedModel, ascending."""
    try:
        names = os.listdir(base_path)
    except OSError as error:
        raise ConfigError(f"model base path {base_path} cannot be listed: {error}") from error
    return sorted({version for version, name in _version_names(names).items()
                   if os.path.isfile(os.path.join(base_path, name, "saved_model.pb"))})


def _version_names(names) -> dict[int, str]:
    """version -> directory name. A name may have leading zeros (``0001`` is version 1, as TF
    Serving reads it); where two names give one version, the plain one (``1``) wins."""
    found: dict[int, str] = {}
    for name in sorted(names, key=lambda n: (len(n), n)):   # "1" before "01" before "001"
        if _VERSION_DIR.match(name) and int(name) <= _MAX_VERSION:
            found.setdefault(int(name), name)
    return found


def version_path(base_path: str, version: int) -> str:
    """The directory of ``version`` under ``base_path`` (``base/1``, or ``base/0001``)."""
    try:
        names = os.listdir(base_path)
    except OSError:
        names = []
    return os.path.join(base_path, _version_names(names).get(version, str(version)))


def versions_to_load(entry: ModelEntry, serving=()) -> list[int]:
    """Applies the version policy (TF Serving's default: the newest version only).

    ``serving``: the versions loaded now. One a version label names stays loaded beside the
    policy's versions (while its directory is there), so a new version takes the unlabelled
    requests while the label keeps answering; TF Serving unloads it and the label's requests
    fail. At startup and on a new config a label must name a version the policy loads."""
    versions = available_versions(entry.base_path)
    if not versions:
        raise ConfigError(
            f"model {entry.name}: no version directory with a saved_model.pb under "
            f"{entry.base_path} (expected {entry.base_path}/1/saved_model.pb)")
    if entry.policy.kind == "all":
        chosen = versions
    elif entry.policy.kind == "specific":
        # As TF Serving: the listed versions that are there load, the others when they appear
        chosen = sorted(set(entry.policy.versions) & set(versions))
        if not chosen:
            raise ConfigError(f"model {entry.name}: none of the versions "
                              f"{sorted(entry.policy.versions)} of the specific version policy "
                              f"is under {entry.base_path} (found {versions})")
    else:
        chosen = versions[-entry.policy.num_versions:]
    pinned = {v for v in entry.version_labels.values() if v in serving and v in versions}
    chosen = sorted(set(chosen) | pinned)
    for label, version in entry.version_labels.items():
        if version not in chosen:
            raise ConfigError(f"model {entry.name}: version label {label!r} points at version "
                              f"{version}, which is not loaded (loaded: {chosen})")
    return chosen


def read_netfuse_metadata(version_dir: str) -> dict | None:
    """The merged model's ``assets/netfuse.json`` (format 1), or None for an ordinary model."""
    path = os.path.join(version_dir, NETFUSE_METADATA)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: unreadable NetFuse metadata: {error}") from error
    if metadata.get("format") != 1 or not isinstance(metadata.get("members"), list):
        raise ConfigError(f"{path}: expected NetFuse metadata format 1 with a members list")
    for i, member in enumerate(metadata["members"]):
        if not isinstance(member, dict) or "name" not in member:
            raise ConfigError(f"{path}: member #{i} has no name")
        member.setdefault("index", i)
    return metadata


__all__ = ["BatchingParameters", "ConfigError", "ModelEntry", "ServingError", "VersionPolicy",
           "available_versions", "entries_from_config", "parse_batching_parameters",
           "parse_model_server_config",
           "read_netfuse_metadata", "version_path", "versions_to_load"]
