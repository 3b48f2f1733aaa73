"""gRPC front end: ``tensorflow.serving.PredictionService`` and ``ModelService``.

Served with ``grpc.aio`` on its own event loop thread: a request waiting for its batch costs a
suspended coroutine rather than a blocked thread, so 64 concurrent clients need no 64 threads.
The servicers are the stock ones generated in tensorflow-serving-api, so the wire protocol is
TF Serving's own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
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


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager, metrics):
        self.manager = manager
        self.metrics = metrics

    async def Predict(self, request, context):
        observed = _Observed(self.metrics, request.model_spec.name, "predict")
        try:
            spec = request.model_spec
            version, label = _spec_version(spec)
            inputs = {k: from_tensor_proto(v, f"input '{k}'") for k, v in request.inputs.items()}
            servable, signature, future = self.manager.predict(
                spec.name, version, label, spec.signature_name, inputs, request.output_filter)
            outputs = await asyncio.wrap_future(future)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = signature.name
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(to_tensor_proto(value))
            return response
        except ServingError as error:
            observed.status = error.code
            await context.abort(grpc.StatusCode[error.code], error.message)
        except asyncio.CancelledError:
            observed.status = "CANCELLED"  # the client went away; its task was dropped
            raise
        finally:
            observed.done()

    async def GetModelMetadata(self, request, context):
        observed = _Observed(self.metrics, request.model_spec.name, "metadata")
        try:
            response = model_metadata(self.manager, request.model_spec.name,
                                      *_spec_version(request.model_spec),
                                      list(request.metadata_field))
            return response
        except ServingError as error:
            observed.status = error.code
            await context.abort(grpc.StatusCode[error.code], error.message)
        finally:
            observed.done()

    async def Classify(self, request, context):
        await self._unimplemented(context, "Classify")

    async def Regress(self, request, context):
        await self._unimplemented(context, "Regress")

    async def MultiInference(self, request, context):
        await self._unimplemented(context, "MultiInference")

    async def _unimplemented(self, context, method):
        error = unimplemented(f"{method} is not served by tfweave serve; use Predict")
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, error.message)


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
    for v in manager.status(name, version, label):
        entry = response.model_version_status.add()
        entry.version = v
        entry.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        entry.status.error_code = 0
        entry.status.error_message = ""
    return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager, metrics):
        self.manager = manager
        self.metrics = metrics

    async def GetModelStatus(self, request, context):
        try:
            return model_status(self.manager, request.model_spec.name,
                                *_spec_version(request.model_spec))
        except ServingError as error:
            await context.abort(grpc.StatusCode[error.code], error.message)

    async def HandleReloadConfigRequest(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "HandleReloadConfigRequest is not served by tfweave serve; "
                            "restart the server with the new --model_config_file")


class GrpcServer:
    """Runs the aio server on a private event loop in a daemon thread."""

    def __init__(self, manager, metrics, host: str, port: int, max_request_bytes: int):
        self._manager = manager
        self._metrics = metrics
        self._host, self._requested_port = host, port
        self._max_request_bytes = max_request_bytes
        self._loop = asyncio.new_event_loop()
        self._server = None
        self.port = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tfweave-grpc",
                                        daemon=True)

    async def _start(self):
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self._max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self._manager, self._metrics), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(self._manager, self._metrics), server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        port = server.add_insecure_port(f"{host}:{self._requested_port}")
        if port == 0:
            raise OSError(f"cannot bind gRPC port {self._host}:{self._requested_port}")
        await server.start()
        self._server = server
        return port

    def start(self) -> int:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self.port

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._server.stop(grace_s),
                                                 self._loop).result(grace_s + 5)
            except Exception:  # shutting down anyway
                LOG.debug("grpc stop failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
