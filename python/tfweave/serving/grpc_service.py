"""gRPC front end: ``tensorflow.serving.PredictionService`` and ``ModelService``.

Served by grpcio's synchronous server: a request decodes, queues its task and blocks its
worker thread on the batch's future. Measured on the 2-core benchmark machine with a merged
model at 32 clients, this costs about 0.3 ms of CPU per request against 0.4 ms for the same
servicer under ``grpc.aio`` (an event loop woken through a self-pipe for every answer), and
the CPU it saves goes to the model runs. The servicers are the stock ones generated in
tensorflow-serving-api, so the wire protocol is TF Serving's own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time

import grpc
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from tfweave.serving.status import ServingError, invalid_argument, unimplemented
from tfweave.serving.tensor_codec import from_tensor_proto, to_tensor_proto

LOG = logging.getLogger(__name__)


def _spec_version(spec) -> tuple[int | None, str | None]:
    version = spec.version.value if spec.HasField("version") else None
    return version, (spec.version_label or None)


class _Observed:
    """Times one call and records it in the metrics with its final status."""

    def __init__(self, metrics, model: str, api: str):
        self.metrics, self.model, self.api = metrics, model, api
        self.start = time.perf_counter()
        self.status = "OK"

    def done(self):
        self.metrics.observe_request(self.model, self.api, "GRPC", self.status,
                                     time.perf_counter() - self.start)


@contextlib.contextmanager
def _answering(context, observed: _Observed):
    """Ends a call that raised with the same status in the answer and in the metrics: a
    ServingError's own code, INTERNAL (with the error) for a fault of ours."""
    try:
        yield
    except ServingError as error:
        observed.status = error.code
        context.abort(grpc.StatusCode[error.code], error.message)
    except Exception as error:
        if context.code() is not None:
            # context.abort() unwinds with a bare Exception: an answer chosen on purpose
            observed.status = context.code().name
            raise
        LOG.exception("gRPC %s for model %r failed", observed.api, observed.model)
        observed.status = "INTERNAL"
        context.abort(grpc.StatusCode.INTERNAL,
                      f"internal error: {type(error).__name__}: {error}")
    finally:
        observed.done()


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager, metrics):
        self.manager = manager
        self.metrics = metrics

    def Predict(self, request, context):
        observed = _Observed(self.metrics, request.model_spec.name, "predict")
        with _answering(context, observed):
            spec = request.model_spec
            version, label = _spec_version(spec)
            inputs = {k: from_tensor_proto(v, f"input '{k}'") for k, v in request.inputs.items()}
            servable, signature, future = self.manager.predict(
                spec.name, version, label, spec.signature_name, inputs, request.output_filter)
            # The callback runs when the call ends: after a disconnect that is while the task
            # still waits, which drops it before it costs compute; after an answer, a no-op.
            if not context.add_callback(future.cancel):
                future.cancel()   # the call had already ended
            try:
                outputs = future.result()
            except concurrent.futures.CancelledError:
                # the client went away; its task was dropped
                raise ServingError("CANCELLED", "the client cancelled the call") from None
            response = predict_pb2.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = signature.name
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(to_tensor_proto(value))
            return response

    def GetModelMetadata(self, request, context):
        observed = _Observed(self.metrics, request.model_spec.name, "metadata")
        with _answering(context, observed):
            return model_metadata(self.manager, request.model_spec.name,
                                  *_spec_version(request.model_spec),
                                  list(request.metadata_field))

    def Classify(self, request, context):
        self._unimplemented(context, "Classify")

    def Regress(self, request, context):
        self._unimplemented(context, "Regress")

    def MultiInference(self, request, context):
        self._unimplemented(context, "MultiInference")

    def _unimplemented(self, context, method):
        error = unimplemented(f"{method} is not served by tfweave serve; use Predict")
        context.abort(grpc.StatusCode.UNIMPLEMENTED, error.message)


def model_metadata(manager, name, version, label, fields):
    if not fields:
        raise invalid_argument("GetModelMetadataRequest must specify at least one "
                               "metadata_field")
    for field in fields:
        if field != "signature_def":
            raise invalid_argument(f"Metadata field {field} is not supported")
    servable = manager.resolve(name, version, label)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for key, proto in servable.signature_defs.items():
        signatures.signature_def[key].CopyFrom(proto)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = servable.version
    response.metadata["signature_def"].Pack(signatures)
    return response


def model_status(manager, name, version, label):
    response = get_model_status_pb2.GetModelStatusResponse()
    for v, error in manager.status(name, version, label):
        entry = response.model_version_status.add()
        entry.version = v
        if error is None:
            entry.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            entry.status.error_code = 0
            entry.status.error_message = ""
        else:   # its load failed (and may be retried): TF Serving's END with the error
            entry.state = get_model_status_pb2.ModelVersionStatus.END
            entry.status.error_code = error_codes_pb2.UNKNOWN
            entry.status.error_message = error
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager, metrics):
        self.manager = manager
        self.metrics = metrics

    def GetModelStatus(self, request, context):
        try:
            return model_status(self.manager, request.model_spec.name,
                                *_spec_version(request.model_spec))
        except ServingError as error:
            context.abort(grpc.StatusCode[error.code], error.message)

    def HandleReloadConfigRequest(self, request, context):
        """TF Serving's dynamic config: serve ``request.config`` from now on. The models it
        adds or changes load before anything switches; on an error nothing changes."""
        from tensorflow_serving.apis import model_management_pb2

        from tfweave.serving.model_config import ConfigError, entries_from_config

        try:
            self.manager.reload_config(entries_from_config(request.config,
                                                           "HandleReloadConfigRequest"))
        except ConfigError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return model_management_pb2.ReloadConfigResponse()


class GrpcServer:
    """grpcio's server with a pool of worker threads; a call blocks one while it waits."""

    # Calls beyond this many at once wait in gRPC for a free worker (none is refused).
    MAX_WORKERS = 256

    def __init__(self, manager, metrics, host: str, port: int, max_request_bytes: int):
        self._manager = manager
        self._metrics = metrics
        self._host, self._requested_port = host, port
        self._max_request_bytes = max_request_bytes
        self._server = None
        self._stopped = None   # the event grpc.Server.stop() returned
        self._pool = None
        self.port = None

    def start(self) -> int:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.MAX_WORKERS,
                                                           thread_name_prefix="tfweave-grpc")
        server = grpc.server(self._pool, options=[
            ("grpc.max_receive_message_length", self._max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self._manager, self._metrics), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(self._manager, self._metrics), server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        try:
            port = server.add_insecure_port(f"{host}:{self._requested_port}")
        except RuntimeError as error:   # newer grpcio raises where older ones return 0
            raise OSError(f"cannot bind gRPC port {self._host}:{self._requested_port}: "
                          f"{error}") from None
        if port == 0:
            raise OSError(f"cannot bind gRPC port {self._host}:{self._requested_port}")
        server.start()
        self._server = server
        self.port = port
        return port

    def stopping(self, grace_s: float) -> None:
        """Starts stop(): new calls are refused from now on; returns at once."""
        if self._server is not None and self._stopped is None:
            self._stopped = self._server.stop(grace_s)

    def stop(self, grace_s: float = 1.0) -> None:
        """Refuses new calls at once and gives the calls in progress up to ``grace_s``."""
        self.stopping(grace_s)
        if self._server is not None:
            self._stopped.wait(grace_s + 5)
            self._server, self._stopped = None, None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
