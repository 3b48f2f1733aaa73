"""Changes while serving. New versions (TF Serving's ``--file_system_poll_wait_seconds``): a
version directory that appears under a base path is loaded and served, the one it replaces is
drained and unloaded, and no request in flight across the swap is lost or answered by the
wrong weights. New configs (``HandleReloadConfigRequest``, ``--model_config_file_poll_wait_
seconds``): models are added and removed, and a config that cannot load changes nothing.
Clients are tensorflow-serving-api's stubs and ``requests``; expected answers are computed
with NumPy from each version's own weights."""

from __future__ import annotations

import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc)

from tests.serving.model_fixtures import (IN_DIM, member_weights, write_handmade_merged,
                                          write_member, write_text)
from tests.serving.test_protocols import predict_request

RNG = np.random.default_rng(7)
SWAP_TIMEOUT_S = 90


def numpy_logits(weights, x):
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(weights):
        h = h @ w + b
        if i < len(weights) - 1:
            h = np.maximum(h, 0.0)
    return h


def publish(write, base: str, version: int) -> str:
    """Writes a version beside the base path, then renames it in: the server never sees a
    half-written version (how versions should be published to TF Serving too)."""
    staging = os.path.join(os.path.dirname(base), f".staging-{os.path.basename(base)}-{version}")
    write(staging)
    os.rename(staging, os.path.join(base, str(version)))
    return os.path.join(base, str(version))


def model_status(model_stub, name: str):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    return model_stub.GetModelStatus(request, timeout=30).model_version_status


def status_versions(model_stub, name: str) -> list[int]:
    """The versions GetModelStatus reports AVAILABLE, newest first."""
    return [v.version for v in model_status(model_stub, name)
            if v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE]


def wait_until(condition, failure) -> None:
    """Polls ``condition()`` until it holds; fails with ``failure()`` after SWAP_TIMEOUT_S."""
    deadline = time.monotonic() + SWAP_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, failure()
        time.sleep(0.2)


def wait_for_versions(model_stub, name: str, want: list[int]) -> None:
    wait_until(lambda: status_versions(model_stub, name) == want,
               lambda: f"{name} never came to serve versions {want}")


class Load:
    """Closed-loop gRPC clients that record every answer (version, input, logits) or error."""

    def __init__(self, target: str, names: list[str], clients: int = 4):
        self.channel = grpc.insecure_channel(target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.answers: list[tuple[str, int, np.ndarray, np.ndarray]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(names, i), daemon=True)
                         for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, names, seed):
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            name = names[rng.integers(len(names))]
            x = rng.standard_normal((int(rng.integers(1, 4)), IN_DIM)).astype(np.float32)
            try:
                response = self.stub.Predict(predict_request(name, x), timeout=30)
            except grpc.RpcError as error:
                self.errors.append(f"{name}: {error.code()} {error.details()}")
                continue
            self.answers.append((name, response.model_spec.version.value, x,
                                 tf.make_ndarray(response.outputs["logits"])))

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self.channel.close()


def slow_batching(tmp_path) -> list[str]:
    """Batches that wait 30 ms to fill: at any moment of the swap, requests sit queued on the
    old version, which must answer them before it is closed."""
    config = write_text(tmp_path / "batching.config", """
max_batch_size { value: 64 }
batch_timeout_micros { value: 30000 }
num_batch_threads { value: 2 }
max_enqueued_batches { value: 100 }
""")
    return ["--enable_batching", "--batching_parameters_file", config]


def check_answers(answers, weights_of):
    for name, version, x, logits in answers:
        np.testing.assert_allclose(logits, numpy_logits(weights_of(name, version), x),
                                   rtol=1e-4, atol=1e-5,
                                   err_msg=f"{name} answered as version {version}")


