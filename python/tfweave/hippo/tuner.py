"""``StageTreeTuner``: a KerasTuner tuner that runs stages instead of trials.

Switching an existing KerasTuner script is a change of class::

    tuner = hippo.GridSearch(build_model, objective="val_accuracy", directory=..., project_name=...)
    tuner.search(x, y, validation_data=(xv, yv), epochs=12)
    best_hp = tuner.get_best_hyperparameters()[0]
    model = tuner.get_best_models()[0]

Each KerasTuner "trial" this tuner runs is one stage: its ``hippo/*`` values say which state to
start from (a fresh model, or the parent stage's checkpoint), which epochs to train and where to
save the end state. Training data must have a fixed order per epoch (numpy arrays, converted to
``hippo.EpochData``, or an ``EpochData``): a resumed stage sees exactly the batches an
uninterrupted run would.

Schedules are applied per stage: ``learning_rate`` (assigned to the optimizer's variable) and any
other optimizer attribute by name (``momentum``, ``weight_decay``, ``beta_1``...), ``batch_size``
(the data pipeline) and ``dropout`` (every ``keras.layers.Dropout``). Override ``apply_schedule``
for others.

tf_keras models: KerasTuner 1.4 requires Keras 3 models in ``Tuner.run_trial``. For a tf_keras
model, subclass ``StageTreeTuner`` and override ``build_stage_model(stage, hp)`` to build and
compile the tf_keras model (restoring ``stage.parent_checkpoint`` with your own
``tf.train.Checkpoint`` holding model, optimizer and a ``tf.random.Generator``), and
``save_stage_state(stage, model, data)`` to write ``stage.checkpoint``; ``run_trial`` then trains
``epochs`` ``stage.initial_epoch..stage.epochs`` with ``model.fit(..., initial_epoch=...)`` as here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time

import keras
import keras_tuner
import numpy as np
from keras_tuner.src import utils as kt_utils
from keras_tuner.src.backend import config as kt_config
from keras_tuner.src.engine import tuner_utils

from tfweave.hippo import checkpoints, distributed, storage
from tfweave.hippo.epoch_data import EpochData
from tfweave.hippo.oracle import (CKPT_BYTES_METRIC, CKPT_SECONDS_METRIC, CLOCK_PHASE_SECONDS,
                                  FINISHED_AT_METRIC, FIT_SECONDS_METRIC, LOAD_SECONDS_METRIC,
                                  META, SECONDS_METRIC, STARTED_AT_METRIC, STEPS_METRIC,
                                  StageTreeOracle, _inferred_direction, space_fingerprint)

LOG = logging.getLogger("tfweave.hippo")
# Schedules whose change needs no retrace: a variable, or the input pipeline.
_NO_RETRACE = {"learning_rate", "batch_size"}


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage as the tuner sees it, read from a trial's ``hippo/*`` values."""
    id: str
    parent: str
    root: str
    initial_epoch: int
    epochs: int
    parent_checkpoint: str
    checkpoint: str
    config: dict
    seed: int

    @classmethod
    def from_values(cls, values: dict) -> "Stage":
        try:
            return cls(values[META + "stage"], values[META + "parent"], values[META + "root"],
                       int(values[META + "initial_epoch"]), int(values[META + "epochs"]),
                       values[META + "parent_checkpoint"], values[META + "checkpoint"],
                       json.loads(values[META + "config"]), int(values[META + "seed"]))
        except KeyError as missing:
            raise keras_tuner.errors.FatalValueError(
                f"trial values lack {missing}: StageTreeTuner runs stages handed out by a "
                f"StageTreeOracle; use hippo.StageTreeOracle (or a hippo tuner class)") from None


class _EpochRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs, self.steps = {}, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        self.logs[int(epoch)] = {k: float(v) for k, v in (logs or {}).items()
                                 if np.ndim(v) == 0}


