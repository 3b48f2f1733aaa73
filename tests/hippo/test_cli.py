"""``tfweave tune``: plots a saved stage tree; its module stays free of TensorFlow at import."""

import argparse
import subprocess
import sys

from tfweave.hippo import cli
from tfweave.hippo.stage_tree import StageTree


def _args(**overrides):
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_tune_plots_a_saved_stage_tree(tmp_path, capsys):
    tree = StageTree()
    for lr0 in (0.1, 0.01):
        for milestone in (2, 3):
            tree.add_path({}, [({"learning_rate": lr0}, 0, milestone),
                               ({"learning_rate": lr0 / 10}, milestone, 5)])
    saved = tmp_path / "stage_tree.json"
    tree.save(str(saved))
    png = tmp_path / "tree.png"
    assert cli.main(_args(tree=str(saved), plot=str(png), quiet=True)) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "8 stages, 4 leaves" in capsys.readouterr().out


def test_tune_module_imports_without_tensorflow():
    probe = ("import sys; import tfweave.hippo.cli, tfweave.hippo; "
             "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "False", result.stderr
