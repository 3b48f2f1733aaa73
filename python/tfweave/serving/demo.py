"""Demo: serve a merged model on loopback, query its members as TF Serving clients would.

Writes a few small member models (random weights) and their merged model (``netfuse.merge``
when it works, else the CONTRACT form written directly), starts ``ModelServer`` on free
loopback ports, and checks over gRPC (tensorflow-serving-api's stub) and REST that every
member answers exactly as the member model does on its own; then a short closed-loop
throughput comparison: cross-model batching vs one request per run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time

import numpy as np

LOG = logging.getLogger("tfweave.serving.demo")
IN_DIM, WIDTH, OUT_DIM = 16, 32, 4


def _weights(seed):
    rng = np.random.default_rng(seed)
    return [((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
             np.zeros(b, np.float32)) for a, b in ((IN_DIM, WIDTH), (WIDTH, OUT_DIM))]


def _save_member(path, weights):
    import tensorflow as tf

    class Member(tf.Module):
        def __init__(self):
            super().__init__()
            self.v = [tf.Variable(a) for pair in weights for a in pair]

        @tf.function(input_signature=[tf.TensorSpec([None, IN_DIM], tf.float32, name="x")])
        def serve(self, x):
            h = tf.nn.relu(tf.matmul(x, self.v[0]) + self.v[1])
            return {"probs": tf.nn.softmax(tf.matmul(h, self.v[2]) + self.v[3])}

    module = Member()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return module


def _save_merged_by_contract(path, all_weights, names, sources):
    import tensorflow as tf

    n = len(all_weights)

    class Merged(tf.Module):
        def __init__(self):
            super().__init__()
            self.v = [tf.Variable(np.stack([w[l][k] for w in all_weights]))
                      for l in range(2) for k in range(2)]

        @tf.function(input_signature=[tf.TensorSpec([None, IN_DIM], tf.float32, name=f"m{i}_x")
                                      for i in range(n)])
        def serve(self, *xs):
            out = {}
            for i, x in enumerate(xs):
                h = tf.nn.relu(tf.matmul(x, self.v[0][i]) + self.v[1][i])
                out[f"m{i}_probs"] = tf.nn.softmax(tf.matmul(h, self.v[2][i]) + self.v[3][i])
            return out

    module = Merged()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    with open(os.path.join(path, "assets", "netfuse.json"), "w") as f:
        json.dump({"format": 1, "members": [{"name": nm, "source": s, "index": i} for i, (nm, s)
                                            in enumerate(zip(names, sources))]}, f)


def _closed_loop(stub, requests_by_client, per_client):
    errors = []

    def client(request):
        try:
            for _ in range(per_client):
                stub.Predict(request, timeout=30)
        except Exception as error:  # counted; the demo reports it
            errors.append(error)

    threads = [threading.Thread(target=client, args=(r,)) for r in requests_by_client]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.perf_counter() - start
    return len(requests_by_client) * per_client / elapsed, errors


def run(quick: bool):
    import grpc
    import requests
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tfweave.demo import DemoResult
    from tfweave.serving.model_config import BatchingParameters
    from tfweave.serving.server import ModelServer, ServerOptions, entries_for_base_path

    n = 4 if quick else 8
    work = tempfile.mkdtemp(prefix="tfweave-serve-demo-")
    results = []
    try:
        names = [f"model_{chr(97 + i)}" for i in range(n)]
        weights = [_weights(i) for i in range(n)]
        sources = []
        for name, w in zip(names, weights):
            sources.append(os.path.join(work, name, "1"))
            _save_member(sources[-1], w)
        merged = os.path.join(work, "merged")
        how = "netfuse.merge"
        try:
            from tfweave import netfuse
            netfuse.merge(sources, os.path.join(merged, "1"), names=names)
        except Exception as error:  # the demo shows serving; the merge has its own demo
            LOG.info("netfuse.merge unavailable (%s); writing the merged model by contract",
                     error)
            shutil.rmtree(merged, ignore_errors=True)
            _save_merged_by_contract(os.path.join(merged, "1"), weights, names, sources)
            how = "merged by contract"
        LOG.info("merged %d members (%s); starting tfweave serve on loopback", n, how)
        batching = BatchingParameters(max_batch_size=32, batch_timeout_micros=0,
                                      num_batch_threads=2, max_enqueued_batches=100)
        server = ModelServer(ServerOptions(entries=entries_for_base_path("merged", merged),
                                           port=0, rest_api_port=0,
                                           batching=batching)).start()
        # REST on a free port too (rest_api_port 0 means "off" in TF Serving's flags).
        from tfweave.serving.rest_api import HttpServer
        rest = HttpServer(server.manager, server.metrics, "127.0.0.1", 0,
                          max_request_bytes=1 << 24, timeout_s=30, max_connections=64)
        rest.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            rng = np.random.default_rng(0)
            worst = 0.0
            for name, source in zip(names, sources):
                x = rng.standard_normal((3, IN_DIM)).astype(np.float32)
                expected = tf.saved_model.load(source).signatures["serving_default"](
                    x=tf.constant(x))["probs"].numpy()
                request = predict_pb2.PredictRequest()
                request.model_spec.name = name
                request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
                got = tf.make_ndarray(stub.Predict(request, timeout=30).outputs["probs"])
                answer = requests.post(f"http://127.0.0.1:{rest.port}/v1/models/{name}:predict",
                                       json={"instances": x.tolist()}, timeout=30).json()
                worst = max(worst, float(np.abs(got - expected).max()),
                            float(np.abs(np.asarray(answer["predictions"]) - expected).max()))
            LOG.info("gRPC and REST answers of %d members vs the member models: max |diff| "
                     "%.2g", n, worst)
            results.append(DemoResult(f"{n} members via gRPC stub + REST vs own models",
                                      f"max |diff| {worst:.1e}", how))

            requests_by_client = []
            for i in range(2 * n):
                request = predict_pb2.PredictRequest()
                request.model_spec.name = names[i % n]
                request.inputs["x"].CopyFrom(tf.make_tensor_proto(
                    np.ones((1, IN_DIM), np.float32)))
                requests_by_client.append(request)
            per_client = 20 if quick else 60
            _closed_loop(stub, requests_by_client, 5)
            batched_rps, errors = _closed_loop(stub, requests_by_client, per_client)
            summary = server.metrics.batch_summary().get("merged", {})
            LOG.info("cross-model batching: %.0f req/s, %.1f requests per merged run",
                     batched_rps, summary.get("mean_requests", float("nan")))
            results.append(DemoResult(
                f"{2 * n} clients over {n} members, closed loop",
                f"{batched_rps:.0f} req/s, {summary.get('mean_requests', 0):.1f} req/run",
                f"{len(errors)} errors; see `python -m benchmarks serving` for the comparison "
                "with per-model batching"))
        finally:
            channel.close()
            rest.stop()
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
