"""``StageTreeOracle``: a KerasTuner oracle whose trials are stages of a stage tree.

Vocabulary. A *trial* (what a KerasTuner user means: one set of hyper-parameter values, trained
with its full schedule) is a *path* in the stage tree. What the oracle hands to a tuner through
KerasTuner's ``create_trial`` is a *stage*: one edge of the tree, a KerasTuner ``Trial`` whose
hyper-parameter values are those of a trial through it plus ``hippo/*`` stage metadata (stage id,
epoch range, parent checkpoint), as KerasTuner's Hyperband carries ``tuner/*`` values. Everything a
worker needs travels in those values, so KerasTuner's distributed mode works unchanged.

``get_best_trials`` (and so ``get_best_hyperparameters`` / ``get_best_models`` /
``results_summary``) answer with *trials*: one KerasTuner ``Trial`` per path, holding the user's
values, the per-epoch metrics along the whole path, and the score KerasTuner would give it.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import statistics
import threading
import time

import keras_tuner
from keras_tuner.src.engine import trial as trial_module

from tfweave.hippo import checkpoints, schedules, search as search_module, storage
from tfweave.hippo.stage_tree import CANCELLED, DONE, FAILED, PENDING, RUNNING, StageTree

LOG = logging.getLogger("tfweave.hippo")
META = "hippo/"
STEPS_METRIC = "hippo_steps"
CKPT_BYTES_METRIC = "hippo_checkpoint_bytes"
CKPT_SECONDS_METRIC = "hippo_checkpoint_seconds"
SECONDS_METRIC = "hippo_seconds"
# Where a worker's stage time went (seconds), and when it ran (wall clock, for the timeline).
LOAD_SECONDS_METRIC = "hippo_load_seconds"
FIT_SECONDS_METRIC = "hippo_fit_seconds"
STARTED_AT_METRIC = "hippo_started_at"
FINISHED_AT_METRIC = "hippo_finished_at"
# Metric values travel as 32-bit floats: a worker sends its clock modulo this, and the chief
# places it next to its own times for the stage (gaps are far shorter than this).
CLOCK_PHASE_SECONDS = 1000.0
_ACCOUNTING_METRICS = (STEPS_METRIC, CKPT_BYTES_METRIC, CKPT_SECONDS_METRIC, SECONDS_METRIC,
                       LOAD_SECONDS_METRIC, FIT_SECONDS_METRIC, STARTED_AT_METRIC,
                       FINISHED_AT_METRIC)


def _synchronized(method):
    """KerasTuner's ``synchronized`` lock, released also when the method raises.

    KerasTuner's own decorator leaves the oracle's lock held on an exception; on a chief that
    would stall the lease-expiry loop for good after one bad request.
    """
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        from keras_tuner.src.engine import oracle as kt_oracle
        name = threading.current_thread().name
        if kt_oracle.THREADS[self] == name:
            return method(self, *args, **kwargs)
        with kt_oracle.LOCKS[self]:
            kt_oracle.THREADS[self] = name
            try:
                return method(self, *args, **kwargs)
            finally:
                kt_oracle.THREADS[self] = None
    return wrapped


def space_fingerprint(hyperparameters) -> list:
    """What makes two search spaces the same study: names, kinds and ranges, in order."""
    out = []
    for hp in hyperparameters.space:
        config = dict(hp.get_config())
        config.pop("conditions", None)
        out.append([hp.__class__.__name__, json.dumps(config, sort_keys=True, default=str)])
    return out


class StageTreeOracle(keras_tuner.Oracle):
    """Runs a search over schedules as a stage tree; a drop-in ``keras_tuner.Oracle``.

    Args:
        objective, seed, hyperparameters, allow_new_entries, tune_new_entries,
        max_retries_per_trial, max_consecutive_failed_trials: as for ``keras_tuner.Oracle``
            (retries and failures count stages).
        max_trials: number of trials (paths) to try at most; grid search stops earlier when the
            grid is exhausted.
        max_epochs: epochs of a full trial. May be left out and given to ``search(epochs=...)``.
        search: "grid", "random", "bayesian" or an instance from ``tfweave.hippo.search``.
        scheduler: None (full budget), "sha", "asha", "hyperband" or an instance.
        min_epochs, factor: successive-halving rungs (``min_epochs * factor**k``).
        median_stopping: stop a trial whose best objective so far is worse than the median of
            the other trials at the same epoch (its pending stages are cancelled).
        checkpoint_dir: a ``tf.io.gfile`` directory for stage checkpoints (default: inside the
            project directory); shared by all workers in distributed mode.
        keep_leaf_checkpoints: keep every finished trial's final training state (for
            ``load_final_model``); interior states are removed once no pending stage needs them.
        share_stages: False gives every trial its own root: the trial-based baseline, same engine.
        scheduling: "critical_path" (the ready stage with the longest estimated remaining path
            to a leaf first, per-step time estimated online) or "depth_first" (continue from
            the stage just finished).
        stage_store: a ``tf.io.gfile`` directory shared by studies over the same model, data and
            search space: stages finished by any of them (before or concurrently) are adopted
            instead of trained, and this study's stages are published there (warm start).
        population, round_epochs, quantile: ``scheduler="pbt"``: population-based training of
            ``population`` members in rounds of ``round_epochs``; after each round the bottom
            ``quantile`` branch from a top-``quantile`` member's stage with its config perturbed
            (float values x0.8 or x1.2, drawn from an RNG seeded with ``seed``).
        lease_seconds: distributed mode: a running stage whose worker has not renewed its lease
            for this long is handed to another worker, from its parent's checkpoint.
    """

    def __init__(self, objective=None, max_trials=None, max_epochs=None, search="grid",
                 scheduler=None, min_epochs=1, factor=3, median_stopping=False,
                 median_min_trials=3, seed=None, hyperparameters=None, allow_new_entries=True,
                 tune_new_entries=True, max_retries_per_trial=0, max_consecutive_failed_trials=3,
                 checkpoint_dir=None, keep_leaf_checkpoints=True, share_stages=True,
                 scheduling="critical_path", lease_seconds=60.0, stage_store=None,
                 population=4, round_epochs=1, quantile=0.25):
        if scheduling not in ("critical_path", "depth_first"):
            raise ValueError(f"scheduling must be 'critical_path' or 'depth_first', got "
                             f"{scheduling!r}")
        super().__init__(objective=objective, max_trials=None, hyperparameters=hyperparameters,
                         allow_new_entries=allow_new_entries, tune_new_entries=tune_new_entries,
                         seed=seed, max_retries_per_trial=max_retries_per_trial,
                         max_consecutive_failed_trials=max_consecutive_failed_trials)
        if seed is not None:  # KerasTuner replaces a seed of 0 by a random one
            self.seed = self._seed_state = int(seed)
        self.max_paths = max_trials
        self.max_epochs = max_epochs
        self.search = search_module.make_search(search)
        if self.search.name == "random" and max_trials is None:
            raise ValueError("random search needs max_trials (how many trials to sample)")
        options = {} if scheduler in (None, "full") or not isinstance(scheduler, str) else \
            {"min_epochs": min_epochs, "factor": factor}
        if scheduler == "pbt":
            options = {"population": population, "round_epochs": round_epochs,
                       "quantile": quantile, "seed": self.seed}
        self.scheduler = search_module.make_scheduler(scheduler, **options)
        self.median_stopping = median_stopping
        self.median_min_trials = median_min_trials
        self.checkpoint_dir = checkpoint_dir
        self.keep_leaf_checkpoints = keep_leaf_checkpoints
        self.share_stages = share_stages
        self.scheduling = scheduling
        self.lease_seconds = float(lease_seconds)
        self.stage_store = None
        if stage_store is not None:
            from tfweave.hippo.stage_store import StageStore
            self.stage_store = StageStore(stage_store)
        self._leases: dict[str, float] = {}  # running stage trial -> last renewal (monotonic)
        self._tuner_seen: dict[str, float] = {}  # tuner id -> last create_trial (monotonic)
        self._expired: list[str] = []  # stage trials whose lease ran out (late reports ignored)
        self._timeline_open: dict[str, dict] = {}  # running stage trial -> hand-out record
        # Diagnostics, kept in memory only (the oracle state is rewritten on every stage): a
        # restarted chief's timeline starts at the restart.
        self._timeline: list[dict] = []
        self._requesting_tuner = None  # the tuner whose create_trial is being answered
        self._last_done_by: dict[str, str] = {}  # tuner id -> the stage it finished last
        self.tree = StageTree()
        self.paths: dict[str, dict] = {}
        self._path_trials: dict[str, trial_module.Trial] = {}
        self._stage_of_trial: dict[str, str] = {}
        self._reached: list[str] = []  # paths whose target stage just finished, to schedule
        self._last_done = None
        self._accounting = {"stages_run": 0, "executed_steps": 0, "executed_epochs": 0,
                            "checkpoint_bytes": 0, "checkpoint_seconds": 0.0,
                            "checkpoints_removed": 0, "checkpoints_unusable": 0,
                            "stages_lost": 0, "stage_seconds": 0.0, "stages_reused": 0,
                            "reused_steps": 0}
        self.space_fingerprint = None

    # --- paths ----------------------------------------------------------------------------------
    def _search_closed(self) -> bool:
        return self.search.exhausted or (self.max_paths is not None
                                         and len(self.paths) >= self.max_paths)

    def _active_paths(self) -> list[dict]:
        return [p for p in self.paths.values() if p["status"] == "pending"]

    def _admit_paths(self) -> None:
        if self.max_epochs is None:
            raise ValueError("StageTreeOracle needs max_epochs: pass it to the oracle/tuner or "
                             "call search(..., epochs=N)")
        if self.space_fingerprint is None:
            self.space_fingerprint = space_fingerprint(self.hyperparameters)
        while not self._search_closed() and self.scheduler.wants_path(self):
            lookahead = self.search.lookahead
            if lookahead is not None and len(self._active_paths()) >= lookahead:
                break
            values = self.search.propose(self)
            if values is None:
                self.search.exhausted = True
                break
            self._add_path(values)

    def _add_path(self, values: dict) -> None:
        path = {"id": f"t{len(self.paths):04d}", "values": dict(values), "status": "pending",
                "message": None, "target": 0, "leaf": None, "rung": 0}
        self.paths[path["id"]] = path
        self._tried_so_far.add(self._compute_values_hash(values))
        try:
            specs = schedules.specs_in(self.hyperparameters)
            found = schedules.evaluate_all(specs, values, self.max_epochs)
        except schedules.InvalidScheduleError as error:
            LOG.warning("trial %s is not run: %s", path["id"], error)
            self._finish_path(path, "failed", f"invalid schedule: {error}")
            return
        owned = {spec_name for spec in specs for spec_name in spec.hp_names}
        constants = {k: v for k, v in values.items() if k not in owned
                     and not k.startswith(schedules.SPEC_PREFIX) and not k.startswith(META)}
        if not self.share_stages:
            constants[META + "trial"] = path["id"]
        path["constants"] = constants
        path["schedules"] = [s.to_dict() for s in found]
        path["segments"] = _segments(found, self.max_epochs)
        self._extend_path(path, self.scheduler.assign(self, path))

    def _extend_path(self, path: dict, target: int) -> None:
        """Grafts the path up to ``target`` epochs onto the tree (promotion extends it)."""
        path["target"] = target
        segments = [(c, s, min(e, target)) for c, s, e in path["segments"] if s < target]
        path["leaf"] = self.tree.add_path(path["constants"], segments)
        nodes = self.tree.path(path["leaf"])
        for i, node in enumerate(nodes[1:], 1):
            if node.status == DONE:
                continue
            if node.status == FAILED:
                self._finish_path(path, "failed", f"stage {node.id} failed: {node.message}")
                return
            if node.status == CANCELLED:
                node.status = PENDING
            self._require_state(nodes[i - 1])
        if self.tree.nodes[path["leaf"]].status == DONE:
            self._reached.append(path["id"])

    def _require_state(self, node) -> None:
        """Makes sure training can start from ``node``, scheduling reruns where states are gone."""
        while not self.tree.has_state(node) and node.status in (DONE, CANCELLED):
            node.status = PENDING
            node = self.tree.nodes[node.parent]

    def _finish_path(self, path: dict, status: str, message: str | None = None) -> None:
        path["status"], path["message"] = status, message
        trial = self._path_trial(path)
        self._path_trials[path["id"]] = trial
        LOG.info("trial %s %s (%s epochs): %s", path["id"], status, self._reached_epochs(path),
                 trial.score if message is None else message)
        self.search.on_path_end(self, trial)
        self.scheduler.on_path_end(self, path)

    def _reached_epochs(self, path: dict) -> int:
        if not path.get("leaf"):
            return 0
        done = [n for n in self.tree.path(path["leaf"]) if n.status == DONE or n.is_root]
        return done[-1].end if done else 0

    def _path_score(self, path: dict, upto_epoch: int | None = None) -> float:
        best = self._best_epoch(path, upto_epoch)
        if best is None:
            return float("-inf") if self.objective.direction == "max" else float("inf")
        return best[1]

    def _best_epoch(self, path: dict, upto_epoch: int | None = None):
        """(epoch, objective value) of the path's best epoch (the first one on ties)."""
        if not path.get("leaf"):
            return None
        history = self.tree.history_along(path["leaf"])
        best = None
        for epoch in sorted(history):
            if upto_epoch is not None and epoch >= upto_epoch:
                break
            try:
                value = self.objective.get_value(history[epoch])
            except (KeyError, TypeError):
                continue
            if value is None or value != value:
                continue
            better = best is None or (value > best[1] if self.objective.direction == "max"
                                      else value < best[1])
            if better:
                best = (epoch, value)
        return best

    def _path_trial(self, path: dict) -> trial_module.Trial:
        """The KerasTuner ``Trial`` a user sees for a path: its values, metrics and score."""
        hps = self.hyperparameters.copy()
        values = dict(path["values"])
        reached = self._reached_epochs(path)
        best = self._best_epoch(path, reached)
        values[META + "epochs"] = reached
        if path.get("leaf"):
            values[META + "leaf"] = path["leaf"]
            leaf = self.tree.nodes[path["leaf"]]
            if leaf.status == DONE and leaf.checkpoint:
                values[META + "final_checkpoint"] = leaf.checkpoint
        if best is not None:
            holder = next(n for n in self.tree.path(path["leaf"]) if n.start <= best[0] < n.end)
            values[META + "best_stage_trial"] = holder.trial_id
        hps.values = values
        status = (trial_module.TrialStatus.FAILED if path["status"] == "failed"
                  else trial_module.TrialStatus.COMPLETED if path["status"] in ("completed", "stopped")
                  else trial_module.TrialStatus.RUNNING)
        trial = trial_module.Trial(hps, trial_id=path["id"], status=status,
                                   message=path["message"])
        if path.get("leaf"):
            for epoch, metrics in sorted(self.tree.history_along(path["leaf"]).items()):
                if epoch >= reached:
                    break
                for name, value in metrics.items():
                    if not trial.metrics.exists(name):
                        trial.metrics.register(name, direction=_direction_for(self.objective, name))
                    trial.metrics.update(name, value, step=epoch)
        if best is not None:
            trial.score, trial.best_step = best[1], best[0]
        return trial

    # --- KerasTuner's oracle interface -------------------------------------------------------------
    def populate_space(self, trial_id):
        self._admit_paths()
        self._process_reached()
        node = self._next_stage()
        if node is None and not any(n.status == RUNNING for n in self.tree.nodes.values()):
            if self._search_closed():
                self.scheduler.finalize(self)
                self._process_reached()
            self._admit_paths()
            self._process_reached()
            node = self._next_stage()
        if node is None:
            if any(n.status == RUNNING for n in self.tree.nodes.values()):
                return {"status": trial_module.TrialStatus.IDLE, "values": None}
            for path in self._active_paths():  # nothing can run them any more
                self._finish_path(path, "failed", "no runnable stage left on its path")
            return {"status": trial_module.TrialStatus.STOPPED, "values": None}
        node.status = RUNNING
        self._stage_of_trial[trial_id] = node.id
        # Wall-clock span of the study's training, for makespan against the critical path.
        self._accounting.setdefault("first_stage_start", time.time())
        return {"status": trial_module.TrialStatus.RUNNING, "values": self._stage_values(node)}

    def _adopt_stored_stages(self) -> None:
        """Marks ready stages another study already trained as done, with their results."""
        if self.stage_store is None:
            return
        self.stage_store.check(self.space_fingerprint, self.seed)
        adopted = True
        while adopted:
            adopted = False
            for node in self.tree.ready():
                record = self.stage_store.lookup(node.id)
                if record is None or (record["start"], record["end"]) != (node.start, node.end):
                    continue
                node.history = {e: m for e, m in record["history"].items()
                                if node.start <= e < node.end}
                node.steps, node.seconds = int(record["steps"]), float(record["seconds"])
                node.status, node.checkpoint = DONE, record["checkpoint"]
                self._accounting["stages_reused"] = self._accounting.get("stages_reused", 0) + 1
                self._accounting["reused_steps"] = \
                    self._accounting.get("reused_steps", 0) + node.steps
                for path in self._active_paths():
                    if path["leaf"] == node.id:
                        self._reached.append(path["id"])
                adopted = True
            if adopted:
                self._process_reached()

    def _next_stage(self):
        self._adopt_stored_stages()
        ready = self.tree.ready()
        if not ready:
            return None
        order = {node_id: i for i, node_id in enumerate(self.tree.nodes)}
        if self.scheduling == "critical_path":
            # Longest remaining path first bounds the makespan of parallel workers; ties go
            # depth first (the state just trained may still be in a worker's memory).
            # Equal estimates go to the longer chain of stages: each stage adds a hand-out
            # and a report, and a chain cannot be split over workers.
            remaining, chain = self.remaining_seconds(), self.remaining_stages()
            warm = self._warm_stage()
            return max(ready, key=lambda n: (round(remaining[n.id], 9), chain[n.id],
                                             n.parent == warm, n.start, -order[n.id]))
        # Depth first from the stage just finished: its state is still in the tuner's memory and
        # its trials reach their ends (and scores) sooner.
        warm = self._warm_stage()
        return max(ready, key=lambda n: (n.parent == warm, n.start, -order[n.id]))

    def _warm_stage(self):
        """The stage whose end state the asking worker's model holds: the last one it finished
        (a stage continuing from it needs no checkpoint load)."""
        return self._last_done_by.get(self._requesting_tuner, self._last_done)

    # --- critical path -------------------------------------------------------------------------------
    def step_seconds(self) -> float:
        """Seconds per training step, estimated online from the stages done so far (1 before)."""
        done = [n for n in self.tree.nodes.values() if n.steps and n.seconds]
        steps = sum(n.steps for n in done)
        return sum(n.seconds for n in done) / steps if steps else 1.0

    def estimated_stage_seconds(self, node) -> float:
        if node.steps:
            return node.steps * self.step_seconds()
        done = [n for n in self.tree.nodes.values() if n.steps and n.length]
        per_epoch = (sum(n.steps for n in done) / sum(n.length for n in done)) if done else 1.0
        return node.length * per_epoch * self.step_seconds()

    def remaining_seconds(self) -> dict:
        """Per node: estimated seconds of its stage plus the longest still-needed path below it
        (pending or running stages only: done and cancelled ones cost nothing more)."""
        out = {}
        for node in sorted(self.tree.nodes.values(), key=lambda n: -n.end):
            below = [out[c] for c in node.children
                     if self.tree.nodes[c].status in (PENDING, RUNNING)]
            own = self.estimated_stage_seconds(node) if node.status in (PENDING, RUNNING) else 0.0
            out[node.id] = own + max(below, default=0.0)
        return out

    def remaining_stages(self) -> dict:
        """Per node: the most still-needed stages on a chain from it down to a leaf."""
        out = {}
        for node in sorted(self.tree.nodes.values(), key=lambda n: -n.end):
            below = [out[c] for c in node.children
                     if self.tree.nodes[c].status in (PENDING, RUNNING)]
            out[node.id] = int(node.status in (PENDING, RUNNING)) + max(below, default=0)
        return out

    def makespan_seconds(self) -> float:
        """Wall time from the first stage handed out to the last one finished."""
        acc = self._accounting
        if "first_stage_start" not in acc or "last_stage_end" not in acc:
            return 0.0
        return acc["last_stage_end"] - acc["first_stage_start"]

    def critical_path_seconds(self) -> float:
        """The study's critical path in measured seconds: the longest root-to-leaf chain of
        stages as they ran (a lower bound on any schedule's makespan, however many workers).
        Stages adopted from a stage store cost this study nothing and count zero."""
        longest = {}
        for node in sorted(self.tree.nodes.values(), key=lambda n: n.end):
            parent = longest.get(node.parent, 0.0) if node.parent else 0.0
            ran = node.status == DONE and node.runs > 0
            longest[node.id] = parent + (node.seconds if ran else 0.0)
        return max(longest.values(), default=0.0)

    def _stage_values(self, node) -> dict:
        through = self._paths_through(node.id, active_only=True) or \
            self._paths_through(node.id, active_only=False)
        parent = self.tree.nodes[node.parent]
        values = dict(through[0]["values"])
        values.update({
            META + "stage": node.id,
            META + "parent": parent.id,
            META + "root": self.tree.root_of(node.id).id,
            META + "initial_epoch": node.start,
            META + "epochs": node.end,
            META + "parent_checkpoint": "" if parent.is_root else parent.checkpoint,
            META + "checkpoint": self._checkpoint_path(node.id),
            META + "config": json.dumps(node.config, sort_keys=True),
            META + "seed": int(self.seed),
            META + "trials": len(through),
            META + "lease_seconds": self.lease_seconds,
        })
        return values

    def _paths_through(self, node_id: str, active_only: bool) -> list[dict]:
        out = []
        for path in self.paths.values():
            if not path.get("leaf") or (active_only and path["status"] != "pending"):
                continue
            if any(n.id == node_id for n in self.tree.path(path["leaf"])):
                out.append(path)
        return out

    def _checkpoint_path(self, node_id: str) -> str:
        if self.stage_store is not None:
            storage.makedirs(self.stage_store.directory)
            return self.stage_store.checkpoint_path(node_id)
        directory = self.checkpoint_dir or os.path.join(self._project_dir, "hippo_checkpoints")
        storage.makedirs(directory)
        return os.path.join(directory, f"stage_{node_id}.ckpt")

    # --- distributed mode: leases ------------------------------------------------------------------
    @_synchronized
    def create_trial(self, tuner_id):
        self._tuner_seen[tuner_id] = time.monotonic()
        self._requesting_tuner = tuner_id
        known = self.ongoing_trials.get(tuner_id)
        trial = super().create_trial(tuner_id)
        if trial.status == trial_module.TrialStatus.RUNNING:
            self._leases[trial.trial_id] = time.monotonic()
            if known is None or known.trial_id != trial.trial_id:
                self._timeline_open[trial.trial_id] = {
                    "stage": self._stage_of_trial.get(trial.trial_id), "tuner": tuner_id,
                    "handed_out": time.time()}
        return trial

    @_synchronized
    def expire_leases(self) -> list[str]:
        """Hands stages whose workers stopped renewing their lease back to the queue."""
        now, expired = time.monotonic(), []
        for tuner_id, trial in list(self.ongoing_trials.items()):
            renewed = self._leases.get(trial.trial_id)
            if renewed is None or now - renewed <= self.lease_seconds:
                continue
            expired.append(trial.trial_id)
            self.ongoing_trials.pop(tuner_id)
            self.tuner_ids.discard(tuner_id)
            self._tuner_seen.pop(tuner_id, None)
            self._leases.pop(trial.trial_id, None)
            self._expired.append(trial.trial_id)
            stored = self.trials[trial.trial_id]
            stored.status = trial_module.TrialStatus.INVALID
            stored.message = (f"worker {tuner_id} stopped renewing its lease for "
                              f"{self.lease_seconds:.0f} s")
            self.end_order.append(trial.trial_id)
            self._save_trial(stored)
            node_id = self._stage_of_trial.get(trial.trial_id)
            node = self.tree.nodes.get(node_id) if node_id else None
            if node is not None and node.status == RUNNING:
                node.status = PENDING
                self._require_state(self.tree.nodes[node.parent])
                self._accounting["stages_lost"] += 1
                LOG.warning("stage %s (epochs %d-%d): %s; it reruns from its parent's "
                            "checkpoint", node.id, node.start, node.end, stored.message)
        if expired:
            self.save()
        return expired

    @_synchronized
    def study_finished(self, stop_sent: bool) -> bool:
        """Chief: the study is over and every worker still alive has been told so."""
        if not stop_sent or self.ongoing_trials:
            return False
        now = time.monotonic()
        # A worker that vanished while waiting never asks again: wait out one lease.
        return all(now - self._tuner_seen.get(t, 0.0) > self.lease_seconds
                   for t in self.tuner_ids)

    @_synchronized
    def end_trial(self, trial):
        stored = self.trials.get(trial.trial_id)
        if trial.trial_id in self._expired or (
                stored is not None and trial.trial_id in self.end_order
                and stored.status in (trial_module.TrialStatus.COMPLETED,
                                      trial_module.TrialStatus.FAILED)):
            # A worker thought dead, or a report repeated across a chief restart: the stage
            # was (or is being) run again and this result must not count twice.
            LOG.warning("ignoring a late report of stage trial %s (%s)", trial.trial_id,
                        trial.status)
            return
        self._leases.pop(trial.trial_id, None)
        self._adopt_reported_metrics(trial)
        node_id = self._stage_of_trial.get(trial.trial_id) or \
            trial.hyperparameters.values.get(META + "stage")
        message = trial.message or ""
        if trial.status != trial_module.TrialStatus.COMPLETED and \
                checkpoints.UNUSABLE_TAG in message:
            self._parent_state_unusable(trial, node_id)
        else:
            # KerasTuner's end_trial saves the oracle with the stage trial ended but the tree not
            # yet updated; the one save below (before this returns to the worker) covers both,
            # so a crash in between leaves the previous consistent state and the report repeats.
            self._saving_deferred = True
            try:
                super().end_trial(trial)
            finally:
                self._saving_deferred = False
            stored = self.trials[trial.trial_id]
            if node_id is not None and stored.status == trial_module.TrialStatus.COMPLETED:
                self._stage_done(self.tree.nodes[node_id], stored)
            elif node_id is not None and stored.status == trial_module.TrialStatus.FAILED:
                self._stage_failed(self.tree.nodes[node_id], stored)
            # INVALID with retries left: KerasTuner reruns the same stage trial.
        self._process_reached()
        self._collect_garbage()
        self.save()

    def _adopt_reported_metrics(self, trial) -> None:
        """A worker sends a stage's per-epoch metrics with ``end_trial`` (one call per stage,
        instead of an ``update_trial`` per epoch); they go where ``update_trial`` puts them."""
        stored = self.trials.get(trial.trial_id)
        if stored is None:
            return
        for name, history in trial.metrics.metrics.items():
            if not stored.metrics.exists(name):
                stored.metrics.metrics[name] = history

    def _parent_state_unusable(self, trial, node_id) -> None:
        stored = self.trials[trial.trial_id]
        stored.status, stored.message = trial_module.TrialStatus.INVALID, trial.message
        self.end_order.append(trial.trial_id)
        self._save_trial(stored)
        for tuner_id, ongoing in list(self.ongoing_trials.items()):
            if ongoing.trial_id == trial.trial_id:
                self.ongoing_trials.pop(tuner_id)
        node = self.tree.nodes[node_id]
        parent = self.tree.nodes[node.parent]
        LOG.warning("stage %s could not start: %s", node_id,
                    message_line(trial.message, checkpoints.UNUSABLE_TAG))
        self._accounting["checkpoints_unusable"] += 1
        node.status = PENDING
        if parent.checkpoint:
            storage.remove(parent.checkpoint)
        parent.checkpoint = None
        self._require_state(parent)

    def _stage_done(self, node, trial) -> None:
        history, extras = {}, {}
        for name in trial.metrics.metrics:
            for observation in trial.metrics.get_history(name):
                if name in _ACCOUNTING_METRICS:
                    extras[name] = observation.mean()
                else:
                    history.setdefault(int(observation.step), {})[name] = observation.mean()
        node.history = {e: m for e, m in history.items() if node.start <= e < node.end}
        node.steps = int(extras.get(STEPS_METRIC, 0))
        node.seconds = float(extras.get(SECONDS_METRIC, 0.0))
        node.status, node.runs, node.trial_id = DONE, node.runs + 1, trial.trial_id
        node.checkpoint = trial.hyperparameters.values.get(META + "checkpoint")
        accounting = self._accounting
        accounting["stages_run"] += 1
        accounting["executed_steps"] += node.steps
        accounting["executed_epochs"] += node.length
        accounting["checkpoint_bytes"] += int(extras.get(CKPT_BYTES_METRIC, 0))
        accounting["checkpoint_seconds"] += float(extras.get(CKPT_SECONDS_METRIC, 0.0))
        accounting["stage_seconds"] = accounting.get("stage_seconds", 0.0) + node.seconds
        self._last_done = node.id
        accounting["last_stage_end"] = time.time()
        self._record_timeline(node, trial, extras, accounting["last_stage_end"])
        if self.stage_store is not None and node.checkpoint:
            self.stage_store.publish(node)
        if self.median_stopping:
            self._median_stop(node)
        for path in self._active_paths():
            if path["leaf"] == node.id:
                self._reached.append(path["id"])

    def _record_timeline(self, node, trial, extras: dict, ended: float) -> None:
        """One entry per stage run: when the chief handed it out and heard back, and the
        worker's own clock of load, fit and checkpoint save (``hippo.timeline`` reads them)."""
        entry = self._timeline_open.pop(trial.trial_id, None) or {"stage": node.id}
        if entry.get("tuner"):
            self._last_done_by[entry["tuner"]] = node.id
        entry.update({"stage": node.id, "ended": ended, "steps": node.steps,
                      "seconds": node.seconds,
                      "load": float(extras.get(LOAD_SECONDS_METRIC, 0.0)),
                      "fit": float(extras.get(FIT_SECONDS_METRIC, 0.0)),
                      "save": float(extras.get(CKPT_SECONDS_METRIC, 0.0)),
                      "started": _unphase(extras.get(STARTED_AT_METRIC), entry.get("handed_out"),
                                          after=True),
                      "finished": _unphase(extras.get(FINISHED_AT_METRIC), ended, after=False)})
        self._timeline.append(entry)

    def _stage_failed(self, node, trial) -> None:
        node.status, node.message = FAILED, message_line(trial.message)
        LOG.warning("stage %s (epochs %d-%d) failed: %s", node.id, node.start, node.end,
                    node.message)
        for path in self._paths_through(node.id, active_only=True):
            self._finish_path(path, "failed", f"stage {node.id} (epochs {node.start}-"
                                              f"{node.end}) failed: {node.message}")
        for descendant in self.tree.descendants(node.id):
            if descendant.status == PENDING:
                descendant.status = CANCELLED

    def _process_reached(self) -> None:
        while self._reached:
            path = self.paths[self._reached.pop(0)]
            if path["status"] == "pending" and not path.get("waiting"):
                self.scheduler.on_reached(self, path)
        self._cancel_unneeded()

    def _median_stop(self, node) -> None:
        epoch = node.end
        reached = [p for p in self.paths.values() if self._reached_epochs(p) >= epoch
                   and p["status"] != "failed"]
        for path in self._paths_through(node.id, active_only=True):
            if path["leaf"] == node.id:
                continue
            others = [self._path_score(p, epoch) for p in reached if p["id"] != path["id"]]
            if len(others) < self.median_min_trials:
                continue
            median, mine = statistics.median(others), self._path_score(path, epoch)
            worse = mine < median if self.objective.direction == "max" else mine > median
            if worse:
                self._finish_path(path, "stopped", f"median stopping at epoch {epoch}: best "
                                  f"{self.objective.name} {mine:.4g} < median {median:.4g}")

    def _cancel_unneeded(self) -> None:
        needed = set()
        for path in self._active_paths():
            needed.update(n.id for n in self.tree.path(path["leaf"]))
        for node in self.tree.nodes.values():
            if node.status == PENDING and node.id not in needed:
                node.status = CANCELLED

    def _collect_garbage(self) -> None:
        """Removes checkpoints no pending stage, waiting trial or kept leaf needs."""
        needed = set()
        for node in self.tree.nodes.values():
            if node.status in (PENDING, RUNNING) and node.parent:
                needed.add(node.parent)
        for path in self.paths.values():
            if path.get("leaf") and path["status"] == "pending":
                # Also states further along its schedule: a promotion may continue from them.
                needed.update(self.tree.existing_along(path["constants"], path["segments"]))
            elif path.get("leaf") and self.keep_leaf_checkpoints and \
                    path["status"] in ("completed", "stopped"):
                needed.add(path["leaf"])
        for node in self.tree.nodes.values():
            if self.stage_store is not None:
                break  # published states belong to every study using the store
            if node.checkpoint and node.status == DONE and node.id not in needed:
                storage.remove(node.checkpoint)
                node.checkpoint = None
                self._accounting["checkpoints_removed"] += 1

    # --- results ---------------------------------------------------------------------------------
    def get_best_trials(self, num_trials=1):
        finished = [self._path_trials[p] for p in self.paths if p in self._path_trials]
        completed = [t for t in finished if t.status == trial_module.TrialStatus.COMPLETED
                     and t.score is not None]
        ranked = sorted(completed, key=lambda t: t.score,
                        reverse=self.objective.direction == "max")
        ranked += [t for t in finished if t not in ranked]
        return ranked[:num_trials]

    def get_trial(self, trial_id):
        if trial_id in self._leases:  # a worker's heartbeat
            self._leases[trial_id] = time.monotonic()
        if trial_id in self._path_trials:
            return self._path_trials[trial_id]
        return super().get_trial(trial_id)

    def accounting(self) -> dict:
        """Steps executed against a trial-based run of the same study, and checkpoint costs."""
        trial_based_steps = trial_based_epochs = 0
        for path in self.paths.values():
            if path.get("leaf"):
                trial_based_steps += sum(n.steps for n in self.tree.path(path["leaf"]))
                trial_based_epochs += self._reached_epochs(path)
        out = dict(self._accounting)
        out["timeline"] = list(self._timeline)
        out.update({
            "trials": len(self.paths),
            "trials_completed": sum(p["status"] == "completed" for p in self.paths.values()),
            "trials_failed": sum(p["status"] == "failed" for p in self.paths.values()),
            "trials_stopped": sum(p["status"] == "stopped" for p in self.paths.values()),
            "stages": sum(1 for n in self.tree.nodes.values() if not n.is_root),
            "unique_steps": self.tree.unique_steps(),
            "unique_epochs": self.tree.unique_epochs(),
            "trial_based_steps": trial_based_steps,
            "trial_based_epochs": trial_based_epochs,
        })
        executed = out["executed_steps"]
        out["step_savings"] = trial_based_steps / executed if executed else float("nan")
        return out

    # --- state -----------------------------------------------------------------------------------
    def get_state(self):
        state = super().get_state()
        state["hippo"] = {
            "max_epochs": self.max_epochs, "max_paths": self.max_paths,
            "tree": self.tree.get_state(), "paths": self.paths,
            "stage_of_trial": self._stage_of_trial, "reached": self._reached,
            "last_done": self._last_done, "accounting": self._accounting,
            "search": {"name": self.search.name, "state": self.search.get_state()},
            "scheduler": {"name": self.scheduler.name, "state": self.scheduler.get_state()},
            "space_fingerprint": self.space_fingerprint,
            "expired": self._expired,
        }
        return state

    def set_state(self, state):
        super().set_state(state)
        hippo = state["hippo"]
        if hippo["search"]["name"] != self.search.name or \
                hippo["scheduler"]["name"] != self.scheduler.name:
            raise ValueError(
                f"the study in {self._project_dir} ran search {hippo['search']['name']!r} with "
                f"scheduler {hippo['scheduler']['name']!r}; this oracle has {self.search.name!r} "
                f"/ {self.scheduler.name!r}. Use a new project_name or overwrite=True")
        if self.max_epochs is None:
            self.max_epochs = hippo["max_epochs"]
        elif hippo["max_epochs"] not in (None, self.max_epochs):
            raise ValueError(
                f"the study in {self._project_dir} trains {hippo['max_epochs']} epochs per trial, "
                f"this oracle {self.max_epochs}: use a new project_name or overwrite=True")
        self.tree = StageTree.from_state(hippo["tree"])
        self.paths = hippo["paths"]
        self._stage_of_trial = hippo["stage_of_trial"]
        self._reached = hippo["reached"]
        self._last_done = hippo["last_done"]
        self._accounting = hippo["accounting"]
        self.search.set_state(hippo["search"]["state"])
        self.scheduler.set_state(hippo["scheduler"]["state"])
        self.space_fingerprint = hippo["space_fingerprint"]
        self._expired = list(hippo.get("expired", []))
        self._ongoing_at_save = dict(self.ongoing_trials)
        self._path_trials = {p["id"]: self._path_trial(p) for p in self.paths.values()
                             if p["status"] != "pending"}

    def save(self):
        if getattr(self, "_saving_deferred", False):
            return
        # KerasTuner writes oracle.json in place; a crash mid-write would lose the study.
        # Compact: the chief writes it on every stage hand-out and report.
        storage.atomic_write_json(self._get_oracle_fname(), self.get_state(), compact=True)
        storage.atomic_write_json(os.path.join(self._project_dir, "stage_tree.json"),
                                  self.tree.get_state())

    def reload(self):
        super().reload()
        from tfweave.hippo import distributed
        if distributed.is_chief():
            # A restarted chief: workers may still be training the stages that were running;
            # give them a fresh lease instead of rerunning (expiry reruns those that are gone).
            now = time.monotonic()
            self.ongoing_trials = dict(getattr(self, "_ongoing_at_save", {}))
            for tuner_id, trial in self.ongoing_trials.items():
                trial.status = trial_module.TrialStatus.RUNNING
                # Saved before KerasTuner's display noted the start: its end would fail.
                self._display.trial_start.setdefault(trial.trial_id, datetime.datetime.now())
                self._display.trial_number.setdefault(
                    trial.trial_id, self.start_order.index(trial.trial_id) + 1
                    if trial.trial_id in self.start_order else len(self.trials))
                self._leases[trial.trial_id] = now
                self._tuner_seen[tuner_id] = now
                self.tuner_ids.add(tuner_id)
            self._retry_queue = []
            return
        # Stages that were running when the process stopped run again from their parents.
        for trial_id in self._retry_queue:
            node_id = self._stage_of_trial.get(trial_id)
            if node_id and self.tree.nodes[node_id].status == RUNNING:
                self.tree.nodes[node_id].status = PENDING
                self.trials[trial_id].status = trial_module.TrialStatus.INVALID
        self._retry_queue = []
        for node in self.tree.nodes.values():
            if node.status == RUNNING:
                node.status = PENDING


