"""Checkpoints hold the whole training state and refuse to load when damaged."""

import random

import keras
import numpy as np
import pytest

from tfweave import hippo
from tfweave.hippo import checkpoints, study


def _model(seed, units=8):
    keras.utils.set_random_seed(seed)
    return study.mlp(units, 0.2, keras.optimizers.Adam(1e-3))


def _state(model):
    return [v.numpy().tobytes() for v in list(model.variables) + list(model.optimizer.variables)]


def test_a_restored_model_has_every_variable_and_rng_state_of_the_saved_one(tmp_path):
    source = _model(1)
    source.fit(np.random.rand(32, 64), np.arange(32) % 10, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "a.ckpt")
    random.seed(11)
    np.random.seed(12)
    expected = (random.random(), np.random.rand())
    random.seed(11)
    np.random.seed(12)
    checkpoints.save_training_state(path, source, data_state={"epoch": 1, "seed": 0})
    random.seed(99)
    np.random.seed(99)
    target = _model(2)
    assert _state(target) != _state(source)
    meta, _ = checkpoints.restore_training_state(path, target)  # optimizer built on the way
    assert _state(target) == _state(source)
    assert int(target.optimizer.iterations.numpy()) == 4
    assert (random.random(), np.random.rand()) == expected
    assert meta["data"] == {"epoch": 1, "seed": 0}


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_checkpoint_is_refused_before_any_variable_changes(tmp_path, damage):
    model = _model(1)
    path = tmp_path / "a.ckpt"
    checkpoints.save_training_state(str(path), model, data_state={})
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-100] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(bytes(blob[:len(blob) // 2]))
    else:
        path.unlink()
    other = _model(3)
    before = _state(other)
    with pytest.raises(hippo.CheckpointError, match=r"\[hippo:checkpoint-unusable\].*a\.ckpt"):
        checkpoints.restore_training_state(str(path), other)
    assert _state(other) == before


def test_a_checkpoint_of_another_architecture_names_the_mismatched_variable(tmp_path):
    path = str(tmp_path / "a.ckpt")
    checkpoints.save_training_state(path, _model(1, units=8), data_state={})
    with pytest.raises(ValueError, match=r"'dense[_0-9]*/kernel' has shape \(64, 8\)"):
        checkpoints.restore_training_state(path, _model(1, units=16))
