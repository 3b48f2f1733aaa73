"""REST front end: TF Serving's ``/v1/models/...`` API and the Prometheus page.

Paths and verbs follow TF Serving's ``http_rest_api_util.cc`` (same regular expressions):
``POST /v1/models/NAME[/versions/V|/labels/L]:predict`` and ``GET /v1/models/NAME[...]`` for
status and ``.../metadata``. Errors are ``{"error": "..."}`` with TF Serving's HTTP status for
the error's code, for every method (http.server's HTML 501 for methods it has no handler for
included; HEAD answers carry no body). A model name may come raw (UTF-8) or percent-encoded.
HTTP/1.1 keep-alive; one thread per open connection, capped by ``--rest_api_num_threads``: a
new connection beyond the cap closes one that sits idle between requests (keep-alive), else it
gets 503 at once; bodies beyond ``--max_request_bytes`` get 413 without being read.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from google.protobuf import json_format

from tfweave.serving import rest_json
from tfweave.serving.grpc_service import model_metadata, model_status
from tfweave.serving.status import ServingError, invalid_argument, unimplemented

LOG = logging.getLogger(__name__)

PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
                          r":(classify|regress|predict)", re.IGNORECASE)
STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|"
                         r"(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE)
V1_PATH = re.compile(r"/v1/.*", re.IGNORECASE)
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
# A version is an int64 (TF Serving parses the path's digits with SimpleAtoi).
_MAX_VERSION = 2**63 - 1
# How long a socket read may stall when --rest_api_timeout_in_ms sets no deadline (TF Serving's
# default deadline): a client that stops sending mid-request must not hold a thread forever.
_READ_TIMEOUT_WITHOUT_DEADLINE_S = 30.0


class _ClientGone(Exception):
    """The client closed the connection or stopped sending before its body was complete."""


def _to_json(message) -> bytes:
    return json.dumps(json_format.MessageToDict(
        message, preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True), indent=1).encode()


class RestApi:
    """Request handling, independent of the socket server so it reads as the protocol."""

    def __init__(self, manager, metrics, max_request_bytes: int, timeout_s: float | None):
        self.manager = manager
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.timeout_s = timeout_s   # None: no deadline (--rest_api_timeout_in_ms <= 0)

    def handle(self, method: str, path: str, read_body) -> tuple[int, str, bytes]:
        """Returns (HTTP status, content type, body); ``read_body()`` returns the request body."""
        if method == "GET" and path == PROMETHEUS_PATH:
            return 200, "text/plain; version=0.0.4", self.metrics.render().encode()
        if not V1_PATH.fullmatch(path):
            return 404, "application/json", rest_json.error_body(f"Not found: {path}")
        model, api, start = "", "unknown", time.perf_counter()
        code = "OK"
        try:
            if method == "POST" and (match := PREDICT_PATH.fullmatch(path)):
                model, version, label, api = self._model_info(match)
                body = read_body()
                if api != "predict":
                    raise unimplemented(f"{api} is not served by tfweave serve; use :predict")
                return 200, "application/json", self._predict(model, version, label, body)
            if method == "GET" and (match := STATUS_PATH.fullmatch(path)):
                model, version, label, sub = self._model_info(match)
                if not model:
                    raise invalid_argument("Missing model name in request.")
                api = "metadata" if sub else "status"
                if sub:
                    return 200, "application/json", self._metadata(model, version, label)
                return 200, "application/json", _to_json(
                    model_status(self.manager, model, version, label))
            raise invalid_argument(f"Malformed request: {method} {path}")
        except ServingError as error:
            code = error.code
            return error.http_status, "application/json", rest_json.error_body(error.message)
        except _ClientGone:
            code = "CANCELLED"
            raise
        except Exception as error:   # a fault of ours: answer INTERNAL, never drop the connection
            LOG.exception("REST %s %s failed", method, path)
            code = "INTERNAL"
            return 500, "application/json", rest_json.error_body(
                f"internal error: {type(error).__name__}: {error}")
        finally:
            if model:
                self.metrics.observe_request(model, api, "REST", code,
                                             time.perf_counter() - start)

    @staticmethod
    def _model_info(match):
        name, version, label, last = match.groups()
        if version is not None and (len(version) > 19 or int(version) > _MAX_VERSION):
            raise invalid_argument(f"Failed to convert version: {version} to numeric.")
        if version is not None and label is not None:
            raise invalid_argument(f"Both model version ({version}) and model version label "
                                   f"({label}) cannot be supplied.")
        return (unquote(name or ""), int(version) if version is not None else None,
                unquote(label) if label else None, (last or "").lower())

    def _predict(self, model, version, label, body: bytes) -> bytes:
        signature_name, inputs, fmt = rest_json.parse_predict_body(
            body, lambda sig: self.manager.input_dtypes(model, version, label, sig))
        _, _, future = self.manager.predict(model, version, label, signature_name, inputs)
        try:
            outputs = future.result(timeout=self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise ServingError("DEADLINE_EXCEEDED",
                               f"request to {model} took longer than "
                               f"--rest_api_timeout_in_ms ({self.timeout_s * 1000:.0f})") \
                from None
        return rest_json.format_predict_response(outputs, fmt)

    def _metadata(self, model, version, label) -> bytes:
        response = model_metadata(self.manager, model, version, label, ["signature_def"])
        from tensorflow_serving.apis import get_model_metadata_pb2
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        options = dict(preserving_proto_field_name=True,
                       always_print_fields_with_no_presence=True)
        # TF Serving prints model_spec and the unpacked SignatureDefMap separately
        # (http_rest_api_util.cc) and joins them into this shape.
        return json.dumps({
            "model_spec": json_format.MessageToDict(response.model_spec, **options),
            "metadata": {"signature_def": json_format.MessageToDict(signatures, **options)},
        }, indent=1).encode()


def _gunzip(body: bytes, limit: int) -> bytes:
    """A ``Content-Encoding: gzip`` body, uncompressed as TF Serving's HTTP server does; the
    size limit holds for what it uncompresses to."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise invalid_argument(f"request body is not valid gzip data: {error}") from None
    if len(data) > limit:
        raise ServingError("RESOURCE_EXHAUSTED", "gzip request body uncompresses to more than "
                           f"--max_request_bytes={limit}", http_status=413)
    if not inflater.eof:
        raise invalid_argument("request body is not valid gzip data: it ends early")
    return data