@dataclasses.dataclass
class _PooledModel:
    """A built, compiled (and traced) model for one root, reused by all stages under it."""
    model: object
    initial: tuple  # snapshot of the freshly built state (weights, optimizer, RNGs)
    traced_config: dict | None = None  # stage config the train function was traced with
    at_stage: str | None = None  # stage whose end state the model holds
    at_stage_rng: tuple | None = None


class StageTreeTuner(keras_tuner.Tuner):
    """Tunes Keras models on a stage tree; takes ``StageTreeOracle``'s arguments, or ``oracle``.

    Args (besides ``keras_tuner.Tuner``'s):
        reuse_models: keep built (and traced) models in memory, one per root (set of constant
            hyper-parameters), and load stage states into them instead of rebuilding; the stage
            just trained continues without even a load. Checkpoints are written regardless.
        model_pool_size: how many such models to keep.
    """

    def __init__(self, hypermodel=None, objective=None, max_trials=None, max_epochs=None,
                 search="grid", scheduler=None, min_epochs=1, factor=3, median_stopping=False,
                 seed=None, hyperparameters=None, tune_new_entries=True, allow_new_entries=True,
                 max_retries_per_trial=0, max_consecutive_failed_trials=3, checkpoint_dir=None,
                 keep_leaf_checkpoints=True, share_stages=True, oracle=None, reuse_models=True,
                 model_pool_size=2, scheduling="critical_path", lease_seconds=60.0,
                 stage_store=None, population=4, round_epochs=1, quantile=0.25, **kwargs):
        if oracle is None:
            oracle = StageTreeOracle(
                objective=objective, max_trials=max_trials, max_epochs=max_epochs, search=search,
                scheduler=scheduler, min_epochs=min_epochs, factor=factor,
                median_stopping=median_stopping, seed=seed, hyperparameters=hyperparameters,
                tune_new_entries=tune_new_entries, allow_new_entries=allow_new_entries,
                max_retries_per_trial=max_retries_per_trial,
                max_consecutive_failed_trials=max_consecutive_failed_trials,
                checkpoint_dir=checkpoint_dir, keep_leaf_checkpoints=keep_leaf_checkpoints,
                share_stages=share_stages, scheduling=scheduling, lease_seconds=lease_seconds,
                stage_store=stage_store, population=population, round_epochs=round_epochs,
                quantile=quantile)
        elif not isinstance(oracle, StageTreeOracle):
            raise TypeError(f"StageTreeTuner needs a hippo.StageTreeOracle, got "
                            f"{type(oracle).__name__}")
        self._reloaded = False
        self.reuse_models = reuse_models
        self.model_pool_size = model_pool_size
        self._pool: dict[str, _PooledModel] = {}
        self._data = None
        self._current_stage = None
        self._heartbeat = None
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)
        if distributed.is_worker():
            # KerasTuner's worker re-asks at once on IDLE; wait with back-off instead.
            self.oracle = distributed.BackoffOracleClient(self.oracle)
        if self._reloaded and self.hypermodel is not None:
            self._check_space_unchanged()

    # --- resuming ---------------------------------------------------------------------------------
    def reload(self):
        self._reloaded = True
        super().reload()

    def _check_space_unchanged(self) -> None:
        saved = getattr(self.oracle, "space_fingerprint", None)
        if saved is None:
            return
        hp = keras_tuner.HyperParameters()
        self.hypermodel.declare_hyperparameters(hp)
        self.hypermodel.build(hp)
        now = space_fingerprint(hp)
        if now != saved:
            old = {json.loads(c).get("name"): (k, c) for k, c in saved}
            new = {json.loads(c).get("name"): (k, c) for k, c in now}
            changes = [f"{n!r} removed" for n in old if n not in new]
            changes += [f"{n!r} added" for n in new if n not in old]
            changes += [f"{n!r} changed from {old[n][1]} to {new[n][1]}" for n in old
                        if n in new and old[n] != new[n]]
            raise ValueError(
                f"the search space changed since the study in {self.project_dir} was saved "
                f"({'; '.join(changes) or 'order changed'}): its stage tree and checkpoints do "
                f"not fit the new space. Restore the old space, or start a new study with "
                f"another project_name or overwrite=True")

    # --- search -----------------------------------------------------------------------------------
    def search(self, *fit_args, **fit_kwargs):
        epochs = fit_kwargs.pop("epochs", None)
        max_epochs = getattr(self.oracle, "max_epochs", None)
        if epochs is not None and isinstance(self.oracle, StageTreeOracle):
            if max_epochs is None:
                self.oracle.max_epochs = int(epochs)
            elif int(epochs) != max_epochs:
                raise ValueError(f"search(epochs={epochs}) disagrees with max_epochs={max_epochs} "
                                 f"of the oracle; pass one of them")
        for name in ("initial_epoch", "steps_per_epoch"):
            if name in fit_kwargs:
                raise ValueError(f"search() does not take {name}: stages set their own epochs")
        if distributed.is_chief():
            # The chief trains nothing: it serves the oracle until the study is over.
            self.save()
            distributed.serve_chief(self.oracle)
            return None
        if distributed.is_worker() and \
                storage.exists(distributed.finished_marker(self.project_dir)):
            LOG.info("the study in %s is already finished; nothing to run", self.project_dir)
            return None
        fit_args, fit_kwargs = self._with_epoch_data(fit_args, fit_kwargs)
        try:
            return super().search(*fit_args, **fit_kwargs)
        finally:
            self._pool = {}

    def _with_epoch_data(self, fit_args, fit_kwargs):
        fit_kwargs = dict(fit_kwargs)
        x = fit_args[0] if fit_args else fit_kwargs.pop("x", None)
        rest = tuple(fit_args[1:])
        if isinstance(x, EpochData):
            self._data, self._owns_data = x, False
            return (x,) + rest, fit_kwargs
        if x is None or not hasattr(x, "__len__") or hasattr(x, "element_spec"):
            raise TypeError(
                f"StageTreeTuner trains from numpy arrays or hippo.EpochData, got "
                f"{type(x).__name__}: a stage resumed at epoch k must see the batches an "
                f"uninterrupted run sees at epoch k, which an input pipeline with its own "
                f"shuffling cannot promise")
        if rest:
            y, rest = rest[0], rest[1:]
        else:
            y = fit_kwargs.pop("y", None)
        self._data = EpochData(np.asarray(x), np.asarray(y),
                               batch_size=fit_kwargs.pop("batch_size", None) or 32,
                               shuffle=fit_kwargs.pop("shuffle", True),
                               sample_weight=fit_kwargs.pop("sample_weight", None))
        self._owns_data = True
        return (self._data,) + tuple(rest), fit_kwargs

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        lease = trial.hyperparameters.values.get(META + "lease_seconds")
        if distributed.is_worker() and lease:
            self._heartbeat = distributed.Heartbeat(self.oracle, trial.trial_id,
                                                    max(0.2, float(lease) / 4)).start()

    def on_trial_end(self, trial):
        try:
            super().on_trial_end(trial)
        finally:
            if self._heartbeat is not None:
                self._heartbeat.stop()
                self._heartbeat = None

    def _run_and_update_trial(self, trial, *fit_args, **fit_kwargs):
        # Every epoch is reported (not only the best one, as KerasTuner does): the oracle
        # assembles per-trial histories from the stages along each path.
        started_at, start = time.time(), time.perf_counter()
        self._stage_timing = {}
        logs, steps, stats = self.run_trial(trial, *fit_args, **fit_kwargs)
        seconds = time.perf_counter() - start
        last = max(logs)
        reports = []
        for epoch in sorted(logs):
            metrics = dict(logs[epoch])
            if epoch == last:
                metrics.update({STEPS_METRIC: steps, CKPT_BYTES_METRIC: stats.bytes,
                                CKPT_SECONDS_METRIC: stats.seconds, SECONDS_METRIC: seconds,
                                LOAD_SECONDS_METRIC: self._stage_timing.get("load", 0.0),
                                FIT_SECONDS_METRIC: self._stage_timing.get("fit", 0.0),
                                STARTED_AT_METRIC: started_at % CLOCK_PHASE_SECONDS,
                                FINISHED_AT_METRIC: time.time() % CLOCK_PHASE_SECONDS})
            reports.append((epoch, metrics))
        if distributed.is_worker():
            # One round trip per stage: the metrics travel with end_trial's trial.
            _record_metrics(trial, reports, self.oracle.objective)
            return
        for epoch, metrics in reports:
            self.oracle.update_trial(trial.trial_id, metrics, step=epoch)

    def run_trial(self, trial, *fit_args, **fit_kwargs):
        """Trains one stage; returns (per-epoch logs, steps, checkpoint stats)."""
        hp = trial.hyperparameters
        stage = Stage.from_values(hp.values)
        self._current_stage = stage
        data = fit_args[0] if fit_args and isinstance(fit_args[0], EpochData) else self._data
        if data is None:
            raise ValueError("StageTreeTuner.run_trial needs training data (numpy or EpochData)")
        if getattr(self, "_owns_data", False):
            data.seed = stage.seed
        if not hasattr(data, "default_batch_size"):
            data.default_batch_size = data.batch_size
        data.batch_size = data.default_batch_size
        loading = time.perf_counter()
        model = self._model_for_stage(stage, hp)
        self.apply_stage_config(model, stage.config, data)
        timing = getattr(self, "_stage_timing", {})
        timing["load"] = time.perf_counter() - loading

        callbacks = self._deepcopy_callbacks(list(fit_kwargs.pop("callbacks", [])))
        self._configure_tensorboard_dir(callbacks, trial, 0)
        recorder = _EpochRecorder()
        callbacks += [data.epoch_callback(), recorder,
                      tuner_utils.SaveBestEpoch(self.oracle.objective,
                                                self._get_checkpoint_fname(trial.trial_id)),
                      tuner_utils.TunerCallback(self, trial)]
        data.set_epoch(stage.initial_epoch)
        fit_kwargs.setdefault("verbose", 0)
        fitting = time.perf_counter()
        self.hypermodel.fit(hp, model, data, *fit_args[1:], initial_epoch=stage.initial_epoch,
                            epochs=stage.epochs, callbacks=callbacks, **fit_kwargs)
        timing["fit"] = time.perf_counter() - fitting
        if kt_config.multi_backend():
            kt_utils.save_json(self._get_build_config_fname(trial.trial_id),
                               model.get_build_config())
        stats = self.save_stage_state(stage, model, data)
        if len(recorder.logs) != stage.epochs - stage.initial_epoch:
            raise RuntimeError(
                f"stage {stage.id} trained {len(recorder.logs)} of its "
                f"{stage.epochs - stage.initial_epoch} epochs (a callback stopped training?): "
                f"early stopping inside a stage would break its children; use "
                f"median_stopping or a scheduler instead")
        return recorder.logs, recorder.steps, stats

    # --- stage state ------------------------------------------------------------------------------
    def _model_for_stage(self, stage: Stage, hp):
        if not self.reuse_models:
            return self.build_stage_model(stage, hp)
        pooled = self._pool.pop(stage.root, None)
        if pooled is None:
            model = self.build_stage_model(stage, hp)
            pooled = _PooledModel(model, checkpoints.snapshot_state(model)
                                  if not stage.parent_checkpoint else None)
        elif not stage.parent_checkpoint and pooled.initial is None:
            # First met mid-tree (restored from a checkpoint): build the fresh state once.
            model = self.build_stage_model(stage, hp)
            pooled = _PooledModel(model, checkpoints.snapshot_state(model))
        elif not stage.parent_checkpoint:
            checkpoints.restore_snapshot(pooled.model, pooled.initial)
        elif pooled.at_stage == stage.parent:
            # The model already holds the parent's end state; only the RNGs may have moved.
            checkpoints.restore_rng_state(pooled.at_stage_rng)
        else:
            checkpoints.restore_training_state(stage.parent_checkpoint, pooled.model)
        if pooled.traced_config is not None and any(
                pooled.traced_config.get(k) != v for k, v in stage.config.items()
                if k not in _NO_RETRACE):
            pooled.model.train_function = None  # Python-float hyper-parameters are traced in
        pooled.traced_config = dict(stage.config)
        pooled.at_stage = pooled.at_stage_rng = None
        self._pool[stage.root] = pooled  # most recently used last
        while len(self._pool) > self.model_pool_size:
            self._pool.pop(next(iter(self._pool)))
        return pooled.model

    def build_stage_model(self, stage: Stage, hp):
        """A model in the stage's starting state: fresh (seeded) or restored from the parent."""
        # The same seeding a stand-alone run does right before building its model; a stage
        # that resumes from a checkpoint overwrites every variable and RNG state anyway.
        keras.utils.set_random_seed(stage.seed)
        model = self._try_build(hp)
        if not model.built:
            raise ValueError(f"the model built for stage {stage.id} has no weights yet: give it "
                             f"an Input layer (or build it) in the model-building function")
        if stage.parent_checkpoint:
            checkpoints.restore_training_state(stage.parent_checkpoint, model)
        return model

    def save_stage_state(self, stage: Stage, model, data) -> checkpoints.CheckpointStats:
        stats = checkpoints.save_training_state(
            stage.checkpoint, model, data_state=data.state(), extra={"stage": stage.id})
        pooled = self._pool.get(stage.root)
        if pooled is not None and pooled.model is model:
            pooled.at_stage, pooled.at_stage_rng = stage.id, checkpoints.capture_rng_state()
        return stats

    def apply_stage_config(self, model, config: dict, data) -> None:
        """Puts the stage's schedule values into effect before it trains."""
        for name, value in config.items():
            if name == "batch_size":
                data.batch_size = int(value)
            elif name == "dropout":
                for layer in _all_layers(model):
                    if isinstance(layer, keras.layers.Dropout):
                        layer.rate = float(value)
            elif model.optimizer is not None and hasattr(model.optimizer, name):
                setattr(model.optimizer, name, value)
            else:
                self.apply_schedule(model, name, value)

    def apply_schedule(self, model, name: str, value) -> None:
        """Override to apply a schedule hippo has no rule for (e.g. augmentation strength)."""
        raise ValueError(
            f"no rule to apply schedule {name!r}: it is neither an optimizer attribute, "
            f"'batch_size' nor 'dropout'. Override StageTreeTuner.apply_schedule to apply it")

    # --- results ----------------------------------------------------------------------------------
    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        self._tensorboard_stage = self._current_stage
        super()._configure_tensorboard_dir(callbacks, trial, execution)

    def _get_tensorboard_dir(self, logdir, trial_id, execution):
        stage = getattr(self, "_tensorboard_stage", None)
        if stage is None:
            return super()._get_tensorboard_dir(logdir, trial_id, execution)
        return os.path.join(str(logdir), f"stage_{stage.initial_epoch:04d}-{stage.epochs:04d}_"
                                         f"{stage.id}")

    def load_model(self, trial):
        """The model at the trial's best epoch (as KerasTuner's tuners return it)."""
        stage_trial_id = trial.hyperparameters.values.get(META + "best_stage_trial")
        if stage_trial_id is None and trial.hyperparameters.values.get(META + "final_checkpoint"):
            # The best epoch was trained by another study (adopted from a stage store): its
            # best-epoch weights live in that study's directory; the final state is here.
            LOG.warning("trial %s: best epoch trained by another study; returning the model at "
                        "the end of its schedule", trial.trial_id)
            return self.load_final_model(trial)
        if stage_trial_id is None:
            return super().load_model(trial)
        return super().load_model(self.oracle.get_trial(stage_trial_id))

    def load_final_model(self, trial):
        """The model at the end of the trial's schedule, with its optimizer state."""
        path = trial.hyperparameters.values.get(META + "final_checkpoint")
        if not path:
            raise ValueError(f"trial {trial.trial_id} has no final checkpoint (it failed, or "
                             f"keep_leaf_checkpoints=False)")
        model = self._try_build(trial.hyperparameters)
        checkpoints.restore_training_state(path, model)
        return model

    def results_summary(self, num_trials=10):
        super().results_summary(num_trials)
        if isinstance(self.oracle, StageTreeOracle):
            print()
            print(format_accounting(self.oracle.accounting()))

    def accounting(self) -> dict:
        return self.oracle.accounting()


