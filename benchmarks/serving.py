"""tfweave serve: cross-model batching vs per-model batching (TF Serving's behaviour).

N fine-tuned copies of one small MLP (random weights, same architecture) are served two ways by
the same server binary, each a real subprocess on loopback with the same batching parameters:

- candidate: the N members of one NetFuse merged model (``tfweave.netfuse.merge``), each under
  its own name; requests for different members are batched into one merged run;
- baseline: the N member SavedModels as N ordinary models, each batched on its own, which is
  what TF Serving does.

The load is closed-loop: C clients (spread round-robin over the members, so C <= 2N means at
most two clients per member, i.e. small per-model load; the issue's 3x target applies to 16-64
clients at N=32) each send their next Predict as soon as
the last one answered, over gRPC with tensorflow-serving-api's stub (grpc.aio). A cell runs a
fixed number of requests per repeat, candidate and baseline alternating (harness.compare), and
reports the throughput ratio plus p50/p99 latency of each side. Bounded in count and time;
loopback only.
"""

from __future__ import annotations

import asyncio
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
ENCODER = dict(vocab=1000, layers=4, hidden=256, heads=4, intermediate=1024, max_positions=64)
SEQ_LEN = 8
ENCODER_MERGE_MODE = "ragged"
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

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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
    """Closed-loop gRPC clients on one private event loop (one HTTP/2 channel per server).

    Each member's PredictRequest is serialised once and sent as those bytes on the stub's own
    method (``/tensorflow.serving.PredictionService/Predict``); every answer is parsed into a
    PredictResponse, as the stub does. The client shares the server's cores, so its CPU per
    request (about 10% less than re-serialising the request each call, measured) is taken
    from both servers alike."""

    PREDICT = "/tensorflow.serving.PredictionService/Predict"

    def __init__(self, target: str, names: list[str], feeds: dict[str, np.ndarray]):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        self._loop = asyncio.new_event_loop()
        self._grpc = grpc
        protos = {key: tf.make_tensor_proto(value) for key, value in feeds.items()}
        self._requests = {}
        for name in names:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            for key, proto in protos.items():
                request.inputs[key].CopyFrom(proto)
            self._requests[name] = request.SerializeToString()
        self._names = names

        async def connect():
            channel = grpc.aio.insecure_channel(target)
            return channel, channel.unary_unary(
                self.PREDICT, request_serializer=None,
                response_deserializer=predict_pb2.PredictResponse.FromString)

        self._channel, self._predict = self._loop.run_until_complete(connect())
        self.latencies: list[float] = []
        self.failures = 0
        self.wall_s = 0.0   # time spent in run(), to relate the server's busy time to

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
                    await self._predict(request, timeout=30)
                except self._grpc.RpcError:
                    self.failures += 1
                    continue
                self.latencies.append(time.perf_counter() - start)

        async def everyone():
            await asyncio.gather(*(client(i) for i in range(clients)))

        start = time.perf_counter()
        self._loop.run_until_complete(everyone())
        self.wall_s += time.perf_counter() - start

    def close(self):
        self._loop.run_until_complete(self._channel.close())
        self._loop.close()


class _CpuMeter:
    """CPU seconds the load runs cost the server process and this (client) process, and the
    requests they answered; the first ``skip`` runs (the warmup, where a server still builds
    its session callables) are not counted."""

    def __init__(self, server: _Server, load, skip: int = 1):
        self.server, self.load = server, load
        self.server_s = self.client_s = 0.0
        self.requests = 0
        self._skip = skip

    def wrap(self, fn):
        def measured():
            if self._skip:
                self._skip -= 1
                return fn()
            answered = len(self.load.latencies)
            server, client = self.server.cpu_seconds(), time.process_time()
            fn()
            self.client_s += time.process_time() - client
            self.server_s += self.server.cpu_seconds() - server
            self.requests += len(self.load.latencies) - answered
        return measured

    def per_request_ms(self) -> tuple[float, float]:
        n = max(self.requests, 1)
        return round(self.server_s / n * 1e3, 3), round(self.client_s / n * 1e3, 3)