def _make_handler(api: RestApi, timeout_s: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tfweave-serve"
        timeout = timeout_s

        def handle_one_request(self):
            # Idle until the next request's first byte: a connection waiting here may be
            # closed to admit a new one when the server is at its connection cap.
            if not self.server.set_idle(self.connection, True):   # the server is draining
                self.close_connection = True
                return
            try:
                waiting = self.rfile.peek(1)
            except (OSError, ValueError):   # timed out, reset, or closed to admit another
                waiting = b""
            if not self.server.set_idle(self.connection, False) or not waiting:
                self.close_connection = True
                return
            super().handle_one_request()

        def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
            LOG.debug("%s " + format, self.address_string(), *args)

        def __getattr__(self, name):
            # http.server answers a method it finds no do_<METHOD> for with an HTML 501
            # page: every method is the API's to answer, in its JSON error shape.
            if name.startswith("do_"):
                return lambda: self._serve(name[3:])
            raise AttributeError(name)

        def _read_body(self) -> bytes:
            body = self._read_raw_body()
            if "gzip" in self.headers.get("Content-Encoding", "").lower():
                return _gunzip(body, api.max_request_bytes)
            return body

        def _read_raw_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return self._read_chunked()
            length_text = self.headers.get("Content-Length")
            if length_text is None:
                return b""
            try:
                length = int(length_text)
            except ValueError:
                length = -1
            if length < 0:   # read(-1) would read to the end, past any limit
                raise invalid_argument(f"bad Content-Length {length_text!r}")
            if length > api.max_request_bytes:
                raise ServingError("RESOURCE_EXHAUSTED",
                                   f"request body of {length} bytes is larger than "
                                   f"--max_request_bytes={api.max_request_bytes}",
                                   http_status=413)
            return self._read_exactly(length)

        def _read_exactly(self, length: int) -> bytes:
            chunks, remaining = [], length
            try:
                while remaining:
                    chunk = self.rfile.read(remaining)
                    if not chunk:
                        raise _ClientGone()
                    chunks.append(chunk)
                    remaining -= len(chunk)
            except (OSError, socket.timeout) as error:
                raise _ClientGone() from error
            return b"".join(chunks)

        def _read_chunked(self) -> bytes:
            chunks, total = [], 0
            try:
                while True:
                    line = self.rfile.readline(65537)
                    if not line:
                        raise _ClientGone()
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size < 0:
                        raise ValueError(size)
                    if size == 0:
                        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    total += size
                    if total > api.max_request_bytes:
                        raise ServingError("RESOURCE_EXHAUSTED",
                                           "chunked request body is larger than "
                                           f"--max_request_bytes={api.max_request_bytes}",
                                           http_status=413)
                    chunks.append(self._read_exactly(size))
                    self.rfile.readline(3)
            except ValueError:
                raise invalid_argument("malformed chunked request body") from None
            except OSError as error:
                raise _ClientGone() from error

        def _serve(self, method: str):
            # http.server decodes the request line as latin-1; a model name sent raw is UTF-8
            # (percent-encoded ones are decoded later, by the route).
            path = urlsplit(self.path).path.encode("latin-1").decode("utf-8", "replace")
            body_state = {"read": False, "error": False}

            def read_body():
                try:
                    body = self._read_body()
                    body_state["read"] = True
                    return body
                except ServingError:
                    body_state["error"] = True
                    raise

            try:
                status, content_type, body = api.handle(method, path, read_body)
            except _ClientGone:
                LOG.debug("client %s left before sending its whole request", self.client_address)
                self.close_connection = True
                return
            has_body = (self.headers.get("Content-Length", "0") not in ("", "0")
                        or "Transfer-Encoding" in self.headers)
            if self.server.draining:
                self.close_connection = True   # answered; no further request on this one
            if body_state["error"] or (has_body and not body_state["read"]):
                # An unread body would be parsed as the next request: close after answering.
                self.close_connection = True
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                if method != "HEAD":   # a HEAD answer has headers only (the length is kept)
                    self.wfile.write(body)
            except OSError:
                LOG.debug("client %s left before its answer", self.client_address)
                self.close_connection = True

    return Handler


def _hang_up(connection) -> None:
    """Ends a connection whose thread waits for its next request (the thread then leaves)."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class RestServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address, handler, max_connections: int):
        # an IPv6 --host (::1, ::) needs an IPv6 socket; socketserver makes IPv4 ones only
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._active = 0
        self._active_lock = threading.Lock()
        self._idle: set = set()   # sockets of connections waiting for their next request
        self.max_connections = max_connections
        self.draining = False     # stopping: answer what has arrived, take nothing new
        super().__init__(address, handler)

    def set_idle(self, connection, idle: bool) -> bool:
        """Marks a connection idle or busy; False if it was closed to admit another, or if
        the server is draining (no next request)."""
        with self._active_lock:
            if idle:
                if self.draining:
                    return False
                self._idle.add(connection)
                return True
            if connection in self._idle:
                self._idle.discard(connection)
                return True
            return False

    def process_request(self, request, client_address):
        evicted = None
        with self._active_lock:
            over = self._active >= self.max_connections
            if over and self._idle:
                # Keep-alive clients hold their connections between requests (TF Serving's
                # libevent holds them without a thread): close an idle one instead of
                # refusing a client with work to do. Its thread leaves on its own.
                evicted, over = self._idle.pop(), False
            if not over:
                self._active += 1
        if evicted is not None:
            _hang_up(evicted)
        if over:
            body = rest_json.error_body("too many open REST connections "
                                        f"(--rest_api_num_threads={self.max_connections})")
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def drain(self, timeout_s: float) -> int:
        """Closes the connections waiting between requests and waits up to ``timeout_s`` for
        the requests in progress to be answered; returns how many connections were left."""
        with self._active_lock:
            self.draining = True
            idle, self._idle = list(self._idle), set()
        for connection in idle:
            _hang_up(connection)
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._active

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1
                self._idle.discard(request)


class HttpServer:
    def __init__(self, manager, metrics, host: str, port: int, *, max_request_bytes: int,
                 timeout_s: float, max_connections: int):
        # TF Serving's --rest_api_timeout_in_ms <= 0: requests have no deadline.
        deadline_s = timeout_s if timeout_s > 0 else None
        api = RestApi(manager, metrics, max_request_bytes, deadline_s)
        handler = _make_handler(api, deadline_s or _READ_TIMEOUT_WITHOUT_DEADLINE_S)
        try:
            self._server = RestServer((host, port), handler, max_connections)
        except OSError as error:
            raise OSError(f"cannot bind REST port {host}:{port} (--rest_api_port): "
                          f"{error.strerror or error}") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="tfweave-rest",
                                        daemon=True)

    def start(self) -> int:
        self._thread.start()
        return self.port

    def stop(self, grace_s: float = 0.0) -> None:
        """Stops taking connections, then gives the requests in progress up to ``grace_s``
        to be answered."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        left = self._server.drain(grace_s)
        if left:
            LOG.warning("REST: %d connections still busy after the %.0f s shutdown grace",
                        left, grace_s)
