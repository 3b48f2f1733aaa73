"""Search algorithms (which trials) and budget schedulers (how far each trial trains).

A *search* proposes hyper-parameter values: grid, random, or KerasTuner's own Bayesian
optimization. A *scheduler* decides how many epochs a trial gets: the full budget, or successive
halving / ASHA / Hyperband, where promoting a trial extends its path in the stage tree (its
prefix is already trained). Both keep JSON state inside the oracle's state.
"""

from __future__ import annotations

import logging
import math
import random

LOG = logging.getLogger("tfweave.hippo")


# --- searches -------------------------------------------------------------------------------------

class GridSearch:
    """Every combination, in KerasTuner's GridSearch order (default value first, last hp fastest)."""

    name = "grid"
    lookahead = None  # non-adaptive: the whole study can be grafted onto the tree up front

    def __init__(self):
        self.index = 0
        self.exhausted = False

    def propose(self, oracle) -> dict | None:
        axes = []
        for hp in oracle.hyperparameters.space:
            values = list(hp.values) if hasattr(hp, "values") else [hp.default]
            if hp.default in values:
                values.remove(hp.default)
            axes.append((hp.name, [hp.default] + values))
        total = math.prod(len(v) for _, v in axes)
        if self.index >= total:
            return None
        rest, values = self.index, {}
        for name, choices in reversed(axes):
            rest, digit = divmod(rest, len(choices))
            values[name] = choices[digit]
        self.index += 1
        return {name: values[name] for name, _ in axes}

    def on_path_end(self, oracle, trial) -> None:
        pass

    def get_state(self) -> dict:
        return {"index": self.index, "exhausted": self.exhausted}

    def set_state(self, state: dict) -> None:
        self.index, self.exhausted = state["index"], state["exhausted"]


class RandomSearch(GridSearch):
    """KerasTuner's random sampling (the oracle's own seeded ``_random_values``)."""

    name = "random"

    def propose(self, oracle) -> dict | None:
        return oracle._random_values()


class BayesianSearch(GridSearch):
    """KerasTuner's ``BayesianOptimizationOracle``, fed with finished trials' scores.

    Adaptive, so only ``lookahead`` trials are in flight at once; each new one still grafts onto
    every prefix already trained.
    """

    name = "bayesian"

    def __init__(self, lookahead: int = 2, num_initial_points=None, alpha=1e-4, beta=2.6):
        super().__init__()
        self.lookahead = lookahead
        self.options = {"num_initial_points": num_initial_points, "alpha": alpha, "beta": beta}
        self._inner = None
        self._records = []  # [trial_id, values, status, score]

    def _oracle(self, oracle):
        from keras_tuner.src.engine import trial as trial_module
        from keras_tuner.src.tuners.bayesian import BayesianOptimizationOracle

        if self._inner is None:
            self._inner = BayesianOptimizationOracle(
                objective=oracle.objective, seed=oracle.seed, **self.options)
            for trial_id, values, status, score in self._records:
                self._inner.trials[trial_id] = self._trial(oracle, trial_id, values, status, score)
                if status == trial_module.TrialStatus.RUNNING:
                    self._inner.ongoing_trials[trial_id] = self._inner.trials[trial_id]
        space = oracle.hyperparameters.copy()
        self._inner.hyperparameters = space
        self._inner._seed_state = oracle._seed_state
        self._inner._tried_so_far = oracle._tried_so_far
        return self._inner

    @staticmethod
    def _trial(oracle, trial_id, values, status, score):
        from keras_tuner.src.engine import trial as trial_module
        hps = oracle.hyperparameters.copy()
        hps.values = dict(values)
        trial = trial_module.Trial(hps, trial_id=trial_id, status=status)
        trial.score = score
        return trial

    def propose(self, oracle) -> dict | None:
        inner = self._oracle(oracle)
        trial_id = f"b{len(self._records):04d}"
        response = inner.populate_space(trial_id)
        oracle._seed_state = inner._seed_state
        if response["status"] != "RUNNING":
            return None
        values = response["values"]
        self._records.append([trial_id, values, "RUNNING", None])
        trial = self._trial(oracle, trial_id, values, "RUNNING", None)
        inner.trials[trial_id] = trial
        inner.ongoing_trials[trial_id] = trial
        return values

    def on_path_end(self, oracle, trial) -> None:
        inner = self._oracle(oracle)
        for record in self._records:
            if record[2] == "RUNNING" and \
                    _user_values(record[1]) == _user_values(trial.hyperparameters.values):
                record[2] = trial.status if trial.score is not None else "FAILED"
                record[3] = trial.score
                inner_trial = inner.trials[record[0]]
                inner_trial.status, inner_trial.score = record[2], record[3]
                inner.ongoing_trials.pop(record[0], None)
                return

    def get_state(self) -> dict:
        return {**super().get_state(), "records": self._records}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._records = state["records"]
        self._inner = None