def test_a_new_version_is_served_under_load_and_the_old_one_unloaded(start_server, tmp_path):
    base = str(tmp_path / "model")
    os.makedirs(base)
    weights = {1: member_weights(11), 2: member_weights(12)}
    publish(lambda p: write_member(p, weights[1]), base, 1)
    server = start_server(["--model_name", "m", "--model_base_path", base,
                           "--file_system_poll_wait_seconds", "1"] + slow_batching(tmp_path))
    channel = grpc.insecure_channel(server.grpc)
    model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    assert status_versions(model_stub, "m") == [1]
    load = Load(server.grpc, ["m"], clients=8)
    try:
        time.sleep(1.0)
        publish(lambda p: write_member(p, weights[2]), base, 2)
        wait_for_versions(model_stub, "m", [2])
        settled = len(load.answers)
        time.sleep(1.5)
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    seen = {version for _, version, _, _ in load.answers}
    assert seen == {1, 2}, seen
    assert all(version == 2 for _, version, _, _ in load.answers[settled + 8:])
    check_answers(load.answers, lambda name, version: weights[version])

    # the old version is gone for a request naming it, as in TF Serving
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    x = RNG.standard_normal((1, IN_DIM)).astype(np.float32)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request("m", x, version=1), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    status = requests.get(f"{server.rest}/v1/models/m", timeout=30).json()
    assert [v["version"] for v in status["model_version_status"]] == ["2"]
    assert "version 2 loaded" in server.log() and "unloaded" in server.log()

    # a version that cannot load is retried later; the serving one keeps serving
    publish(lambda p: (os.makedirs(p), open(os.path.join(p, "saved_model.pb"), "wb").write(
        b"not a SavedModel")), base, 3)
    wait_until(lambda: "loading version 3 failed" in server.log(),
               lambda: server.log()[-3000:])
    assert status_versions(model_stub, "m") == [2]
    # GetModelStatus shows why version 3 is not serving: TF Serving's END state, with the error
    failed = [v for v in model_status(model_stub, "m") if v.version == 3]
    assert len(failed) == 1 and failed[0].state == get_model_status_pb2.ModelVersionStatus.END
    assert failed[0].status.error_code != 0 and "saved_model.pb" in failed[0].status.error_message
    status = requests.get(f"{server.rest}/v1/models/m/versions/3", timeout=30).json()
    assert status["model_version_status"][0]["state"] == "END", status
    response = stub.Predict(predict_request("m", x), timeout=30)
    assert response.model_spec.version.value == 2
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                               numpy_logits(weights[2], x), rtol=1e-4, atol=1e-5)
    channel.close()
    assert server.alive()


def merged_swap_under_load(server, base, names, weights, also, clients):
    """Publishes version 2 of a merged model while ``clients`` call its members; waits until
    the members (and the model names in ``also``) serve it, runs 1.5 s more, and checks that
    nothing failed, both versions answered, and every answer equals its version's weights.
    Returns the load and how many answers had arrived when the swap was seen."""
    channel = grpc.insecure_channel(server.grpc)
    model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    load = Load(server.grpc, names, clients=clients)
    try:
        time.sleep(1.0)
        publish(lambda p: write_handmade_merged(p, weights[2], names, names), base, 2)
        for name in names + also:
            wait_for_versions(model_stub, name, [2])
        settled = len(load.answers)
        time.sleep(1.5)
    finally:
        load.stop()
        channel.close()
    assert not load.errors, load.errors[:5]
    assert {version for _, version, _, _ in load.answers} == {1, 2}
    check_answers(load.answers, lambda name, version: weights[version][names.index(name)])
    return load, settled


def test_merged_members_move_to_the_new_merged_version_together(start_server, tmp_path):
    base = str(tmp_path / "merged")
    os.makedirs(base)
    names = ["member0", "member1", "member2"]
    weights = {v: [member_weights(100 * v + i) for i in range(3)] for v in (1, 2)}
    for version in (1,):
        publish(lambda p, v=version: write_handmade_merged(p, weights[v], names, names),
                base, version)
    server = start_server(["--model_name", "merged", "--model_base_path", base,
                           "--file_system_poll_wait_seconds", "1"] + slow_batching(tmp_path))
    load, settled = merged_swap_under_load(server, base, names, weights, ["merged"], clients=6)
    assert all(version == 2 for _, version, _, _ in load.answers[settled + 12:])


def test_with_polling_off_a_new_version_waits_for_a_restart(start_server, tmp_path):
    base = str(tmp_path / "model")
    os.makedirs(base)
    publish(lambda p: write_member(p, member_weights(21)), base, 1)
    server = start_server(["--model_name", "m", "--model_base_path", base,
                           "--file_system_poll_wait_seconds", "0"])
    publish(lambda p: write_member(p, member_weights(22)), base, 2)
    time.sleep(3.0)   # three poll intervals of the default
    status = requests.get(f"{server.rest}/v1/models/m", timeout=30).json()
    assert [v["version"] for v in status["model_version_status"]] == ["1"]
    shutil.rmtree(os.path.join(base, "2"))



