"""tfweave.hippo: hyper-parameter optimization on stage trees, a drop-in for KerasTuner.

Trials whose hyper-parameter *sequences* (learning-rate, batch-size, momentum... schedules) share
a prefix train that prefix once. Declare schedules with ``HyperSchedule`` in a KerasTuner
model-building function and swap the tuner class (``GridSearch``, ``RandomSearch``,
``BayesianOptimization``, ``Hyperband``, or ``StageTreeTuner`` with a ``StageTreeOracle``).

Names are imported lazily so that ``tfweave --help`` never loads TensorFlow.
"""

import importlib

_EXPORTS = {
    "HyperSchedule": "schedules", "Schedule": "schedules", "Choice": "schedules",
    "Float": "schedules", "Int": "schedules", "InvalidScheduleError": "schedules",
    "StageTree": "stage_tree", "StageTreeOracle": "oracle",
    "StageTreeTuner": "tuner", "GridSearch": "tuner", "RandomSearch": "tuner",
    "BayesianOptimization": "tuner", "Hyperband": "tuner",
    "EpochData": "epoch_data", "CheckpointError": "checkpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"tfweave.hippo.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'tfweave.hippo' has no attribute {name!r}")