def _user_values(values: dict) -> dict:
    return {k: v for k, v in values.items() if not k.startswith("hippo/")}


def make_search(search):
    if isinstance(search, GridSearch):
        return search
    table = {"grid": GridSearch, "random": RandomSearch, "bayesian": BayesianSearch}
    if search not in table:
        raise ValueError(f"unknown search {search!r}: use one of {sorted(table)} or an instance")
    return table[search]()


# --- schedulers -----------------------------------------------------------------------------------

class FullBudget:
    """Every trial trains for ``max_epochs``."""

    name = "full"

    def wants_path(self, oracle) -> bool:
        return True

    def assign(self, oracle, path) -> int:
        return oracle.max_epochs

    def on_reached(self, oracle, path) -> None:
        oracle._finish_path(path, "completed")

    def on_path_end(self, oracle, path) -> None:
        pass

    def finalize(self, oracle) -> None:
        pass

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass


class SuccessiveHalving(FullBudget):
    """Successive halving in brackets; promotion extends a trial's path to the next rung.

    One bracket of unbounded size is SHA (synchronous: a rung is decided once all its trials have
    reached it) or ASHA (``asynchronous=True``: a trial is promoted as soon as it ranks in the top
    ``1/factor`` of those that reached its rung). ``Hyperband`` uses several brackets.
    """

    name = "sha"

    def __init__(self, min_epochs: int = 1, factor: int = 3, asynchronous: bool = False):
        if factor < 2:
            raise ValueError(f"successive halving needs factor >= 2, got {factor}")
        if min_epochs < 1:
            raise ValueError(f"successive halving needs min_epochs >= 1, got {min_epochs}")
        self.min_epochs, self.factor, self.asynchronous = min_epochs, factor, asynchronous
        self.brackets = None  # [{"size": int|None, "rungs": [epochs...], "paths": [ids]}]

    def _make_brackets(self, max_epochs: int) -> list:
        return [{"size": None, "rungs": self._rungs(self.min_epochs, max_epochs), "paths": []}]

    def _rungs(self, first: int, max_epochs: int) -> list:
        rungs, epochs = [], first
        while epochs < max_epochs:
            rungs.append(epochs)
            epochs *= self.factor
        return rungs + [max_epochs]

    def wants_path(self, oracle) -> bool:
        if self.brackets is None:
            self.brackets = self._make_brackets(oracle.max_epochs)
        return any(b["size"] is None or len(b["paths"]) < b["size"] for b in self.brackets)

    def assign(self, oracle, path) -> int:
        for number, bracket in enumerate(self.brackets):
            if bracket["size"] is None or len(bracket["paths"]) < bracket["size"]:
                bracket["paths"].append(path["id"])
                path["bracket"], path["rung"] = number, 0
                return bracket["rungs"][0]
        raise RuntimeError("no bracket has room")  # wants_path said so

    def on_reached(self, oracle, path) -> None:
        bracket = self.brackets[path["bracket"]]
        if path["rung"] == len(bracket["rungs"]) - 1:
            oracle._finish_path(path, "completed")
            return
        path["waiting"] = True
        self._decide(oracle, path["bracket"])

    def on_path_end(self, oracle, path) -> None:
        if "bracket" in path:
            self._decide(oracle, path["bracket"])

    def finalize(self, oracle) -> None:
        # Nothing left to run: trials still waiting for a promotion are final as they are.
        for bracket_number in range(len(self.brackets or [])):
            self._decide(oracle, bracket_number, closing=True)
        for path in oracle.paths.values():
            if path.get("waiting"):
                path["waiting"] = False
                oracle._finish_path(path, "completed")

    def _decide(self, oracle, bracket_number: int, closing: bool = False) -> None:
        bracket = self.brackets[bracket_number]
        closed = closing or oracle._search_closed() or (
            bracket["size"] is not None and len(bracket["paths"]) >= bracket["size"])
        direction_max = oracle.objective.direction == "max"
        for rung in range(len(bracket["rungs"]) - 1):
            members = [oracle.paths[p] for p in bracket["paths"]
                       if oracle.paths[p]["rung"] >= rung]
            at_rung = [p for p in members if p["rung"] == rung]
            reached = [p for p in members
                       if p["rung"] > rung or p.get("waiting") or p["status"] != "pending"]
            promoted = sum(1 for p in members if p["rung"] > rung)
            if self.asynchronous:
                quota = len(reached) // self.factor
                pool = [p for p in reached if p["rung"] > rung or p.get("waiting")]
            else:
                if not closed or len(reached) < len(members):
                    continue  # a synchronous rung is decided once all its trials are in
                quota = max(1, len(members) // self.factor)
                pool = [p for p in members if p["rung"] > rung or p.get("waiting")]
            epochs = bracket["rungs"][rung]
            ranked = sorted(pool, key=lambda p: oracle._path_score(p, epochs), reverse=direction_max)
            for candidate in ranked[:quota]:
                if promoted >= quota:
                    break
                if candidate["rung"] == rung and candidate.get("waiting"):
                    candidate["waiting"], candidate["rung"] = False, rung + 1
                    promoted += 1
                    oracle._extend_path(candidate, bracket["rungs"][rung + 1])
            if not self.asynchronous:
                for p in at_rung:
                    if p.get("waiting"):
                        p["waiting"] = False
                        oracle._finish_path(p, "completed")

    def get_state(self) -> dict:
        return {"brackets": self.brackets}

    def set_state(self, state: dict) -> None:
        self.brackets = state["brackets"]


class Hyperband(SuccessiveHalving):
    """Hyperband's brackets (Li et al.), each a synchronous successive halving."""

    name = "hyperband"

    def __init__(self, min_epochs: int = 1, factor: int = 3):
        super().__init__(min_epochs, factor, asynchronous=False)

    def _make_brackets(self, max_epochs: int) -> list:
        s_max = 0
        while self.min_epochs * self.factor ** (s_max + 1) <= max_epochs:
            s_max += 1
        brackets = []
        for s in range(s_max, -1, -1):
            size = math.ceil((s_max + 1) / (s + 1) * self.factor ** s)
            first = max(self.min_epochs, math.ceil(max_epochs / self.factor ** s))
            brackets.append({"size": size, "rungs": self._rungs(first, max_epochs), "paths": []})
        return brackets


class PopulationBasedTraining(FullBudget):
    """Population-based training (Jaderberg et al.) as a stage tree.

    The search proposes ``population`` members; they train in synchronous rounds of
    ``round_epochs``. After a round, each member in the bottom ``quantile`` *exploits* a member
    drawn from the top ``quantile``: its path becomes the better member's path up to the round's
    end (so its next stage's parent is the better member's stage, trained once and shared), and
    *explores*: the next stage's configuration is the better member's, each float value
    multiplied by a factor drawn from ``factors``. Draws come from an RNG seeded with ``seed``
    and the round number, so a study is deterministic and resumes identically.
    """

    name = "pbt"

    def __init__(self, population: int = 4, round_epochs: int = 1, quantile: float = 0.25,
                 factors=(0.8, 1.2), seed: int = 0):
        if population < 2:
            raise ValueError(f"PBT needs population >= 2, got {population}")
        if round_epochs < 1:
            raise ValueError(f"PBT needs round_epochs >= 1, got {round_epochs}")
        if not 0.0 < quantile <= 0.5:
            raise ValueError(f"PBT needs 0 < quantile <= 0.5, got {quantile}")
        self.population, self.round_epochs, self.quantile = population, round_epochs, quantile
        self.factors, self.seed = tuple(factors), int(seed)
        self.rounds_done = 0
        self.events = []  # {"round", "epoch", "member", "from", "config"} per exploit

    def wants_path(self, oracle) -> bool:
        return len(oracle.paths) < self.population

    def assign(self, oracle, path) -> int:
        path["rung"] = 0
        return min(self.round_epochs, oracle.max_epochs)

    def on_reached(self, oracle, path) -> None:
        path["waiting"] = True
        self._decide(oracle)

    def on_path_end(self, oracle, path) -> None:
        self._decide(oracle)

    def finalize(self, oracle) -> None:
        self._decide(oracle)

    def _decide(self, oracle) -> None:
        members = [p for p in oracle.paths.values() if p["status"] == "pending"]
        if not members or len(oracle.paths) < self.population and not oracle._search_closed():
            return  # the population is not complete yet
        if not all(p.get("waiting") for p in members):
            return  # a round is decided once every live member has reached its end
        epoch = members[0]["target"]
        for p in members:
            p["waiting"] = False
        if epoch >= oracle.max_epochs:
            for p in members:
                oracle._finish_path(p, "completed")
            return
        direction_max = oracle.objective.direction == "max"
        # Rank by the last epoch's objective: PBT compares members as they are now.
        sign = -1.0 if direction_max else 1.0  # best first, ties by trial id
        ranked = sorted(members, key=lambda p: (sign * self._current(oracle, p, epoch), p["id"]))
        count = max(1, int(len(ranked) * self.quantile))
        top, bottom = ranked[:count], ranked[-count:] if len(ranked) >= 2 * count else []
        rng = random.Random(self.seed * 1_000_003 + self.rounds_done)
        for loser in bottom:
            winner = rng.choice(top)
            config = dict(self._config_at(winner, epoch))
            for name in sorted(config):
                if isinstance(config[name], float):
                    config[name] = config[name] * rng.choice(self.factors)
            loser.setdefault("initial_values", dict(loser["values"]))  # what it started as
            loser["constants"] = dict(winner["constants"])
            loser["values"] = dict(winner["values"])
            loser["segments"] = [(c, s, min(e, epoch)) for c, s, e in winner["segments"]
                                 if s < epoch] + [(config, epoch, oracle.max_epochs)]
            self.events.append({"round": self.rounds_done, "epoch": epoch, "member": loser["id"],
                                "from": winner["id"], "from_stage": winner["leaf"],
                                "config": config})
            LOG.info("PBT round %d: trial %s exploits %s at epoch %d, explores %s",
                     self.rounds_done, loser["id"], winner["id"], epoch, config)
        self.rounds_done += 1
        target = min(epoch + self.round_epochs, oracle.max_epochs)
        for p in members:
            p["rung"] += 1
            oracle._extend_path(p, target)

    @staticmethod
    def _current(oracle, path, epoch):
        history = oracle.tree.history_along(path["leaf"])
        try:
            value = oracle.objective.get_value(history[epoch - 1])
        except (KeyError, TypeError):
            value = None
        if value is None or value != value:
            return float("-inf") if oracle.objective.direction == "max" else float("inf")
        return value

    @staticmethod
    def _config_at(path, epoch):
        for config, start, end in path["segments"]:
            if start <= epoch - 1 < end:
                return config
        return path["segments"][-1][0]

    def get_state(self) -> dict:
        return {"rounds_done": self.rounds_done, "events": self.events}

    def set_state(self, state: dict) -> None:
        self.rounds_done, self.events = state["rounds_done"], state["events"]


def make_scheduler(scheduler, **options):
    if scheduler is None or scheduler == "full":
        return FullBudget()
    if isinstance(scheduler, FullBudget):
        return scheduler
    if scheduler == "sha":
        return SuccessiveHalving(**options)
    if scheduler == "asha":
        return SuccessiveHalving(asynchronous=True, **options)
    if scheduler == "hyperband":
        return Hyperband(**options)
    if scheduler == "pbt":
        return PopulationBasedTraining(**options)
    raise ValueError(f"unknown scheduler {scheduler!r}: use None, 'sha', 'asha', 'hyperband', "
                     f"'pbt' or an instance")
