"""Where a distributed study's makespan goes: per worker, training vs loading vs saving vs the
round trips to the chief vs waiting.

The chief records in memory, per stage run (``accounting()["timeline"]``; a restarted chief's
starts at the restart), when it handed the stage out and
when it heard the result back (its clock); the worker adds how long loading the stage's starting
state, ``fit`` and the checkpoint save took, and when its run started and finished (wall clock,
comparable across processes on one machine). ``breakdown`` sums those per worker over the study's
makespan:

- ``fit``, ``load``, ``save``: inside the stage, as the worker measured them; ``other`` is the
  rest of the stage's own time (callbacks, KerasTuner's bookkeeping);
- ``dispatch``: from the chief handing the stage out to the worker starting it (the reply, the
  tuner's ``on_trial_begin``);
- ``report``: from the worker finishing the stage to the chief having recorded it (metrics,
  ``end_trial`` and the oracle's save);
- ``idle``: the rest of the makespan: no stage ready for this worker, or waiting to ask again.
"""

from __future__ import annotations


def breakdown(accounting: dict) -> dict:
    """Per worker and in total: seconds of each kind over the makespan (see the module doc)."""
    timeline = [e for e in accounting.get("timeline", []) if "handed_out" in e]
    start = accounting.get("first_stage_start")
    end = accounting.get("last_stage_end")
    if not timeline or start is None or end is None:
        return {"makespan": 0.0, "workers": {}, "total": {}}
    makespan = end - start
    workers: dict[str, dict] = {}
    for entry in timeline:
        row = workers.setdefault(entry.get("tuner", "?"), dict.fromkeys(
            ("stages", "fit", "load", "save", "other", "dispatch", "report", "busy"), 0.0))
        row["stages"] += 1
        for kind in ("fit", "load", "save"):
            row[kind] += entry.get(kind, 0.0)
        row["other"] += max(0.0, entry["seconds"] - entry["fit"] - entry["load"] - entry["save"])
        if entry.get("started") is not None and entry.get("finished") is not None:
            row["dispatch"] += max(0.0, entry["started"] - entry["handed_out"])
            row["report"] += max(0.0, entry["ended"] - entry["finished"])
        row["busy"] += entry["ended"] - entry["handed_out"]
    total = dict.fromkeys(("stages", "fit", "load", "save", "other", "dispatch", "report",
                           "idle"), 0.0)
    for row in workers.values():
        row["idle"] = max(0.0, makespan - row.pop("busy"))
        for kind in total:
            total[kind] += row[kind]
    return {"makespan": makespan, "workers": workers, "total": total}


def describe(result: dict) -> str:
    """One line: the share of the workers' makespan-time spent on each kind."""
    total, makespan = result.get("total"), result.get("makespan", 0.0)
    if not total or not makespan:
        return "no timeline"
    span = makespan * len(result["workers"])
    parts = [f"{kind} {100 * total[kind] / span:.0f}%" for kind in
             ("fit", "load", "save", "other", "dispatch", "report", "idle")]
    return (f"{len(result['workers'])} workers x {makespan:.2f} s makespan: "
            + ", ".join(parts))
