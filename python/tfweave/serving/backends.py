"""Where a SavedModel's signature actually runs.

- ``EmbeddedBackend`` (default): the model is loaded in this process with the session-based
  SavedModel loader TF Serving itself uses (``tf.compat.v1.saved_model.loader``); each
  (signature, inputs, outputs) combination becomes one ``Session.make_callable``, which
  releases the GIL while TensorFlow runs, so batch threads overlap with request decoding.
- ``GrpcBackend`` (``--backend grpc://HOST:PORT``): nothing is loaded here but the signature
  metadata (read from ``saved_model.pb``); every run, including each merged batch, is one
  ``PredictionService.Predict`` to a TF Serving (or tfweave) server hosting the same model.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from tfweave.serving.status import ServingError, internal

LOG = logging.getLogger(__name__)

# Canonical codes by number (tensorflow/core/protobuf/error_codes.proto).
_CODE_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
               "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
               "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
               "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"]


def read_signature_defs(version_dir: str) -> dict:
    """The ``serve`` MetaGraph's SignatureDefs, straight from ``saved_model.pb``."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(version_dir, "saved_model.pb")
    saved_model = saved_model_pb2.SavedModel()
    try:
        with open(path, "rb") as f:
            saved_model.ParseFromString(f.read())
    except Exception as error:
        raise ValueError(f"{path}: not a readable SavedModel: {error}") from error
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"{path}: no MetaGraph tagged 'serve' (the tag TF Serving loads)")


def load_op_libraries(version_dir: str) -> None:
    """Loads the tfweave op libraries a merged model names (``op_libraries`` in its
    netfuse.json, e.g. ``grouped_matmul`` for ragged mode): the session loader can only build
    a graph whose ops are registered in this process."""
    from tfweave.serving.model_config import read_netfuse_metadata

    metadata = read_netfuse_metadata(version_dir) or {}
    families = list(metadata.get("op_libraries") or [])
    if metadata.get("mode") == "ragged" and "grouped_matmul" not in families:
        families.append("grouped_matmul")
    for family in families:
        from tfweave.ops import load_library
        try:
            load_library(family)
        except ImportError as error:  # OpLibraryError is an ImportError
            raise ValueError(f"{version_dir} needs tfweave's '{family}' op library: {error}"
                             ) from error


