"""Sequence-valued hyper-parameters: piecewise-constant schedules over epochs.

A schedule is declared inside a KerasTuner model-building function, next to ordinary
hyper-parameters::

    def build(hp):
        lr = hippo.HyperSchedule.step_decay(
            hp, "learning_rate", initial=hippo.Choice([0.1, 0.03]),
            milestones=[hippo.Choice([4, 6])], decay=hippo.Choice([0.1, 0.5]))
        ...

Each tunable part becomes an ordinary KerasTuner hyper-parameter (``learning_rate/initial``,
``learning_rate/milestone_0``, ``learning_rate/decay``), so KerasTuner's own search algorithms
sample them unchanged. How the parts combine is data, kept in a ``Fixed`` hyper-parameter
``hippo/schedule/<name>`` holding a JSON spec: the oracle evaluates schedules from trial values
alone (it never builds a model), which also holds in KerasTuner's distributed mode where the
chief only sees the search space.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

SPEC_PREFIX = "hippo/schedule/"

# What a schedule's value must satisfy, by the schedule's name; names not listed are free.
_NON_NEGATIVE = {"learning_rate", "weight_decay", "dropout", "momentum", "beta_1", "beta_2",
                 "epsilon", "augmentation"}
_BELOW_ONE = {"dropout", "momentum", "beta_1", "beta_2"}


class InvalidScheduleError(ValueError):
    """A schedule that cannot be trained: bad boundaries or values out of range."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """A tunable part of a schedule chosen from a list (``hp.Choice``)."""
    values: Sequence[Any]
    ordered: bool | None = None


@dataclasses.dataclass(frozen=True)
class Float:
    """A tunable real part of a schedule (``hp.Float``)."""
    min_value: float
    max_value: float
    step: float | None = None
    sampling: str = "linear"


@dataclasses.dataclass(frozen=True)
class Int:
    """A tunable integer part of a schedule, e.g. a boundary epoch (``hp.Int``)."""
    min_value: int
    max_value: int
    step: int = 1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A concrete piecewise-constant schedule: ``values[i]`` holds from ``boundaries[i-1]``.

    ``boundaries`` are the epochs where the value changes (strictly increasing, > 0).
    """
    name: str
    values: tuple
    boundaries: tuple

    def value_at(self, epoch: int):
        piece = 0
        while piece < len(self.boundaries) and epoch >= self.boundaries[piece]:
            piece += 1
        return self.values[piece]

    def __call__(self, epoch: int):
        return self.value_at(epoch)

    @property
    def initial(self):
        return self.values[0]

    def validate(self, max_epochs: int | None = None, hp_names: Sequence[str] = ()) -> None:
        """Raises InvalidScheduleError naming the schedule, its values and what to change."""
        where = f"schedule {self.name!r}" + (f" (hyper-parameters {', '.join(hp_names)})"
                                              if hp_names else "")
        if len(self.values) != len(self.boundaries) + 1:
            raise InvalidScheduleError(
                f"{where}: {len(self.values)} values need {len(self.values) - 1} boundaries, "
                f"got {len(self.boundaries)}")
        previous = 0
        for boundary in self.boundaries:
            if not isinstance(boundary, int) or isinstance(boundary, bool):
                raise InvalidScheduleError(f"{where}: boundary {boundary!r} is not an integer epoch")
            if boundary <= previous:
                raise InvalidScheduleError(
                    f"{where}: boundaries must be strictly increasing epochs above 0, got "
                    f"{list(self.boundaries)}; order the boundary hyper-parameters or give them "
                    f"disjoint ranges")
            previous = boundary
        if max_epochs is not None and self.boundaries and self.boundaries[-1] >= max_epochs:
            # A boundary at or past the last epoch never takes effect: almost always a mistake.
            raise InvalidScheduleError(
                f"{where}: boundary {self.boundaries[-1]} is not below max_epochs={max_epochs}")
        for value in self.values:
            _check_value(self.name, value, where)

    def to_dict(self) -> dict:
        return {"name": self.name, "values": list(self.values),
                "boundaries": list(self.boundaries)}