def _percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _unmerged_config(path: Path, names: list[str], member_root: Path) -> Path:
    path.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{member_root / name}" }}\n'
        for name in names) + "}\n")
    return path


def _write_mlp_models(root: Path, n: int) -> tuple[list[str], Path, Path]:
    """N member MLP SavedModels, their merged model, and a config serving them unmerged.

    The merged model is ``netfuse.merge(..., stacked=True)``."""
    from tfweave import netfuse

    names = [f"m{i:02d}" for i in range(n)]
    weights = [_member_weights(i) for i in range(n)]
    member_dirs = []
    for name, w in zip(names, weights):
        path = root / "members" / name / "1"
        _write_member(str(path), w)
        member_dirs.append(str(path))
    merged = root / "merged"
    netfuse.merge(member_dirs, str(merged / "1"), names=names, stacked=True)
    config = _unmerged_config(root / "unmerged.config", names, root / "members")
    return names, merged, config


def _export_encoders(root: Path, n: int) -> list[str]:
    """N small encoders (netfuse.architectures.bert_encoder, L=4, H=256), each perturbed like
    a fine-tuned copy, exported as Keras 3 SavedModels (``root/eNN/1``)."""
    import gc

    from tfweave.netfuse import architectures as arch
    names = []
    for seed in range(n):
        name = f"e{seed:02d}"
        model = arch.perturb(arch.bert_encoder(seed, seq_len=SEQ_LEN, **ENCODER), seed)
        model.export(str(root / name / "1"), verbose=False)
        names.append(name)
        del model
        gc.collect()
    LOG.info("exported %d small encoders", n)
    return names


def _merge_encoders(root: Path, member_root: Path, names: list[str]) -> Path:
    from tfweave import netfuse
    merged = root / "merged"
    start = time.perf_counter()
    netfuse.merge([str(member_root / name / "1") for name in names], str(merged / "1"),
                  names=names, mode=ENCODER_MERGE_MODE)
    LOG.info("merged %d encoders (mode=%s) in %.0f s", len(names), ENCODER_MERGE_MODE,
             time.perf_counter() - start)
    return merged


