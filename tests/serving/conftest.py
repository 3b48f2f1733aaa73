"""Fixtures for the serving tests: model files, and tfweave serve as a real subprocess.

Each test module starts its own server (module-scoped) on loopback with free ports, waits for
its "ready" line with a bounded timeout and always kills it at teardown.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.serving import model_fixtures
from tests.serving.model_fixtures import REPO
READY_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``tfweave serve ARGS`` in a subprocess; ``grpc``/``rest`` are its loopback addresses."""

    def __init__(self, args: list[str], tmp: Path):
        self.grpc_port, self.rest_port = free_port(), free_port()
        self.log_path = tmp / f"serve-{self.grpc_port}.log"
        command = [sys.executable, "-m", "tfweave.cli", "serve", "--port", str(self.grpc_port),
                   "--rest_api_port", str(self.rest_port)] + args
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, cwd=REPO, env=env)
        self._ready = threading.Event()
        self._lines: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tfweave serve did not become ready (exit "
                                   f"{self.process.returncode}); log:\n{self.log()[-4000:]}")
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        self.rest = f"http://127.0.0.1:{self.rest_port}"

    def _read_stdout(self):
        for line in self.process.stdout:
            self._lines.append(line)
            if line.startswith("tfweave serve: ready"):
                self._ready.set()

    def log(self) -> str:
        if not self._log.closed:   # stop() closes it; a failed start reads it afterwards
            self._log.flush()
        return self.log_path.read_text()

    def queued_rows(self, model: str = "merged") -> int:
        """Rows waiting in ``model``'s batch queues, read from the Prometheus page."""
        page = requests.get(f"{self.rest}/monitoring/prometheus/metrics", timeout=30).text
        prefix = f':tfweave:serving:queue_depth{{model_name="{model}"}}'
        for line in page.splitlines():
            if line.startswith(prefix):
                return int(float(line.split()[-1]))
        return 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Three member SavedModels (the reference) and their merged model, written once."""
    root = tmp_path_factory.mktemp("zoo")
    return model_fixtures.build_model_zoo(str(root), n=3)


@pytest.fixture(scope="session")
def reference(zoo):
    return model_fixtures.MemberReference(zoo["references"])


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """``start_server(args) -> ServerProcess``; every server started is stopped at module end."""
    started = []
    tmp = tmp_path_factory.mktemp("serve")

    def start(args):
        server = ServerProcess(list(args), tmp)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
