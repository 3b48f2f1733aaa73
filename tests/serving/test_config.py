"""Config files and flags: TF Serving's text protos, version policies, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.serving.model_fixtures import REPO, write_text
from tfweave.serving.model_config import (ConfigError, parse_batching_parameters,
                                          parse_model_server_config, versions_to_load)
from tfweave.serving.server import entries_for_base_path


def _version_dirs(root, versions):
    for v in versions:
        os.makedirs(root / str(v), exist_ok=True)
        (root / str(v) / "saved_model.pb").write_bytes(b"")
    (root / "not_a_version").mkdir(exist_ok=True)
    return str(root)


def test_model_server_config_reads_platforms_policies_and_labels(tmp_path):
    base = _version_dirs(tmp_path / "m", [1, 2, 3])
    path = write_text(tmp_path / "c", f"""
model_config_list {{
  config {{ name: "a" base_path: "{base}" model_platform: "tensorflow" }}
  config {{ name: "b" base_path: "{base}" model_platform: "netfuse"
           model_version_policy {{ specific {{ versions: 1 versions: 3 }} }}
           version_labels {{ key: "stable" value: 1 }} }}
  config {{ name: "c" base_path: "{base}" model_version_policy {{ latest {{ num_versions: 2 }} }} }}
  config {{ name: "d" base_path: "{base}" model_version_policy {{ all {{}} }} }}
}}""")
    a, b, c, d = parse_model_server_config(path)
    assert (a.platform, b.platform, c.platform) == ("tensorflow", "netfuse", "tensorflow")
    assert b.version_labels == {"stable": 1}
    assert versions_to_load(a) == [3]
    assert versions_to_load(b) == [1, 3]
    assert versions_to_load(c) == [2, 3]
    assert versions_to_load(d) == [1, 2, 3]


@pytest.mark.parametrize("body, words", [
    ('model_config_list { config { name: "a" } }', "base_path"),
    ('model_config_list { config { base_path: "/x" } }', "needs a name"),
    ('model_config_list { config { name: "a" base_path: "/x" model_platform: "onnx" } }',
     "model_platform"),
    ('model_config_list { config { name: "a" base_path: "/x" } '
     'config { name: "a" base_path: "/y" } }', "listed twice"),
    ("model_config_list { oops }", "not a ModelServerConfig"),
])
def test_bad_model_server_configs_name_the_problem(tmp_path, body, words):
    with pytest.raises(ConfigError, match=words):
        parse_model_server_config(write_text(tmp_path / "c", body))


def test_a_specific_version_policy_loads_the_listed_versions_that_are_there(tmp_path):
    """TF Serving serves the listed versions it finds and loads the others when they appear
    (the poll asks again); none of them there is an error naming them."""
    base = _version_dirs(tmp_path / "m", [1, 2, 3])
    path = write_text(tmp_path / "c", f"""
model_config_list {{
  config {{ name: "some" base_path: "{base}"
           model_version_policy {{ specific {{ versions: 1 versions: 4 }} }} }}
  config {{ name: "none" base_path: "{base}"
           model_version_policy {{ specific {{ versions: 7 versions: 8 }} }} }}
}}""")
    some, none = parse_model_server_config(path)
    assert versions_to_load(some) == [1]
    _version_dirs(tmp_path / "m", [4])
    assert versions_to_load(some) == [1, 4]
    with pytest.raises(ConfigError, match=r"none of the versions \[7, 8\]"):
        versions_to_load(none)


def test_version_labels_must_point_at_loaded_versions(tmp_path):
    base = _version_dirs(tmp_path / "m", [1, 2])
    path = write_text(tmp_path / "c", f'model_config_list {{ config {{ name: "a" base_path: '
                                      f'"{base}" version_labels {{ key: "old" value: 1 }} }} }}')
    entry, = parse_model_server_config(path)
    with pytest.raises(ConfigError, match="old"):
        versions_to_load(entry)


def test_missing_version_directories_are_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    entry, = entries_for_base_path("m", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="saved_model.pb"):
        versions_to_load(entry)


def test_batching_parameters_text_proto_keeps_defaults_for_missing_fields(tmp_path):
    params = parse_batching_parameters(write_text(tmp_path / "b", """
max_batch_size { value: 128 }
batch_timeout_micros { value: 500 }
pad_variable_length_inputs: true
"""))
    assert (params.max_batch_size, params.batch_timeout_micros) == (128, 500)
    assert params.max_enqueued_batches == 10 and params.num_batch_threads >= 1
    with pytest.raises(ConfigError, match="max_batch_size"):
        parse_batching_parameters(write_text(tmp_path / "c", "max_batch_size { value: 0 }"))
    with pytest.raises(ConfigError, match="BatchingParameters"):
        parse_batching_parameters(write_text(tmp_path / "d", "max_batch_size: 3"))


def test_serving_example_configs_parse(tmp_path):
    params = parse_batching_parameters(str(REPO / "serving" / "batching.config"))
    assert params.max_batch_size >= 1
    entries = parse_model_server_config(str(REPO / "serving" / "models.config"))
    assert any(e.platform == "netfuse" for e in entries)


def test_cli_refuses_bad_flags_with_exit_code_2(tmp_path):
    command = [sys.executable, "-m", "tfweave.cli", "serve", "--model_base_path",
               str(tmp_path / "missing"), "--port", "0", "--rest_api_port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert "missing" in result.stderr


@pytest.mark.parametrize("flags, words", [
    (["--port", "70000", "--rest_api_port", "0"], "--port 70000"),
    (["--port", "-1", "--rest_api_port", "0"], "--port -1"),
    (["--port", "0", "--rest_api_port", "70000"], "--rest_api_port 70000"),
    (["--port", "8611", "--rest_api_port", "8611"], "also the gRPC --port"),
    (["--port", "0", "--rest_api_port", "0", "--rest_api_num_threads", "0"],
     "--rest_api_num_threads 0"),
    (["--port", "0", "--rest_api_port", "0", "--max_request_bytes", "-5"],
     "--max_request_bytes -5"),
    (["--port", "0", "--rest_api_port", "0", "--backend", "grpc://127.0.0.1:99999"],
     "--backend grpc://127.0.0.1:99999: port 99999 is not between 1 and 65535"),
])
def test_cli_refuses_impossible_ports_and_limits_before_serving(tmp_path, flags, words):
    # gRPC would bind --port 70000 as port 4464 and REST would die with a traceback: each must
    # be a one-line error (exit 2) that names the flag, before any model loads.
    base = _version_dirs(tmp_path / "model", [1])
    command = [sys.executable, "-m", "tfweave.cli", "serve", "--model_base_path", base] + flags
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert words in result.stderr and "Traceback" not in result.stderr
    assert "ready" not in result.stdout


def test_rest_port_in_use_is_an_error_naming_the_rest_port(zoo):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "tfweave.cli", "serve", "--model_base_path",
                   zoo["members"]["member0"], "--port", "0", "--rest_api_port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert f"cannot bind REST port 127.0.0.1:{port} (--rest_api_port)" in result.stderr