class LoadedModel:
    """One version of a SavedModel as a backend runs it."""

    path: str
    signature_defs: dict
    # How many runs can share the machine without slowing each other: a merged queue keeps
    # at most this many merged runs in flight.
    concurrent_runs: int = 1

    def run(self, signature_name: str, feeds: dict[str, np.ndarray],
            output_keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SessionModel(LoadedModel):
    def __init__(self, path: str, session_config=None, run_in_caller_thread: bool = False):
        import tensorflow as tf

        self.path = path
        self._run_in_caller_thread = run_in_caller_thread
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=session_config)
        with self._graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self._session, ["serve"], path)
        self.signature_defs = dict(meta_graph.signature_def)
        self._callables: dict = {}
        self._lock = threading.Lock()
        self._op_error = tf.errors.OpError
        # A run that uses all cores (intra_op_parallelism 0) gains nothing from company. Runs
        # pinned to fewer threads can run side by side, one per share of the cores, less one
        # core's share left to the front end (gRPC, decoding, answers): on 2 cores and one
        # thread per run, a 32-member merged encoder under 16-32 clients served 1071-1162
        # req/s with one merged run in flight against 888-1038 with two (measured; the second
        # run only split the waiting requests into two smaller runs).
        intra = session_config.intra_op_parallelism_threads if session_config else 0
        cores = os.cpu_count() or 1
        self.concurrent_runs = max(1, (cores - 1) // intra) if intra > 0 else 1

    def _callable(self, signature_name, input_keys, output_keys):
        key = (signature_name, input_keys, output_keys)
        fn = self._callables.get(key)
        if fn is None:
            signature = self.signature_defs[signature_name]
            with self._lock:
                fn = self._callables.get(key)
                if fn is None:
                    if len(self._callables) >= 256:  # e.g. many output_filter combinations
                        self._callables.clear()
                    fn = self._make_callable([signature.inputs[k].name for k in input_keys],
                                             [signature.outputs[k].name for k in output_keys])
                    self._callables[key] = fn
        return fn

    def _make_callable(self, feed_names, fetch_names):
        # Session.make_callable with a feed list falls back to a full Session.run per call
        # (feed dict, fetch handler, graph extension: ~0.1 ms of Python under the GIL); a
        # CallableOptions handle goes straight to DirectSession::RunCallable.
        from tensorflow.core.protobuf import config_pb2

        make = getattr(self._session, "_make_callable_from_options", None)
        if make is None:  # a TensorFlow without the (private) fast path: the public one
            fn = self._session.make_callable(fetch_names, feed_names)
            return lambda *args: fn(*args)
        options = config_pb2.CallableOptions(feed=feed_names, fetch=fetch_names)
        if self._run_in_caller_thread:
            options.run_options.inter_op_thread_pool = -1   # RunOptions: the caller's thread
        handle = make(options)
        dtypes = [self._graph.get_tensor_by_name(name).dtype.as_numpy_dtype
                  for name in feed_names]

        def run(*args):
            # RunCallable takes arrays of exactly the feed's dtype (Session.run converted them).
            return handle(*[a if a.dtype == d else np.asarray(a, dtype=d)
                            for a, d in zip(args, dtypes)])
        return run

    def run(self, signature_name, feeds, output_keys):
        input_keys = tuple(sorted(feeds))
        try:
            fn = self._callable(signature_name, input_keys, tuple(output_keys))
            values = fn(*[np.asarray(feeds[k]) for k in input_keys])
        except self._op_error as error:
            raise ServingError(_CODE_NAMES[error.error_code] if 0 < error.error_code < 17
                               else "UNKNOWN", error.message) from None
        return dict(zip(output_keys, values))

    def close(self):
        self._session.close()


def default_intra_op_threads(batch_threads: int) -> int:
    """Intra-op threads per run when --tensorflow_intra_op_parallelism is 0: the cores shared
    among the batch threads, which already run one batch each. TensorFlow's own default (every
    core for every op) lets each run's tiny ops hand work between threads: on 2 cores with 2
    batch threads it cost the 32-member benchmark encoder served one model per member 292 vs
    448 req/s at 1 client and 428 vs 620 at 32 (4.07 vs 2.88 ms of server CPU per request), and
    served merged 313 vs 492 and 1029 vs 1162 (measured)."""
    return max(1, (os.cpu_count() or 1) // max(1, batch_threads))


class EmbeddedBackend:
    name = "embedded"

    def __init__(self, intra_op_threads: int = 0, inter_op_threads: int = 0):
        self._intra = intra_op_threads
        self._inter = inter_op_threads

    def load(self, path: str, remote_name: str, version: int) -> LoadedModel:
        import tensorflow as tf

        load_op_libraries(path)
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=self._intra,
                                          inter_op_parallelism_threads=self._inter)
        # Unless --tensorflow_inter_op_parallelism asks for a pool, a batch thread executes its
        # run's ops itself: the scheduler's batch threads already keep the cores busy, and
        # handing each op to the inter-op pool and back cost a merged run ~0.1 ms of CPU per
        # request (measured, 32-member encoder); plain models' runs cost the same either way.
        return SessionModel(path, config, run_in_caller_thread=self._inter == 0)

    def close(self):
        pass


class RemoteModel(LoadedModel):
    def __init__(self, backend: "GrpcBackend", path: str, remote_name: str, version: int):
        self.path = path
        self.signature_defs = read_signature_defs(path)
        self._backend = backend
        self._remote_name = remote_name
        self._version = version

    def run(self, signature_name, feeds, output_keys):
        import grpc
        from tensorflow_serving.apis import predict_pb2

        from tfweave.serving.tensor_codec import from_tensor_proto, to_tensor_proto

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self._remote_name
        request.model_spec.version.value = self._version
        request.model_spec.signature_name = signature_name
        for key, value in feeds.items():
            request.inputs[key].CopyFrom(to_tensor_proto(value))
        request.output_filter.extend(output_keys)
        try:
            response = self._backend.stub.Predict(request, timeout=self._backend.timeout_s)
        except grpc.RpcError as error:
            code = error.code().name if error.code() is not None else "UNKNOWN"
            raise ServingError(code if code != "OK" else "UNKNOWN",
                               f"backend {self._backend.target} (model {self._remote_name}): "
                               f"{error.details()}") from None
        missing = [k for k in output_keys if k not in response.outputs]
        if missing:
            raise internal(f"backend {self._backend.target} returned no {missing}")
        return {k: from_tensor_proto(response.outputs[k], f"backend output '{k}'")
                for k in output_keys}


class GrpcBackend:
    """Forwards runs to ``grpc://HOST:PORT``; the remote must host each model under the name
    this server forwards to (the merged model's own name) with the same version numbers."""

    name = "grpc"

    def __init__(self, target: str, timeout_s: float = 60.0, max_message_bytes: int = 1 << 30):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def load(self, path: str, remote_name: str, version: int) -> LoadedModel:
        return RemoteModel(self, path, remote_name, version)

    def available(self, remote_name: str, version: int) -> bool:
        """Whether the remote serves this version yet. Both servers poll the same base path
        on their own clocks; forwarding to a version the remote has not loaded would fail."""
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = remote_name
        request.model_spec.version.value = version
        try:
            response = model_service_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus(
                request, timeout=10)
        except grpc.RpcError:
            return False
        return any(v.version == version and
                   v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
                   for v in response.model_version_status)

    def close(self):
        self._channel.close()


def make_backend(spec: str, *, intra_op_threads: int = 0, inter_op_threads: int = 0):
    """``embedded`` or ``grpc://HOST:PORT`` (the ``--backend`` flag)."""
    if spec in ("", "embedded"):
        return EmbeddedBackend(intra_op_threads, inter_op_threads)
    if spec.startswith("grpc://"):
        target = spec[len("grpc://"):]
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--backend {spec}: expected grpc://HOST:PORT")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"--backend {spec}: port {port} is not between 1 and 65535")
        return GrpcBackend(target)
    raise ValueError(f"--backend {spec}: expected 'embedded' or grpc://HOST:PORT")