def format_accounting(acc: dict) -> str:
    return (f"Hippo: {acc['trials']} trials as {acc['stages']} stages; executed "
            f"{acc['executed_steps']} steps ({acc['executed_epochs']} epochs), a trial-based run "
            f"needs {acc['trial_based_steps']} ({acc['trial_based_epochs']} epochs): "
            f"{acc['step_savings']:.2f}x fewer; checkpoints "
            f"{acc['checkpoint_bytes'] / 2**20:.1f} MiB written in "
            f"{acc['checkpoint_seconds']:.2f} s")


def _record_metrics(trial, reports, objective) -> None:
    """Puts a stage's per-epoch metrics into the worker's copy of its trial, checked as the
    oracle's ``update_trial`` checks them (the objective must be among them)."""
    from keras_tuner.src.engine import objective as objective_module
    from keras_tuner.src.engine import oracle as kt_oracle
    names = (list(objective.name_to_direction) if
             isinstance(objective, objective_module.MultiObjective) else [objective.name])
    for epoch, metrics in reports:
        missing = [n for n in names if n not in metrics]
        if missing:
            raise ValueError(f"Objective value missing in metrics reported to the Oracle, "
                             f"expected: {missing}, found: {metrics.keys()}")
        for name, value in metrics.items():
            if not trial.metrics.exists(name):
                direction = kt_oracle._maybe_infer_direction_from_objective(objective, name)
                trial.metrics.register(name, direction=direction or _inferred_direction(name))
            trial.metrics.update(name, value, step=epoch)