def _start_pair(candidate_args, baseline_args, root: Path):
    """Both servers, started side by side (each loads TensorFlow and its models)."""
    result = {}

    def start(key, args):
        try:
            result[key] = _Server(args, root / f"{key}.log")
        except Exception as error:  # re-raised below, after the other one started or failed
            result[key] = error

    threads = [threading.Thread(target=start, args=a) for a in
               (("candidate", candidate_args), ("baseline", baseline_args))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [v for v in result.values() if isinstance(v, Exception)]
    if failed:
        for value in result.values():
            if isinstance(value, _Server):
                value.stop()
        raise failed[0]
    return result["candidate"], result["baseline"]


def _batch_totals(server: _Server) -> tuple[float, float, float]:
    """(batch runs, requests in them, seconds spent running them) so far, from the server's
    Prometheus metrics."""
    return (server.metric_sum(":tfweave:serving:batch_size_count"),
            server.metric_sum(":tfweave:serving:batch_size_sum"),
            server.metric_sum(":tfweave:serving:batch_run_seconds"))


def _cells(report, label: str, n: int, names, merged: Path, config: Path, feeds,
           client_counts, total_for, repeats: int, batching: Path, root: Path,
           throughput: dict, histograms: dict, server_args: tuple[str, ...] = ()) -> None:
    common = ["--enable_batching", "--batching_parameters_file", str(batching),
              *server_args]
    candidate, baseline = _start_pair(
        ["--model_name", "merged", "--model_base_path", str(merged)] + common,
        ["--model_config_file", str(config)] + common, root)
    try:
        load_c = _LoadGenerator(candidate.target, names, feeds)
        load_b = _LoadGenerator(baseline.target, names, feeds)
        xs, ys_c, ys_b = [], [], []
        for clients in client_counts:
            total = total_for(clients)
            per = clients * max(1, total // clients)   # requests one repeat sends
            case = f"{label}/N={n}/clients={clients}"
            # The target: >= 3x at N=32 under small per-model load, i.e. 16-64 clients
            # spread over the 32 members (1-4 clients leave nothing to batch across members).
            small_load = n == 32 and 16 <= clients <= 2 * n
            before = _batch_totals(candidate)
            before_b = _batch_totals(baseline)
            wall_c, wall_b = load_c.wall_s, load_b.wall_s
            meter_c, meter_b = _CpuMeter(candidate, load_c), _CpuMeter(baseline, load_b)  # warmup=1
            row = compare(case, meter_c.wrap(lambda: load_c.run(clients, total)),
                          meter_b.wrap(lambda: load_b.run(clients, total)),
                          candidate_name="cross-model batching (merged)",
                          baseline_name="per-model batching (N models)",
                          repeats=repeats, warmup=1, target=3.0 if small_load else None)
            runs, batched, busy_c = (a - b for a, b in zip(_batch_totals(candidate), before))
            busy_b = _batch_totals(baseline)[2] - before_b[2]
            lat_c = load_c.latencies[-repeats * per:]   # the timed repeats, not the warmup
            lat_b = load_b.latencies[-repeats * per:]
            load_c.latencies.clear()
            load_b.latencies.clear()
            row.extra.update({
                "candidate_rps": round(per / row.candidate_median_s, 1),
                "baseline_rps": round(per / row.baseline_median_s, 1),
                "candidate_p50_ms": round(_percentile(lat_c, 50) * 1e3, 3),
                "candidate_p99_ms": round(_percentile(lat_c, 99) * 1e3, 3),
                "baseline_p50_ms": round(_percentile(lat_b, 50) * 1e3, 3),
                "baseline_p99_ms": round(_percentile(lat_b, 99) * 1e3, 3),
                "candidate_requests_per_run": round(batched / max(runs, 1), 2),
                # Model runs in flight on average (time in runs / wall time): ~1 for the
                # merged queue means the server is bound by its merged runs, not by gRPC.
                "candidate_runs_in_flight": round(busy_c / max(load_c.wall_s - wall_c, 1e-9), 2),
                "baseline_runs_in_flight": round(busy_b / max(load_b.wall_s - wall_b, 1e-9), 2),
                "failures": load_c.failures + load_b.failures})
            # CPU per answered request (warmup included): the server's whole process (gRPC,
            # decoding, batching and the model runs) and the load generator's own process,
            # which shares the same cores and so takes CPU from both servers alike.
            (row.extra["candidate_server_cpu_ms_per_request"],
             row.extra["candidate_client_cpu_ms_per_request"]) = meter_c.per_request_ms()
            (row.extra["baseline_server_cpu_ms_per_request"],
             row.extra["baseline_client_cpu_ms_per_request"]) = meter_b.per_request_ms()
            report.add(row)
            for q in (50, 99):
                report.add(ratio_row(
                    f"{case}/p{q}", candidate_name=f"cross-model p{q} ms",
                    baseline_name=f"per-model p{q} ms",
                    candidate_value=row.extra[f"candidate_p{q}_ms"],
                    baseline_value=row.extra[f"baseline_p{q}_ms"], higher_is_better=False,
                    target=1.0 if small_load and q == 99 else None))
            LOG.info("%s: %.0f vs %.0f req/s (%.1f requests per merged run, runs in flight "
                     "%.2f vs %.2f, server CPU %.2f vs %.2f ms and client CPU %.2f vs %.2f ms "
                     "per request), p50 %.2f vs %.2f ms, p99 %.2f vs %.2f ms", case,
                     row.extra["candidate_rps"], row.extra["baseline_rps"],
                     row.extra["candidate_requests_per_run"],
                     row.extra["candidate_runs_in_flight"], row.extra["baseline_runs_in_flight"],
                     row.extra["candidate_server_cpu_ms_per_request"],
                     row.extra["baseline_server_cpu_ms_per_request"],
                     row.extra["candidate_client_cpu_ms_per_request"],
                     row.extra["baseline_client_cpu_ms_per_request"],
                     row.extra["candidate_p50_ms"], row.extra["baseline_p50_ms"],
                     row.extra["candidate_p99_ms"], row.extra["baseline_p99_ms"])
            xs.append(clients)
            ys_c.append(row.extra["candidate_rps"])
            ys_b.append(row.extra["baseline_rps"])
            if clients == max(c for c in client_counts if c <= n):
                histograms[f"{label} N={n}"] = (lat_c, lat_b, clients)
        throughput[f"{label} N={n} cross-model"] = (xs, ys_c)
        throughput[f"{label} N={n} per-model"] = (xs, ys_b)
        load_c.close()
        load_b.close()
    finally:
        candidate.stop()
        baseline.stop()


def _busy_counts(n: int) -> list[int]:
    """Members with a request in a merged run, for the model-runs-only rows: from one (the
    run's fixed cost shows) to all n (each member's weights streamed once per run)."""
    return sorted({k for k in (1, 4, n // 2, n) if 1 <= k <= n})


def _first_requests(report, root: Path, member_root: Path, names: list[str], merged: Path,
                    batching: Path, feeds, starts: int = 2) -> None:
    """The first member requests a freshly started server answers, with the merged model's
    warmup file (what ``netfuse.merge`` writes) and without it (``warmup=False``): a version's
    first run builds and optimises its graph unless the load did it already."""
    from tfweave import netfuse
    cold = root / "merged-no-warmup"
    netfuse.merge([str(member_root / name / "1") for name in names], str(cold / "1"),
                  names=names, mode=ENCODER_MERGE_MODE, warmup=False)
    firsts: dict[str, list[float]] = {"warm": [], "cold": []}
    seconds: list[float] = []   # each start's second request, for comparison
    for _ in range(starts):
        for key, path in (("warm", merged), ("cold", cold)):
            server = _Server(["--model_name", "merged", "--model_base_path", str(path),
                              "--enable_batching", "--batching_parameters_file", str(batching)],
                             root / f"first-{key}.log")
            try:
                load = _LoadGenerator(server.target, names[:1], feeds)
                load.run(1, 2)
                load.close()
                firsts[key].append(load.latencies[0] * 1e3)
                seconds.append(load.latencies[1] * 1e3)
            finally:
                server.stop()
    warm, cold_ms = float(np.median(firsts["warm"])), float(np.median(firsts["cold"]))
    report.add(ratio_row(
        f"first-request/encoder-L4-H256-seq8/N={len(names)}",
        candidate_name="first request ms, warmup file", baseline_name="without it",
        candidate_value=round(warm, 1), baseline_value=round(cold_ms, 1),
        higher_is_better=False,
        extra={"warm_first_ms": [round(v, 1) for v in firsts["warm"]],
               "cold_first_ms": [round(v, 1) for v in firsts["cold"]],
               "second_request_ms": [round(v, 1) for v in seconds]}))
    LOG.info("first request after start: %.1f ms with the warmup file, %.1f ms without "
             "(second requests %s ms)", warm, cold_ms,
             [round(v, 1) for v in seconds])


def _rollout(report, root: Path, names: list[str], merged: Path, batching: Path, feeds,
             clients: int = 32) -> None:
    """A new version published under load (``--file_system_poll_wait_seconds 1``): the
    latency of the requests around the swap against the same load before it. The new
    version is the merged model again (with its warmup file), renamed in as a deployment
    would."""
    import json
    import urllib.request

    base = root / "rollout"
    shutil.copytree(merged / "1", base / "1")
    server = _Server(["--model_name", "merged", "--model_base_path", str(base),
                      "--enable_batching", "--batching_parameters_file", str(batching),
                      "--file_system_poll_wait_seconds", "1"], root / "rollout.log")
    try:
        load = _LoadGenerator(server.target, names, feeds)
        load.run(clients, 512)
        stats = {}
        for phase, total in (("steady", 4096), ("swap", 8192)):
            if phase == "swap":
                shutil.copytree(merged / "1", root / "rollout-staging")
                threading.Timer(0.5, os.rename,
                                (root / "rollout-staging", base / "2")).start()
            load.latencies.clear()
            failures, start = load.failures, time.perf_counter()
            load.run(clients, total)
            ms = [v * 1e3 for v in load.latencies]
            stats[phase] = {"rps": round(len(ms) / (time.perf_counter() - start), 1),
                            "p50_ms": round(_percentile(ms, 50), 1),
                            "p99_ms": round(_percentile(ms, 99), 1),
                            "max_ms": round(max(ms), 1),
                            "failures": load.failures - failures}
        load.close()
        url = f"http://127.0.0.1:{server.rest_port}/v1/models/{names[0]}"
        with urllib.request.urlopen(url, timeout=30) as page:
            served = json.load(page)["model_version_status"][0]["version"]
        if served != "2" or stats["swap"]["failures"]:
            raise RuntimeError(f"rollout: serving version {served} after the swap, "
                               f"{stats['swap']['failures']} failed requests; see "
                               f"{root / 'rollout.log'}")
    finally:
        server.stop()
    case = f"rollout/encoder-L4-H256-seq8/N={len(names)}/clients={clients}"
    report.add(ratio_row(case, candidate_name="p99 ms around a version swap",
                         baseline_name="p99 ms before it",
                         candidate_value=stats["swap"]["p99_ms"],
                         baseline_value=stats["steady"]["p99_ms"], higher_is_better=False,
                         extra={"steady": stats["steady"], "swap": stats["swap"]}))
    report.add(ratio_row(f"{case}/throughput", candidate_name="req/s around a version swap",
                         baseline_name="req/s before it", candidate_value=stats["swap"]["rps"],
                         baseline_value=stats["steady"]["rps"], higher_is_better=True))
    LOG.info("rollout: %s", stats)


def _model_run_cpu(member_dir: str, merged_dir: str, n: int) -> dict[str, float]:
    """CPU ms per request of a member's run of one row and of ragged merged runs with one row
    for each of k members (``_busy_counts``); called in a fresh process (see
    ``_compute_bound``)."""
    from tfweave.serving.backends import EmbeddedBackend

    rng = np.random.default_rng(0)
    feeds = {"token_ids": rng.integers(0, ENCODER["vocab"], (1, SEQ_LEN)).astype(np.int32),
             "padding_mask": np.ones((1, SEQ_LEN), np.int32)}
    backend = EmbeddedBackend(intra_op_threads=1)
    member = backend.load(member_dir, "member", 1)
    merged = backend.load(merged_dir, "merged", 1)
    member_outputs = tuple(sorted(member.signature_defs["serving_default"].outputs))
    ragged_outputs = tuple(sorted(merged.signature_defs["ragged"].outputs))
    cases = {"member": (lambda: member.run("serving_default", feeds, member_outputs), 1)}
    for k in _busy_counts(n):
        sizes = np.zeros(n, np.int32)
        sizes[:k] = 1
        ragged = {key: np.repeat(value, k, axis=0) for key, value in feeds.items()}
        ragged["group_sizes"] = sizes
        cases[f"k={k}"] = ((lambda f=ragged: merged.run("ragged", f, ragged_outputs)), k)
    for fn, _ in cases.values():
        fn()
    cpu = {name: [] for name in cases}
    for _ in range(15):
        for name, (fn, k) in cases.items():
            start = time.process_time()
            fn()
            cpu[name].append((time.process_time() - start) / k)
    return {name: float(np.median(values)) * 1e3 for name, values in cpu.items()}


def _compute_bound(report, member_dir: Path, merged_dir: Path, n: int) -> None:
    """The ceiling behind the serving ratio: CPU time per request of the model runs alone (no
    gRPC), one intra-op thread each so that idle spinning threads do not count as work. Run in
    a fresh process: TensorFlow's CPU thread pool is process-wide and this one already made it
    (exporting the encoders) with the default size. The serving ratio can approach this only
    where the per-request front-end cost (equal on both sides) is small next to both."""
    import json

    code = ("import json, sys; from benchmarks.serving import _model_run_cpu; "
            "print(json.dumps(_model_run_cpu(sys.argv[1], sys.argv[2], int(sys.argv[3]))))")
    done = subprocess.run([sys.executable, "-c", code, str(member_dir), str(merged_dir), str(n)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if done.returncode != 0:
        raise RuntimeError(f"model-run measurement failed: {done.stderr[-2000:]}")
    cpu = json.loads(done.stdout.strip().splitlines()[-1])
    for k in _busy_counts(n):
        report.add(ratio_row(
            f"model-runs-only/encoder-L4-H256-seq8/N={n}/busy={k}",
            candidate_name="merged ragged run, CPU ms per request",
            baseline_name="member run, CPU ms per request",
            candidate_value=round(cpu[f"k={k}"], 3), baseline_value=round(cpu["member"], 3),
            higher_is_better=False))
        LOG.info("model runs only: member %.2f vs merged (%d busy) %.2f CPU ms per request",
                 cpu["member"], k, cpu[f"k={k}"])


def run(report, quick: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [8] if quick else [8, 32]
    client_counts = [1, 8] if quick else [1, 4, 16, 32, 64]
    repeats = 2 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="tfweave-serving-bench-"))
    throughput: dict[str, tuple[list, list]] = {}
    histograms: dict = {}
    rng = np.random.default_rng(0)
    encoder_feeds = {
        "token_ids": rng.integers(0, ENCODER["vocab"], (1, SEQ_LEN)).astype(np.int32),
        "padding_mask": np.ones((1, SEQ_LEN), np.int32)}
    try:
        batching = work / "batching.config"
        batching.write_text(BATCHING)
        member_root = work / "encoders"
        all_names = _export_encoders(member_root, max(sizes))
        for n in sizes:
            root = work / f"encoder-n{n}"
            root.mkdir()
            names = all_names[:n]
            merged = _merge_encoders(root, member_root, names)
            config = _unmerged_config(root / "unmerged.config", names, member_root)
            _cells(report, "encoder-L4-H256-seq8", n, names, merged, config, encoder_feeds,
                   client_counts, (lambda c: 100) if quick else (lambda c: max(300, 8 * c)),
                   repeats, batching, root, throughput, histograms)
            if n == 32:
                # Both servers again with TensorFlow's own default, every core for every op of
                # a run (the server's default gives each batch thread's run its share of the
                # cores): what TF Serving does unless told otherwise, still identical for both.
                cores = str(os.cpu_count() or 1)
                _cells(report, f"encoder-L4-H256-seq8/intra_op={cores}", n, names, merged,
                       config, encoder_feeds, [16, 32, 64], lambda c: max(300, 8 * c),
                       repeats, batching, root, throughput, histograms,
                       server_args=("--tensorflow_intra_op_parallelism", cores))
                _compute_bound(report, member_root / names[0] / "1", merged / "1", n)
                _first_requests(report, root, member_root, names, merged, batching,
                                encoder_feeds)
                _rollout(report, root, names, merged, batching, encoder_feeds)
        report.notes.append(
            "encoder-L4-H256-seq8: netfuse.architectures.bert_encoder (L=4, H=256, 4 heads, "
            "FFN 1024, vocab 1000), members perturbed like fine-tuned copies, exported with "
            f"Keras 3 model.export(); merged with netfuse.merge(mode='{ENCODER_MERGE_MODE}') "
            "(served through its 'ragged' signature: only members with requests are computed); "
            "1 request = 1 row of 8 tokens.")
        if not quick:
            report.notes.append(
                "rollout rows: 32 clients on the merged model; 4096 requests, then 8192 during "
                "which a new version directory (the same model with its warmup file) is renamed "
                "in and picked up by the 1 s version poll: loaded and warmed beside the serving "
                "version, swapped in, the old one drained and closed. Extras: rps, p50/p99/max "
                "ms and failures per phase.")
            report.notes.append(
                "model-runs-only rows: CPU time per request of the model runs alone, in the "
                "benchmark process (no gRPC, one intra-op thread): the ceiling for the serving "
                "ratio, which adds an equal per-request front-end cost to both sides.")
            root = work / "mlp-n32"
            names, merged, config = _write_mlp_models(root, 32)
            x = np.random.default_rng(0).standard_normal((1, IN_DIM)).astype(np.float32)
            _cells(report, "mlp-6x64", 32, names, merged, config, {"x": x}, [4, 32],
                   lambda c: 1200, repeats, batching, root, throughput, histograms)
            report.notes.append(
                f"mlp-6x64 (tiny model, member run ~0.2 ms, cheaper than a gRPC request): "
                f"{LAYERS}-layer MLP (in {IN_DIM}, width {WIDTH}, out {OUT_DIM}); merged model: "
                "netfuse.merge(stacked=True).")
        report.plot("throughput", throughput, xlabel="concurrent clients",
                    ylabel="requests / s", title="tfweave serve: throughput (closed loop)",
                    logx=True)
        _latency_histogram(plt, report, histograms)
        report.notes.append(
            "Batching (identical for both servers): " + " ".join(BATCHING.split()) +
            "; both servers are `tfweave serve` subprocesses on loopback (embedded backend). "
            "The load generator is the benchmark process: C closed-loop clients (client i -> "
            "member i mod N) on one grpc.aio event loop and one HTTP/2 channel per server, "
            "sending each member's PredictRequest as bytes serialised once on "
            "/tensorflow.serving.PredictionService/Predict and parsing every PredictResponse; "
            "it shares the same 2 cores.")
        report.notes.append(
            "*_server_cpu_ms_per_request (json extras): CPU of the whole server process per "
            "answered request (gRPC, decoding, batching, model runs); "
            "*_client_cpu_ms_per_request: the load generator's own CPU per request. Warmup "
            "runs excluded.")
        report.notes.append("ratio = cross-model throughput / per-model throughput; /p50 and "
                            "/p99 rows: per-model latency / cross-model latency (>= 1 means "
                            "cross-model is no worse).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _latency_histogram(plt, report, histograms) -> None:
    if not histograms:
        return
    fig, axes = plt.subplots(1, len(histograms), figsize=(6 * len(histograms), 4), dpi=110)
    axes = np.atleast_1d(axes)
    for ax, (label, (lat_c, lat_b, clients)) in zip(axes, histograms.items()):
        top = max(_percentile(lat_c, 99.5), _percentile(lat_b, 99.5)) * 1e3
        bins = np.linspace(0, top, 60)
        ax.hist(np.asarray(lat_b) * 1e3, bins=bins, alpha=0.6, label="per-model batching")
        ax.hist(np.asarray(lat_c) * 1e3, bins=bins, alpha=0.6, label="cross-model batching")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title(f"{label}, {clients} clients")
        ax.legend()
    fig.tight_layout()
    report.results_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(report.results_dir / f"{report.part}_latency.png")
    plt.close(fig)