def _check_value(name: str, value, where: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise InvalidScheduleError(f"{where}: value {value!r} is not finite")
        if name in _NON_NEGATIVE and value < 0:
            raise InvalidScheduleError(f"{where}: {name} must not be negative, got {value!r}")
        if name in _BELOW_ONE and value >= 1:
            raise InvalidScheduleError(f"{where}: {name} must be below 1, got {value!r}")
        if name == "batch_size" and (not isinstance(value, int) or value <= 0):
            raise InvalidScheduleError(f"{where}: batch_size must be a positive integer, "
                                       f"got {value!r}")


# --- the spec: a tiny expression language over hyper-parameter names --------------------------
# An expression is {"const": x}, {"hp": name} or {"mul": [expr, expr]}.

def _hp_names(expression: dict) -> list[str]:
    if "hp" in expression:
        return [expression["hp"]]
    if "mul" in expression:
        return [n for part in expression["mul"] for n in _hp_names(part)]
    return []


def _evaluate(expression: dict, values: dict):
    if "const" in expression:
        return expression["const"]
    if "hp" in expression:
        try:
            return values[expression["hp"]]
        except KeyError:
            raise InvalidScheduleError(
                f"hyper-parameter {expression['hp']!r} used by a schedule has no value in this "
                f"trial") from None
    left, right = (_evaluate(part, values) for part in expression["mul"])
    return left * right


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """How a schedule's values and boundaries follow from hyper-parameter values."""
    name: str
    values: tuple  # expressions
    boundaries: tuple  # expressions

    @property
    def hp_names(self) -> list[str]:
        names = []
        for expression in self.values + self.boundaries:
            for name in _hp_names(expression):
                if name not in names:
                    names.append(name)
        return names

    def evaluate(self, values: dict) -> Schedule:
        return Schedule(self.name, tuple(_evaluate(e, values) for e in self.values),
                        tuple(_evaluate(e, values) for e in self.boundaries))

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "values": list(self.values),
                           "boundaries": list(self.boundaries)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ScheduleSpec":
        data = json.loads(text)
        return cls(data["name"], tuple(data["values"]), tuple(data["boundaries"]))


def specs_in(hyperparameters) -> list[ScheduleSpec]:
    """The schedule specs registered in a KerasTuner ``HyperParameters`` (space order)."""
    specs = []
    for hp in hyperparameters.space:
        if hp.name.startswith(SPEC_PREFIX):
            specs.append(ScheduleSpec.from_json(hp.value))
    return specs


def evaluate_all(specs: Sequence[ScheduleSpec], values: dict,
                 max_epochs: int | None = None) -> list[Schedule]:
    schedules = []
    for spec in specs:
        schedule = spec.evaluate(values)
        schedule.validate(max_epochs, spec.hp_names)
        schedules.append(schedule)
    return schedules


class HyperSchedule:
    """Declares sequence-valued hyper-parameters in a KerasTuner ``HyperParameters``.

    Every method registers the schedule's tunable parts as ordinary hyper-parameters named
    ``<name>/<part>``, records how they combine, and returns the concrete ``Schedule`` for the
    values of the current trial (what ``build(hp)`` may use, e.g. ``schedule.initial`` to compile
    the optimizer). Parts are constants, ``hippo.Choice``, ``hippo.Float`` or ``hippo.Int``.
    """

    @staticmethod
    def piecewise(hp, name: str, values: Sequence, boundaries: Sequence = ()) -> Schedule:
        """``values[0]`` until ``boundaries[0]``, then ``values[1]``, ... (epochs)."""
        if len(values) != len(boundaries) + 1:
            raise InvalidScheduleError(
                f"schedule {name!r}: {len(values)} values need {len(values) - 1} boundaries, "
                f"got {len(boundaries)}")
        value_exprs = tuple(_declare(hp, name, f"value_{i}", part, name)
                            for i, part in enumerate(values))
        boundary_exprs = tuple(_declare(hp, name, f"boundary_{i}", part, None)
                               for i, part in enumerate(boundaries))
        return _register(hp, ScheduleSpec(name, value_exprs, boundary_exprs))

    @staticmethod
    def step_decay(hp, name: str, initial, milestones: Sequence = (), decay=0.1) -> Schedule:
        """``initial``, multiplied by ``decay`` at each milestone epoch."""
        start = _declare(hp, name, "initial", initial, name)
        factor = _declare(hp, name, "decay", decay, None) if milestones else None
        if factor is not None and "const" in factor:
            _check_value(name, factor["const"], f"schedule {name!r} decay")
        value_exprs = [start]
        for _ in milestones:
            value_exprs.append({"mul": [value_exprs[-1], factor]})
        boundary_exprs = tuple(_declare(hp, name, f"milestone_{i}", part, None)
                               for i, part in enumerate(milestones))
        return _register(hp, ScheduleSpec(name, tuple(value_exprs), boundary_exprs))

    @staticmethod
    def constant(hp, name: str, value) -> Schedule:
        """A schedule that never changes (still a stage-tree dimension, e.g. batch size)."""
        return HyperSchedule.piecewise(hp, name, [value], [])


def _declare(hp, schedule: str, part_name: str, part, check_as: str | None) -> dict:
    """Registers one part as a hyper-parameter (or keeps it constant); returns its expression."""
    where = f"schedule {schedule!r} part {part_name!r}"
    full_name = f"{schedule}/{part_name}"
    if isinstance(part, Choice):
        if not part.values:
            raise InvalidScheduleError(f"{where}: Choice needs at least one value")
        if check_as:
            for value in part.values:
                _check_value(check_as, value, where)
        hp.Choice(full_name, list(part.values), ordered=part.ordered)
    elif isinstance(part, Float):
        if check_as:
            _check_value(check_as, part.min_value, where)
            _check_value(check_as, part.max_value, where)
        hp.Float(full_name, part.min_value, part.max_value, step=part.step,
                 sampling=part.sampling)
    elif isinstance(part, Int):
        hp.Int(full_name, part.min_value, part.max_value, step=part.step)
    elif isinstance(part, (int, float)) and not isinstance(part, bool):
        if check_as:
            _check_value(check_as, part, where)
        return {"const": part}
    else:
        raise InvalidScheduleError(
            f"{where}: expected a number, hippo.Choice, hippo.Float or hippo.Int, got {part!r}")
    return {"hp": full_name}


def _register(hp, spec: ScheduleSpec) -> Schedule:
    spec_json = spec.to_json()
    hp.Fixed(SPEC_PREFIX + spec.name, spec_json)
    schedule = spec.evaluate(hp.values)
    # Constant boundaries can be checked now; sampled ones are checked per trial by the oracle.
    if all("const" in b for b in spec.boundaries):
        Schedule(spec.name, schedule.values, schedule.boundaries).validate(None, spec.hp_names)
    return schedule
