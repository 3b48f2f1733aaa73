"""tfweave serve: cross-model batching vs per-model batching (TF Serving's behaviour).

N fine-tuned copies of one small MLP (random weights, same architecture) are served two ways by
the same server binary, each a real subprocess on loopback with the same batching parameters:

- candidate: the N members of one NetFuse merged model (``tfweave.netfuse.merge``), each under
  its own name; requests for different members are batched into one merged run;
- baseline: the N member SavedModels as N ordinary models, each batched on its own, which is
  what TF Serving does.

The load is closed-loop: C clients (spread round-robin over the members, so C <= N means at
most one client per member, i.e. small per-model load) each send their next Predict as soon as
the last one answered, over gRPC with tensorflow-serving-api's stub (grpc.aio). A cell runs a
fixed number of requests per repeat, candidate and baseline alternating (harness.compare), and
reports the throughput ratio plus p50/p99 latency of each side. Bounded in count and time;
loopback only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import compare, ratio_row

LOG = logging.getLogger("benchmarks.serving")
REPO = Path(__file__).resolve().parents[1]
IN_DIM, WIDTH, LAYERS, OUT_DIM = 32, 64, 6, 10
BATCHING = """max_batch_size { value: 64 }
batch_timeout_micros { value: 0 }
num_batch_threads { value: 2 }
max_enqueued_batches { value: 1000 }
"""


def _member_weights(seed: int):
    rng = np.random.default_rng(seed)
    dims = [IN_DIM] + [WIDTH] * (LAYERS - 1) + [OUT_DIM]
    return [((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
             np.zeros(b, np.float32)) for a, b in zip(dims, dims[1:])]


def _write_member(path: str, weights) -> None:
    import tensorflow as tf

    class Member(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = [tf.Variable(w) for w, _ in weights]
            self.b = [tf.Variable(b) for _, b in weights]

        @tf.function(input_signature=[tf.TensorSpec([None, IN_DIM], tf.float32, name="x")])
        def serve(self, x):
            h = x
            for i, (w, b) in enumerate(zip(self.w, self.b)):
                h = tf.matmul(h, w) + b
                if i < len(self.w) - 1:
                    h = tf.nn.relu(h)
            return {"probs": tf.nn.softmax(h)}

    module = Member()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def _write_stacked_merged(path: str, all_weights, names, sources) -> None:
    """The merged model in NetFuse's stacked form (one [N, B, ...] input; MatMul lifted to
    BatchMatMulV2 over stacked weights), written directly from the members' weights."""
    import tensorflow as tf

    n = len(all_weights)

    class Stacked(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = [tf.Variable(np.stack([m[l][0] for m in all_weights]))
                      for l in range(LAYERS)]
            self.b = [tf.Variable(np.stack([m[l][1] for m in all_weights])[:, None])
                      for l in range(LAYERS)]

        @tf.function(input_signature=[tf.TensorSpec([n, None, IN_DIM], tf.float32, name="x")])
        def serve(self, x):
            h = x
            for l in range(LAYERS):
                h = tf.matmul(h, self.w[l]) + self.b[l]
                if l < LAYERS - 1:
                    h = tf.nn.relu(h)
            return {"probs": tf.nn.softmax(h)}

    module = Stacked()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    with open(os.path.join(path, "assets", "netfuse.json"), "w") as f:
        json.dump({"format": 1, "stacked": True,
                   "members": [{"name": nm, "source": src, "index": i}
                               for i, (nm, src) in enumerate(zip(names, sources))]}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``tfweave serve`` as a subprocess; stopped (terminate, then kill) by ``stop``."""

    def __init__(self, args: list[str], log_path: Path, timeout_s: float = 180):
        self.port, self.rest_port = _free_port(), _free_port()
        self._log = open(log_path, "w")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tfweave.cli", "serve", "--port", str(self.port),
             "--rest_api_port", str(self.rest_port), "--quiet"] + args,
            stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO, env=env)
        ready = threading.Event()

        def watch():
            for line in self.process.stdout:
                if line.startswith("tfweave serve: ready"):
                    ready.set()

        threading.Thread(target=watch, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tfweave serve did not start; see {log_path}")
        self.target = f"127.0.0.1:{self.port}"

    def metric_sum(self, prefix: str) -> float:
        """Sum of the Prometheus samples whose line starts with ``prefix``."""
        import urllib.request
        url = f"http://127.0.0.1:{self.rest_port}/monitoring/prometheus/metrics"
        with urllib.request.urlopen(url, timeout=30) as page:
            text = page.read().decode()
        return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(prefix))

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log.close()


class _LoadGenerator:
    """Closed-loop gRPC clients on one private event loop (one HTTP/2 channel per server)."""

    def __init__(self, target: str, names: list[str], rows: int):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self._loop = asyncio.new_event_loop()
        self._grpc = grpc
        x = np.random.default_rng(0).standard_normal((rows, IN_DIM)).astype(np.float32)
        proto = tf.make_tensor_proto(x)
        self._requests = {}
        for name in names:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            request.inputs["x"].CopyFrom(proto)
            self._requests[name] = request
        self._names = names

        async def connect():
            channel = grpc.aio.insecure_channel(target)
            return channel, prediction_service_pb2_grpc.PredictionServiceStub(channel)

        self._channel, self._stub = self._loop.run_until_complete(connect())
        self.latencies: list[float] = []
        self.failures = 0

    def run(self, clients: int, total: int, time_limit_s: float = 60.0) -> None:
        per_client = max(1, total // clients)
        deadline = time.monotonic() + time_limit_s

        async def client(index: int):
            request = self._requests[self._names[index % len(self._names)]]
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                try:
                    await self._stub.Predict(request, timeout=30)
                except self._grpc.RpcError:
                    self.failures += 1
                    continue
                self.latencies.append(time.perf_counter() - start)

        async def everyone():
            await asyncio.gather(*(client(i) for i in range(clients)))

        self._loop.run_until_complete(everyone())

    def close(self):
        self._loop.run_until_complete(self._channel.close())
        self._loop.close()


def _percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _write_models(root: Path, n: int) -> tuple[list[str], Path, Path, str]:
    """N member SavedModels, their merged model, and a config serving the members unmerged.

    The merged model is ``netfuse.merge(..., stacked=True)`` when that works, else the same
    stacked form written directly (returned: which one was used)."""
    names = [f"m{i:02d}" for i in range(n)]
    weights = [_member_weights(i) for i in range(n)]
    member_dirs = []
    for name, w in zip(names, weights):
        path = root / "members" / name / "1"
        _write_member(str(path), w)
        member_dirs.append(str(path))
    merged = root / "merged"
    made_by = "netfuse.merge(stacked=True)"
    try:
        from tfweave import netfuse
        netfuse.merge(member_dirs, str(merged / "1"), names=names, stacked=True)
    except Exception as error:  # the benchmark measures serving, not the merge pass
        LOG.warning("netfuse.merge(stacked=True) failed (%r); writing the stacked merged "
                    "model directly", error)
        shutil.rmtree(merged, ignore_errors=True)
        _write_stacked_merged(str(merged / "1"), weights, names, member_dirs)
        made_by = "stacked merged model written directly (netfuse.merge failed)"
    config = root / "unmerged.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{root / "members" / name}" }}\n'
        for name in names) + "}\n")
    return names, merged, config, made_by


def run(report, quick: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [8, 32]
    client_counts = [8, 32] if quick else [1, 4, 16, 32, 64]
    requests_per_repeat = 300 if quick else 1200
    repeats = 2 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="tfweave-serving-bench-"))
    throughput: dict[str, tuple[list, list]] = {}
    histograms = {}
    try:
        batching = work / "batching.config"
        batching.write_text(BATCHING)
        for n in sizes:
            root = work / f"n{n}"
            LOG.info("N=%d: writing %d member SavedModels and merging them", n, n)
            names, merged, config, made_by = _write_models(root, n)
            report.notes.append(f"N={n}: merged model: {made_by}")
            common = ["--enable_batching", "--batching_parameters_file", str(batching)]
            candidate = _Server(["--model_name", "merged", "--model_base_path", str(merged)]
                                + common, root / "candidate.log")
            baseline = _Server(["--model_config_file", str(config)] + common,
                               root / "baseline.log")
            try:
                load_c = _LoadGenerator(candidate.target, names, rows=1)
                load_b = _LoadGenerator(baseline.target, names, rows=1)
                xs, ys_c, ys_b = [], [], []
                for clients in client_counts:
                    total = max(requests_per_repeat, clients * 4)
                    load_c.latencies.clear()
                    load_b.latencies.clear()
                    case = f"N={n}/clients={clients}/rows=1"
                    row = compare(case, lambda: load_c.run(clients, total),
                                  lambda: load_b.run(clients, total),
                                  candidate_name="cross-model batching (merged)",
                                  baseline_name="per-model batching (N models)",
                                  repeats=repeats, warmup=1,
                                  target=3.0 if n == 32 and clients <= n else None)
                    # Latencies of the timed repeats only (warmup cleared below).
                    lat_c = load_c.latencies[-repeats * total:]
                    lat_b = load_b.latencies[-repeats * total:]
                    per = total - total % clients if total >= clients else clients
                    row.extra.update({
                        "candidate_rps": per / row.candidate_median_s,
                        "baseline_rps": per / row.baseline_median_s,
                        "candidate_p50_ms": _percentile(lat_c, 50) * 1e3,
                        "candidate_p99_ms": _percentile(lat_c, 99) * 1e3,
                        "baseline_p50_ms": _percentile(lat_b, 50) * 1e3,
                        "baseline_p99_ms": _percentile(lat_b, 99) * 1e3,
                        "failures": load_c.failures + load_b.failures})
                    report.add(row)
                    if n == 32:
                        report.add(ratio_row(
                            f"{case}/p99", candidate_name="cross-model p99",
                            baseline_name="per-model p99",
                            candidate_value=row.extra["candidate_p99_ms"],
                            baseline_value=row.extra["baseline_p99_ms"],
                            higher_is_better=False, target=1.0 if clients <= n else None))
                    LOG.info("%s: %.0f vs %.0f req/s, p99 %.2f vs %.2f ms", case,
                             row.extra["candidate_rps"], row.extra["baseline_rps"],
                             row.extra["candidate_p99_ms"], row.extra["baseline_p99_ms"])
                    xs.append(clients)
                    ys_c.append(row.extra["candidate_rps"])
                    ys_b.append(row.extra["baseline_rps"])
                    if clients == max(c for c in client_counts if c <= n):
                        histograms[n] = (lat_c, lat_b, clients)
                throughput[f"N={n} cross-model"] = (xs, ys_c)
                throughput[f"N={n} per-model"] = (xs, ys_b)
                load_c.close()
                load_b.close()
            finally:
                candidate.stop()
                baseline.stop()
        report.plot("throughput", throughput, xlabel="concurrent clients",
                    ylabel="requests / s", title="tfweave serve: throughput (closed loop)",
                    logx=True)
        _latency_histogram(plt, report, histograms)
        report.notes.append(
            f"Model: {LAYERS}-layer MLP (in {IN_DIM}, width {WIDTH}, out {OUT_DIM}), random "
            "weights; 1 row per request; batching: " + " ".join(BATCHING.split()) +
            "; both servers are `tfweave serve` subprocesses on loopback, the load generator "
            "(grpc.aio, closed loop) shares the same 2 cores.")
        report.notes.append("ratio = cross-model throughput / per-model throughput; /p99 rows: "
                            "per-model p99 / cross-model p99 (>= 1 means p99 no worse).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _latency_histogram(plt, report, histograms) -> None:
    if not histograms:
        return
    fig, axes = plt.subplots(1, len(histograms), figsize=(6 * len(histograms), 4), dpi=110)
    axes = np.atleast_1d(axes)
    for ax, (n, (lat_c, lat_b, clients)) in zip(axes, sorted(histograms.items())):
        top = max(_percentile(lat_c, 99.5), _percentile(lat_b, 99.5)) * 1e3
        bins = np.linspace(0, top, 60)
        ax.hist(np.asarray(lat_b) * 1e3, bins=bins, alpha=0.6, label="per-model batching")
        ax.hist(np.asarray(lat_c) * 1e3, bins=bins, alpha=0.6, label="cross-model batching")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title(f"N={n}, {clients} clients")
        ax.legend()
    fig.tight_layout()
    report.results_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(report.results_dir / f"{report.part}_latency.png")
    plt.close(fig)

