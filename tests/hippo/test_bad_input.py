"""Bad input on a real (tiny) study: clear messages, the study goes on, nothing finished is lost."""

import keras
import keras_tuner
import pytest
import tensorflow as tf

from tfweave import hippo
from tfweave.hippo import checkpoints, study

SEED = 5


@pytest.fixture(scope="module")
def digits():
    return study.digits()


def _search(tuner, digits, epochs=3, **kwargs):
    x, y, x_val, y_val = digits
    tuner.search(x, y, validation_data=(x_val, y_val), epochs=epochs, batch_size=128, verbose=0,
                 **kwargs)


def _leaf_bits(tuner):
    out = {}
    for trial in tuner.oracle.get_best_trials(10):
        if trial.status == "COMPLETED":
            _, arrays = checkpoints.read_checkpoint(
                trial.hyperparameters.values["hippo/final_checkpoint"])
            key = tuple(sorted((k, v) for k, v in trial.hyperparameters.values.items()
                               if not k.startswith("hippo/")))
            out[key] = {k: v.tobytes() for k, v in arrays.items() if not k.startswith("rng/")}
    return out


class _CorruptFirstParent(hippo.GridSearch):
    """Damages the first stage's checkpoint once, right after it is written."""

    corrupted = None

    def save_stage_state(self, stage, model, data):
        stats = super().save_stage_state(stage, model, data)
        if stage.initial_epoch == 0 and _CorruptFirstParent.corrupted is None:
            _CorruptFirstParent.corrupted = stage.checkpoint
            with tf.io.gfile.GFile(stage.checkpoint, "rb") as f:
                blob = bytearray(f.read())
            blob[len(blob) // 2] ^= 0x55
            with tf.io.gfile.GFile(stage.checkpoint, "wb") as f:
                f.write(bytes(blob))
        return stats


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_detected_and_its_stage_reruns_with_identical_results(
        tmp_path, digits):
    grid = study.LrGrid(initial=(0.1,), milestones=(1,), decay=(0.1, 0.5), units=8)
    study.seeded(SEED)
    # reuse_models=False: children load their parent's state from disk, where it is damaged.
    damaged = _CorruptFirstParent(grid.build, objective="val_accuracy", seed=SEED,
                                  reuse_models=False, directory=str(tmp_path),
                                  project_name="damaged")
    _search(damaged, digits)
    acc = damaged.accounting()
    assert _CorruptFirstParent.corrupted is not None
    assert acc["checkpoints_unusable"] == 1 and acc["trials_completed"] == 2
    assert acc["executed_epochs"] == acc["unique_epochs"] + 1  # the 1-epoch parent, twice
    invalid = [t for t in damaged.oracle.trials.values() if t.status == "INVALID"]
    assert len(invalid) == 1 and "checksum mismatch" in invalid[0].message

    clean = hippo.GridSearch(grid.build, objective="val_accuracy", seed=SEED,
                             directory=str(tmp_path), project_name="clean")
    _search(clean, digits)
    assert _leaf_bits(damaged) == _leaf_bits(clean)


def _fragile(widths=(8, 16)):
    def build(hp):
        units = hp.Choice("units", list(widths))
        lr = hippo.HyperSchedule.step_decay(hp, "learning_rate", initial=0.1, milestones=[1],
                                            decay=hippo.Choice([0.1, 0.5]))
        if units == 16:
            raise ValueError("this width does not fit the device (pretend)")
        return study.mlp(units, 0.0, keras.optimizers.SGD(lr.initial))
    return build


@pytest.mark.slow
def test_a_raising_trial_fails_alone_and_a_resumed_study_keeps_everything(tmp_path, digits):
    study.seeded(SEED)
    options = dict(objective="val_accuracy", seed=SEED, directory=str(tmp_path),
                   project_name="study")
    tuner = hippo.GridSearch(_fragile(), **options)
    logs = tmp_path / "logs"
    _search(tuner, digits, callbacks=[keras.callbacks.TensorBoard(str(logs))])
    acc = tuner.accounting()
    # TensorBoard logs per stage, named by epoch range and stage id.
    stage_logs = sorted(p.name for p in logs.iterdir())
    assert len(stage_logs) == acc["stages_run"]
    assert all(name.startswith("stage_") for name in stage_logs)
    # The 16-unit root fails once; both its trials fail, the two 8-unit trials finish.
    assert acc["trials_completed"] == 2 and acc["trials_failed"] == 2
    failed = [t for t in tuner.oracle.get_best_trials(4) if t.status == "FAILED"]
    assert len(failed) == 2 and all("does not fit the device" in t.message for t in failed)
    best = tuner.get_best_hyperparameters()[0]
    assert best["units"] == 8
    model = tuner.get_best_models()[0]
    x_val, y_val = digits[2], digits[3]
    assert model.evaluate(x_val, y_val, verbose=0)[1] == pytest.approx(
        tuner.oracle.get_best_trials(1)[0].score, abs=1e-6)

    # Same space, new process: the finished study is reloaded, nothing reruns.
    again = hippo.GridSearch(_fragile(), **options)
    _search(again, digits)
    assert again.accounting()["stages_run"] == acc["stages_run"]
    assert again.get_best_hyperparameters()[0].values == best.values

    # A changed space is refused before anything runs, naming what changed.
    with pytest.raises(ValueError, match=r"search space changed.*'units'"):
        hippo.GridSearch(_fragile(widths=(8, 32)), **options)


def test_training_data_without_a_fixed_epoch_order_is_refused(tmp_path):
    grid = study.LrGrid(initial=(0.1,), milestones=(1,), decay=(0.1,), units=8)
    tuner = hippo.GridSearch(grid.build, objective="val_accuracy", directory=str(tmp_path))
    dataset = tf.data.Dataset.from_tensor_slices(([[0.0] * 64], [0])).batch(1)
    with pytest.raises(TypeError, match="numpy arrays or hippo.EpochData"):
        tuner.search(dataset, epochs=2)
