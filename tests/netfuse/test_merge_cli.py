"""``tfweave merge``: writes the merged SavedModel, reports refusals readably."""

import json
import os

from tfweave import cli, netfuse
from tfweave.netfuse import architectures as arch

from tests.netfuse.parity import assert_members_match


def _export(models, root):
    paths = []
    for i, model in enumerate(models):
        path = str(root / f"ft{i}" / "1")
        model.export(path, verbose=False)
        paths.append(path)
    return paths


def test_tfweave_merge_writes_a_merged_saved_model_with_given_names(tmp_path, capsys, rng):
    models = [arch.perturb(arch.mlp(s, features=5, hidden=(6,), classes=3), s)
              for s in range(2)]
    paths = _export(models, tmp_path)
    out = str(tmp_path / "merged" / "1")
    code = cli.main(["merge", *paths, "-o", out, "--name", "alpha", "--name", "beta",
                     "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "merged 2 models" in printed and "alpha" in printed
    meta = json.load(open(os.path.join(out, "assets", "netfuse.json")))
    assert [m["name"] for m in meta["members"]] == ["alpha", "beta"]
    inputs = [{"features": rng.normal(size=(b, 5)).astype("float32")} for b in (2, 3)]
    results = netfuse.load_merged(out).run({"alpha": inputs[0], "beta": inputs[1]})
    assert_members_match(models, {0: results["alpha"], 1: results["beta"]}, inputs)
    # an existing output is never silently replaced
    assert cli.main(["merge", *paths, "-o", out, "--quiet"]) == 1
    assert "exists" in capsys.readouterr().err


def test_tfweave_merge_reports_which_node_differs(tmp_path, capsys):
    models = [arch.mlp(0, features=5, hidden=(6,), classes=3),
              arch.mlp(1, features=5, hidden=(7,), classes=3)]
    paths = _export(models, tmp_path)
    code = cli.main(["merge", *paths, "-o", str(tmp_path / "out"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "not the same architecture" in err and "weight shape [5, 6] vs [5, 7]" in err
    assert not (tmp_path / "out").exists()


def test_progress_lines_name_each_stage(tmp_path, capsys):
    models = [arch.mlp(s, features=3, hidden=(4,), classes=2) for s in range(3)]
    paths = _export(models, tmp_path)
    assert cli.main(["merge", *paths, "-o", str(tmp_path / "m" / "1")]) == 0
    err = capsys.readouterr().err
    for stage in ("freeze: 3/3", "match: 3/3", "lift: 3/3", "save: 3/3"):
        assert stage in err


def test_warmup_requests_are_written_by_default_and_not_with_no_warmup(tmp_path):
    import tensorflow as tf

    from tfweave.serving.warmup import WARMUP_FILE, read_warmup_requests

    models = [arch.perturb(arch.mlp(s, features=5, hidden=(6,), classes=3), s)
              for s in range(2)]
    paths = _export(models, tmp_path)
    warm, cold = str(tmp_path / "warm" / "1"), str(tmp_path / "cold" / "1")
    assert cli.main(["merge", *paths, "-o", warm, "--mode", "ragged", "--quiet"]) == 0
    assert cli.main(["merge", *paths, "-o", cold, "--no-warmup", "--quiet"]) == 0
    logs = read_warmup_requests(warm)
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == \
        ["serving_default", "ragged"]
    ragged = {k: tf.make_ndarray(v) for k, v in logs[1].predict_log.request.inputs.items()}
    assert ragged["group_sizes"].tolist() == [1, 1]     # one row per member
    assert ragged["features"].shape == (2, 5)
    assert not os.path.exists(os.path.join(cold, WARMUP_FILE))


def test_overwrite_refuses_an_output_that_is_or_holds_or_sits_in_an_input_model(tmp_path, capsys):
    import pytest
    models = [arch.mlp(s, features=3, hidden=(), classes=2) for s in range(2)]
    paths = _export(models, tmp_path / "models")
    before = sorted(os.listdir(tmp_path / "models"))
    assert cli.main(["merge", *paths, "-o", str(tmp_path / "models"), "--overwrite",
                     "--quiet"]) == 1
    assert "contains the folder of input model" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "models")) == before
    for output, how in ((paths[0], "is the folder"), (os.path.join(paths[1], "m"), "is inside")):
        with pytest.raises(netfuse.MergeError, match=how):
            netfuse.merge(paths, output, overwrite=True)
    assert all(os.path.exists(os.path.join(p, "saved_model.pb")) for p in paths)


def test_an_output_path_through_a_file_is_refused_before_the_merge_without_a_traceback(
        tmp_path, capsys):
    import pytest
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    missing = str(tmp_path / "no_such_model")  # refused first: the output is checked first
    for output, overwrite in ((notes, True), (notes / "1", False)):
        with pytest.raises(netfuse.MergeError, match="is a file, not a folder"):
            netfuse.merge([missing], str(output), overwrite=overwrite)
    assert cli.main(["merge", missing, "-o", str(notes), "--overwrite", "--quiet"]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert notes.read_text() == "keep me"


def test_merged_saved_model_folder_follows_the_umask(tmp_path):
    import stat
    models = [arch.mlp(s, features=3, hidden=(), classes=2) for s in range(2)]
    old = os.umask(0o022)
    try:
        netfuse.merge(models, str(tmp_path / "merged" / "1"), warmup=False)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "merged" / "1").st_mode)
    assert mode == 0o755, oct(mode)  # readable by a server running as another user


def test_tfweave_merge_jit_compile_writes_an_xla_compiled_stock_model(tmp_path, capsys, rng):
    models = [arch.perturb(arch.mlp(s, features=5, hidden=(6,), classes=3), s)
              for s in range(2)]
    paths = _export(models, tmp_path)
    out = str(tmp_path / "merged" / "1")
    assert cli.main(["merge", *paths, "-o", out, "--jit-compile", "--quiet"]) == 0
    assert "--xla_cpu_compilation_enabled=true" in capsys.readouterr().out
    meta = json.load(open(os.path.join(out, "assets", "netfuse.json")))
    assert meta["jit_compile"] is True and meta["mode"] == "stock"
    inputs = [{"features": rng.normal(size=(b, 5)).astype("float32")} for b in (1, 4)]
    results = netfuse.load_merged(out).run({0: inputs[0], 1: inputs[1]})
    assert_members_match(models, results, inputs)
    assert cli.main(["merge", *paths, "-o", str(tmp_path / "g"), "--mode", "grouped",
                     "--jit-compile", "--quiet"]) == 1
    assert "needs mode='stock'" in capsys.readouterr().err
