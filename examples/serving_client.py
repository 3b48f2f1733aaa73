"""Query `tfweave serve` (or TF Serving) as any TF Serving client does: gRPC stub and REST.

Start a server first, e.g. on a merged model whose members are model_a, model_b, ...:

    tfweave serve --model_name merged --model_base_path /models/merged --enable_batching

then: python examples/serving_client.py model_a model_b --grpc 127.0.0.1:8500 \
          --rest http://127.0.0.1:8501
"""

import argparse

import grpc
import numpy as np
import requests
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, \
    prediction_service_pb2_grpc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--grpc", default="127.0.0.1:8500")
    parser.add_argument("--rest", default="http://127.0.0.1:8501")
    args = parser.parse_args()
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(args.grpc))
    for name in args.models:
        # The signature tells the input name, dtype and shape.
        meta_request = get_model_metadata_pb2.GetModelMetadataRequest(
            metadata_field=["signature_def"])
        meta_request.model_spec.name = name
        signatures = get_model_metadata_pb2.SignatureDefMap()
        stub.GetModelMetadata(meta_request, timeout=10).metadata["signature_def"].Unpack(
            signatures)
        (input_name, info), = signatures.signature_def["serving_default"].inputs.items()
        features = [max(d.size, 1) for d in info.tensor_shape.dim[1:]]
        x = np.random.default_rng(0).standard_normal([2] + features).astype(np.float32)

        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.inputs[input_name].CopyFrom(tf.make_tensor_proto(x))
        response = stub.Predict(request, timeout=10)
        grpc_outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

        rest = requests.post(f"{args.rest}/v1/models/{name}:predict",
                             json={"inputs": {input_name: x.tolist()}}, timeout=10).json()
        rest_outputs = rest["outputs"] if isinstance(rest["outputs"], dict) else {
            next(iter(grpc_outputs)): rest["outputs"]}
        for key, value in grpc_outputs.items():
            diff = np.abs(np.asarray(rest_outputs[key]) - value).max()
            print(f"{name}: {key} shape {value.shape}, gRPC vs REST max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