def _all_layers(model):
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        yield layer
        stack.extend(getattr(layer, "layers", []))


class GridSearch(StageTreeTuner):
    """``keras_tuner.GridSearch`` on a stage tree."""

    def __init__(self, hypermodel=None, objective=None, max_trials=None, **kwargs):
        super().__init__(hypermodel, objective=objective, max_trials=max_trials, search="grid",
                         **kwargs)


class RandomSearch(StageTreeTuner):
    """``keras_tuner.RandomSearch`` on a stage tree."""

    def __init__(self, hypermodel=None, objective=None, max_trials=10, **kwargs):
        super().__init__(hypermodel, objective=objective, max_trials=max_trials, search="random",
                         **kwargs)


class BayesianOptimization(StageTreeTuner):
    """KerasTuner's Bayesian optimization on a stage tree (a few trials in flight at once)."""

    def __init__(self, hypermodel=None, objective=None, max_trials=10, lookahead=2,
                 num_initial_points=None, **kwargs):
        from tfweave.hippo.search import BayesianSearch
        super().__init__(hypermodel, objective=objective, max_trials=max_trials,
                         search=BayesianSearch(lookahead, num_initial_points), **kwargs)


class Hyperband(StageTreeTuner):
    """Hyperband whose promotions extend paths of the stage tree (``keras_tuner.Hyperband``'s
    arguments; trials come from ``search``, random by default)."""

    def __init__(self, hypermodel=None, objective=None, max_epochs=100, factor=3, min_epochs=1,
                 max_trials=None, search="random", **kwargs):
        if max_trials is None and search == "random":
            from tfweave.hippo.search import Hyperband as _Hyperband
            scheduler = _Hyperband(min_epochs, factor)
            scheduler.brackets = scheduler._make_brackets(max_epochs)
            max_trials = sum(b["size"] for b in scheduler.brackets)
        super().__init__(hypermodel, objective=objective, max_trials=max_trials,
                         max_epochs=max_epochs, search=search, scheduler="hyperband",
                         min_epochs=min_epochs, factor=factor, **kwargs)
