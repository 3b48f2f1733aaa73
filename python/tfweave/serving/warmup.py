"""SavedModel warmup, as TF Serving does it: the requests in a version's
``assets.extra/tf_serving_warmup_requests`` (a TFRecord file of ``PredictionLog`` protos) are
run once when the version loads, before it takes traffic.

A session's first run of a signature builds and optimises that signature's graph: 0.2-0.3 s
for a small encoder and about 0.5 s for a 32-member merged one, paid by whichever request
comes first. TF Serving's rules apply: no file is fine; a file that is not TFRecord, a record
that is not a PredictionLog, more than 1000 records or a request that fails stops the load
with an error naming the file and record. Classify, Regress and MultiInference records are
skipped with a warning (this server answers Predict only); SessionRun records are an error, as
in TF Serving. ``tfweave merge`` writes such a file for the signatures a merged model is
served through (``netfuse.merged_model.write_warmup_requests``).
"""

from __future__ import annotations

import logging
import os
import time

from tfweave.serving.model_config import ConfigError

LOG = logging.getLogger(__name__)

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000     # TF Serving's WarmupConsts::kMaxNumRecords


def predict_log(inputs: dict, signature_name: str = ""):
    """A warmup record: a PredictionLog holding one PredictRequest of ``inputs`` (arrays)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = signature_name
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))


def write_warmup_requests(version_dir: str, records) -> str:
    """Writes ``records`` (PredictionLogs, or raw bytes) as ``version_dir``'s warmup file."""
    import tensorflow as tf

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record if isinstance(record, bytes) else record.SerializeToString())
    return path


def read_warmup_requests(version_dir: str) -> list | None:
    """The PredictionLogs of ``version_dir``'s warmup file, or None when it has none."""
    path = os.path.join(version_dir, WARMUP_FILE)
    if not os.path.exists(path):
        return None
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    try:
        for index, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            if index >= MAX_RECORDS:
                raise ConfigError(f"{path}: more than {MAX_RECORDS} warmup records (TF "
                                  "Serving's limit); keep a few representative requests")
            try:
                logs.append(prediction_log_pb2.PredictionLog.FromString(record))
            except DecodeError:
                raise ConfigError(f"{path}: warmup record {index} is not a PredictionLog "
                                  "proto") from None
    except tf.errors.OpError as error:   # DataLossError: not TFRecord, or truncated
        raise ConfigError(f"{path}: cannot read the warmup requests ({error.message}); it "
                          "must be a TFRecord file of PredictionLog protos") from None
    return logs


def run_warmup(model, version_dir: str, metrics=None) -> int:
    """Runs ``version_dir``'s warmup requests on ``model`` (a loaded SavedModel); returns how
    many ran. Raises ConfigError naming the record that cannot run."""
    logs = read_warmup_requests(version_dir)
    if logs is None:
        return 0
    from tfweave.serving.servables import DEFAULT_SIGNATURE, Signature
    from tfweave.serving.status import ServingError
    from tfweave.serving.tensor_codec import from_tensor_proto

    path = os.path.join(version_dir, WARMUP_FILE)
    start = time.perf_counter()
    ran = 0
    status = "OK"
    try:
        for index, log in enumerate(logs):
            kind = log.WhichOneof("log_type")
            if kind == "session_run_log":
                raise ConfigError(f"{path}: warmup record {index} is a SessionRun log, which "
                                  "TF Serving does not run either; use a PredictLog")
            if kind != "predict_log":
                LOG.warning("%s: warmup record %d (%s) skipped: tfweave serve answers Predict "
                            "only", path, index, kind)
                continue
            request = log.predict_log.request
            name = request.model_spec.signature_name or DEFAULT_SIGNATURE
            try:
                if name not in model.signature_defs:
                    raise ConfigError(f"no signature {name!r} (the model has "
                                      f"{', '.join(sorted(model.signature_defs))})")
                signature = Signature(name, model.signature_defs[name])
                inputs = {k: from_tensor_proto(v, f"input '{k}'")
                          for k, v in request.inputs.items()}
                signature.check_inputs(inputs)
                model.run(name, inputs, signature.check_output_filter(request.output_filter))
            except (ConfigError, ServingError) as error:
                message = error.message if isinstance(error, ServingError) else str(error)
                raise ConfigError(f"{path}: warmup record {index} failed: {message}") from None
            ran += 1
    except ConfigError:
        status = "FAILED"
        raise
    finally:
        seconds = time.perf_counter() - start
        if metrics is not None:
            metrics.observe_warmup(version_dir, status, seconds)
    LOG.info("warmed up %s with %d request(s) in %.2f s", version_dir, ran, seconds)
    return ran