def test_a_new_version_is_served_while_a_label_keeps_its_version(start_server, tmp_path):
    # A label naming the version being served used to stop polling from ever loading a new
    # one: every request kept getting the old model. Now the new version takes the
    # unlabelled requests and the labelled version stays loaded for the label.
    base = str(tmp_path / "model")
    os.makedirs(base)
    old, new = member_weights(61), member_weights(62)
    publish(lambda p: write_member(p, old), base, 1)
    config = write_text(tmp_path / "models.config", f"""
model_config_list {{
  config {{ name: "m" base_path: "{base}" version_labels {{ key: "stable" value: 1 }} }}
}}""")
    server = start_server(["--model_config_file", config])
    channel = grpc.insecure_channel(server.grpc)
    model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    publish(lambda p: write_member(p, new), base, 2)
    wait_for_versions(model_stub, "m", [2, 1])
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    for kwargs, weights, version in (({}, new, 2), ({"label": "stable"}, old, 1),
                                     ({"version": 1}, old, 1)):
        response = stub.Predict(predict_request("m", x, **kwargs), timeout=30)
        assert response.model_spec.version.value == version, kwargs
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                                   numpy_logits(weights, x), rtol=1e-4, atol=1e-5,
                                   err_msg=str(kwargs))
    channel.close()
    assert server.alive()

def test_a_request_that_resolved_a_retiring_version_resolves_again():
    """The window between resolving a version and queueing on it: if the version retires in
    between, the request goes to the version that replaced it (never an error)."""
    from concurrent.futures import Future

    from tensorflow.core.protobuf import meta_graph_pb2

    from tfweave.serving.batching import Retired
    from tfweave.serving.model_manager import ModelManager, ServedModel
    from tfweave.serving.servables import Servable, Signature

    proto = meta_graph_pb2.SignatureDef()
    proto.inputs["x"].dtype = tf.float32.as_datatype_enum
    proto.inputs["x"].tensor_shape.unknown_rank = True
    proto.outputs["y"].dtype = tf.float32.as_datatype_enum
    served = ServedModel("m", "plain")

    class Version(Servable):
        def __init__(self, version, retiring):
            self.name, self.version, self.retiring = "m", version, retiring
            self.signatures = {"serving_default": Signature("serving_default", proto)}

        def submit(self, signature, inputs, output_keys):
            if self.retiring:   # the poller swapped the versions after this one resolved
                served.versions = {2: Version(2, False)}
                raise Retired("m")
            future = Future()
            future.set_result({"y": inputs["x"] * self.version})
            return future

    class Backend:
        name = "fake"

        def close(self):
            pass

    class Metrics:
        def observe_batch(self, *args):
            pass

    manager = ModelManager([], Backend(), None, Metrics())
    try:
        served.versions = {1: Version(1, True)}
        manager.models["m"] = served
        servable, _, future = manager.predict("m", None, None, "", {"x": np.ones((1, 2),
                                                                                  np.float32)})
        assert servable.version == 2 and future.result(1)["y"].tolist() == [[2.0, 2.0]]
    finally:
        manager.close()


def _model_config(*models):
    """A ModelServerConfig of (name, base_path, platform) triples."""
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path, platform in models:
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = name, base_path, platform
    return config