def _segments(found: list, max_epochs: int) -> list:
    """Cuts [0, max_epochs) wherever any schedule changes: (config, start, end) per piece."""
    cuts = sorted({b for s in found for b in s.boundaries if 0 < b < max_epochs})
    edges = [0] + cuts + [max_epochs]
    segments = []
    for start, end in zip(edges, edges[1:]):
        config = {s.name: s.value_at(start) for s in found}
        if segments and segments[-1][0] == config:
            segments[-1] = (config, segments[-1][1], end)
        else:
            segments.append((config, start, end))
    return segments


def _unphase(phase, near, after: bool):
    """The wall-clock time whose ``CLOCK_PHASE_SECONDS`` phase is ``phase``, just after (or
    just before) ``near``; None when either is unknown."""
    if phase is None or near is None:
        return None
    shift = (float(phase) - near) % CLOCK_PHASE_SECONDS
    return near + shift if after else near - ((near - float(phase)) % CLOCK_PHASE_SECONDS)


def _direction_for(objective, name):
    if isinstance(objective, keras_tuner.Objective) and objective.name == name:
        return objective.direction
    return _inferred_direction(name)


@functools.lru_cache(maxsize=None)
def _inferred_direction(name: str) -> str:
    # KerasTuner infers a metric's direction by instantiating the Keras metric of that name
    # (variables and all), once per registration: a chief finishing a rung of paths did it
    # thousands of times. Same answer, once per name.
    from keras_tuner.src.engine import metrics_tracking
    return metrics_tracking.infer_metric_direction(name) or "min"


def message_line(message: str | None, containing: str | None = None) -> str:
    """The informative line of a traceback: the one with ``containing``, else the last."""
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    if containing:
        for line in lines:
            if containing in line:
                return line
    return lines[-1] if lines else "(no message)"