def test_reload_config_adds_and_removes_models_while_serving(start_server, tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.apis import model_management_pb2

    weights = {"a": member_weights(31), "b": member_weights(32)}
    for name in weights:
        os.makedirs(tmp_path / name)
        publish(lambda p, n=name: write_member(p, weights[n]), str(tmp_path / name), 1)
    names = ["fused0", "fused1"]
    fused_weights = [member_weights(40), member_weights(41)]
    os.makedirs(tmp_path / "fused")
    publish(lambda p: write_handmade_merged(p, fused_weights, names, names),
            str(tmp_path / "fused"), 1)
    config = _model_config(("a", str(tmp_path / "a"), "tensorflow"))
    path = tmp_path / "models.config"
    path.write_text(text_format.MessageToString(config))
    server = start_server(["--model_config_file", str(path)] + slow_batching(tmp_path))
    channel = grpc.insecure_channel(server.grpc)
    model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    load = Load(server.grpc, ["a"], clients=4)
    try:
        time.sleep(1.0)
        request = model_management_pb2.ReloadConfigRequest()
        request.config.CopyFrom(_model_config(
            ("b", str(tmp_path / "b"), "tensorflow"),
            ("fused0", str(tmp_path / "fused"), "netfuse"),
            ("fused1", str(tmp_path / "fused"), "netfuse")))
        response = model_stub.HandleReloadConfigRequest(request, timeout=120)
        assert response.status.error_code == 0
        time.sleep(0.5)
    finally:
        load.stop()
    # "a" answered correctly until it was removed, then NOT_FOUND; nothing else went wrong
    assert load.answers and all(e.startswith("a: StatusCode.NOT_FOUND") for e in load.errors)
    check_answers(load.answers, lambda name, version: weights["a"])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    for name, w in [("b", weights["b"]), ("fused0", fused_weights[0]),
                    ("fused1", fused_weights[1])]:
        response = stub.Predict(predict_request(name, x), timeout=30)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                                   numpy_logits(w, x), rtol=1e-4, atol=1e-5, err_msg=name)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request("a", x), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    # a config that cannot load changes nothing
    request = model_management_pb2.ReloadConfigRequest()
    request.config.CopyFrom(_model_config(("b", str(tmp_path / "b"), "tensorflow"),
                                          ("c", str(tmp_path / "missing"), "tensorflow")))
    with pytest.raises(grpc.RpcError) as error:
        model_stub.HandleReloadConfigRequest(request, timeout=120)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing" in error.value.details()
    assert status_versions(model_stub, "fused1") == [1]
    response = stub.Predict(predict_request("fused1", x), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                               numpy_logits(fused_weights[1], x), rtol=1e-4, atol=1e-5)
    channel.close()
    assert server.alive()


def test_a_changed_model_config_file_is_applied_when_polled(start_server, tmp_path):
    from google.protobuf import text_format

    weights = {"a": member_weights(51), "b": member_weights(52)}
    for name in weights:
        os.makedirs(tmp_path / name)
        publish(lambda p, n=name: write_member(p, weights[n]), str(tmp_path / name), 1)
    path = tmp_path / "models.config"
    path.write_text(text_format.MessageToString(
        _model_config(("a", str(tmp_path / "a"), "tensorflow"))))
    server = start_server(["--model_config_file", str(path),
                           "--model_config_file_poll_wait_seconds", "1"])
    # a broken file is logged and ignored; then a good one replaces "a" by "b"
    path.write_text("model_config_list { config { name: ")
    wait_until(lambda: "was not applied" in server.log(), lambda: server.log()[-3000:])
    assert requests.get(f"{server.rest}/v1/models/a", timeout=30).status_code == 200
    path.write_text(text_format.MessageToString(
        _model_config(("b", str(tmp_path / "b"), "tensorflow"))))
    wait_until(lambda: requests.get(f"{server.rest}/v1/models/b", timeout=30).status_code == 200,
               lambda: server.log()[-3000:])
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    answer = requests.post(f"{server.rest}/v1/models/b:predict",
                           json={"instances": x.tolist()}, timeout=30).json()
    np.testing.assert_allclose([p["logits"] for p in answer["predictions"]],
                               numpy_logits(weights["b"], x), rtol=1e-4, atol=1e-5)
    assert requests.get(f"{server.rest}/v1/models/a", timeout=30).status_code == 404


def test_a_grpc_front_switches_only_once_its_backend_serves_the_new_version(start_server,
                                                                              tmp_path):
    """Front and backend poll the same base path on their own clocks (here the backend every
    4 s, the front every second): the front keeps forwarding to the old version until the
    backend reports the new one AVAILABLE. The backend keeps two versions loaded (as a TF
    Serving behind a front should during rollouts), so the old one still answers until the
    front has switched."""
    base = str(tmp_path / "merged")
    os.makedirs(base)
    names = ["member0", "member1"]
    weights = {v: [member_weights(200 * v + i) for i in range(2)] for v in (1, 2)}
    publish(lambda p: write_handmade_merged(p, weights[1], names, names), base, 1)
    config = write_text(tmp_path / "backend.config", f"""model_config_list {{
  config {{ name: "merged" base_path: "{base}"
           model_version_policy {{ latest {{ num_versions: 2 }} }} }}
}}""")
    backend = start_server(["--model_config_file", config,
                            "--file_system_poll_wait_seconds", "4"])
    front = start_server(["--model_name", "merged", "--model_base_path", base,
                          "--enable_batching", "--backend", f"grpc://{backend.grpc}",
                          "--file_system_poll_wait_seconds", "1"])
    merged_swap_under_load(front, base, names, weights, [], clients=4)


def test_a_config_naming_a_model_not_there_yet_applies_once_its_directory_appears(
        start_server, tmp_path):
    """TF Serving re-applies its config file at every poll: a model whose base path appears
    after the file named it is served from the next poll, without another edit. Its version
    directory is zero-padded (``0001``), which TF Serving reads as version 1."""
    from google.protobuf import text_format

    weights = {"a": member_weights(61), "b": member_weights(62)}
    os.makedirs(tmp_path / "a")
    publish(lambda p: write_member(p, weights["a"]), str(tmp_path / "a"), 1)
    path = tmp_path / "models.config"
    path.write_text(text_format.MessageToString(
        _model_config(("a", str(tmp_path / "a"), "tensorflow"))))
    server = start_server(["--model_config_file", str(path),
                           "--model_config_file_poll_wait_seconds", "1"])
    path.write_text(text_format.MessageToString(_model_config(
        ("a", str(tmp_path / "a"), "tensorflow"), ("b", str(tmp_path / "b"), "tensorflow"))))
    wait_until(lambda: "was not applied" in server.log(), lambda: server.log()[-3000:])
    assert requests.get(f"{server.rest}/v1/models/b", timeout=30).status_code == 404

    staging = tmp_path / ".staging-b"
    write_member(str(staging / "0001"), weights["b"])
    os.rename(staging, tmp_path / "b")
    wait_until(lambda: requests.get(f"{server.rest}/v1/models/b", timeout=30).status_code == 200,
               lambda: server.log()[-3000:])
    status = requests.get(f"{server.rest}/v1/models/b", timeout=30).json()
    assert [v["version"] for v in status["model_version_status"]] == ["1"]
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    for name in ("a", "b"):
        answer = requests.post(f"{server.rest}/v1/models/{name}:predict",
                               json={"instances": x.tolist()}, timeout=30).json()
        np.testing.assert_allclose([p["logits"] for p in answer["predictions"]],
                                   numpy_logits(weights[name], x), rtol=1e-4, atol=1e-5)
    assert server.log().count("was not applied") == 1   # logged once, retried quietly
    assert server.alive()


@pytest.mark.parametrize("text", ["", "model_config_list {}\n"])
def test_a_server_started_with_no_models_takes_them_from_a_reload(start_server, tmp_path, text):
    """TF Serving starts on a config file that lists no models (or sets no config) and serves
    what a reload adds; a reload to an empty list unloads every model; a config that sets
    nothing is refused once one is served."""
    from tensorflow_serving.apis import model_management_pb2

    weights = member_weights(61)
    os.makedirs(tmp_path / "a")
    publish(lambda p: write_member(p, weights), str(tmp_path / "a"), 1)
    path = tmp_path / "models.config"
    path.write_text(text)
    server = start_server(["--model_config_file", str(path)])
    channel = grpc.insecure_channel(server.grpc)
    model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    x = RNG.standard_normal((2, IN_DIM)).astype(np.float32)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request("a", x), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert requests.get(f"{server.rest}/v1/models/a", timeout=30).status_code == 404

    request = model_management_pb2.ReloadConfigRequest()
    request.config.CopyFrom(_model_config(("a", str(tmp_path / "a"), "tensorflow")))
    model_stub.HandleReloadConfigRequest(request, timeout=120)
    response = stub.Predict(predict_request("a", x), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                               numpy_logits(weights, x), rtol=1e-4, atol=1e-5)

    request = model_management_pb2.ReloadConfigRequest()   # sets no config: refused
    with pytest.raises(grpc.RpcError) as error:
        model_stub.HandleReloadConfigRequest(request, timeout=120)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Predict(predict_request("a", x), timeout=30).outputs["logits"]

    request.config.model_config_list.SetInParent()          # an empty list: nothing served
    model_stub.HandleReloadConfigRequest(request, timeout=120)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(predict_request("a", x), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()
    assert server.alive()
