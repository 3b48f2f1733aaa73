"""The one benchmark harness: candidate and baseline timed alternately in one process.

These machines are noisy, so a figure is only ever a ratio against a baseline measured in the
same run, interleaved with the candidate (ABAB...), reported as median with min and max. Results
go to ``benchmarks/results/<part>.json`` and ``<part>.md`` (format in shared DESIGN.md);
``ratio`` always means "times better than the baseline", so bigger is better everywhere.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

LOG = logging.getLogger("benchmarks")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    case: str
    candidate: str
    baseline: str
    ratio_median: float
    ratio_min: float
    ratio_max: float
    candidate_median_s: float
    baseline_median_s: float
    target: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def meets_target(self) -> bool | None:
        return None if self.target is None else self.ratio_median >= self.target


def _time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(case: str, candidate: Callable[[], object], baseline: Callable[[], object], *,
            candidate_name: str, baseline_name: str, repeats: int = 7, warmup: int = 1,
            candidate_work: float = 1.0, baseline_work: float = 1.0,
            target: float | None = None, extra: dict | None = None) -> Row:
    """Times ``candidate`` and ``baseline`` alternately and returns their ratio.

    Each repeat runs both, in alternating order, and yields one ratio
    ``(candidate_work / t_candidate) / (baseline_work / t_baseline)``: with equal work that is
    baseline time over candidate time. ``work`` lets the two do different amounts (say, trees or
    requests) and still be compared as throughput.
    """
    for _ in range(warmup):
        candidate()
        baseline()
    candidate_times, baseline_times, ratios = [], [], []
    for i in range(repeats):
        if i % 2 == 0:
            t_candidate, t_baseline = _time_once(candidate), _time_once(baseline)
        else:
            t_baseline, t_candidate = _time_once(baseline), _time_once(candidate)
        candidate_times.append(t_candidate)
        baseline_times.append(t_baseline)
        ratios.append((candidate_work / t_candidate) / (baseline_work / t_baseline))
    row = Row(case=case, candidate=candidate_name, baseline=baseline_name,
              ratio_median=statistics.median(ratios), ratio_min=min(ratios),
              ratio_max=max(ratios), candidate_median_s=statistics.median(candidate_times),
              baseline_median_s=statistics.median(baseline_times), target=target,
              extra=dict(extra or {}))
    LOG.info("%s: %s %.2fx %s (min %.2f, max %.2f)%s", case, candidate_name, row.ratio_median,
             baseline_name, row.ratio_min, row.ratio_max,
             "" if target is None else f", target {target}")
    return row


def ratio_row(case: str, *, candidate_name: str, baseline_name: str,
              candidate_value: float, baseline_value: float, higher_is_better: bool,
              target: float | None = None, extra: dict | None = None) -> Row:
    """A row for a measured count rather than a timing (steps executed, bytes, requests/s)."""
    ratio = (candidate_value / baseline_value if higher_is_better
             else baseline_value / candidate_value)
    return Row(case=case, candidate=candidate_name, baseline=baseline_name,
               ratio_median=ratio, ratio_min=ratio, ratio_max=ratio,
               candidate_median_s=float("nan"), baseline_median_s=float("nan"),
               target=target, extra={"candidate_value": candidate_value,
                                     "baseline_value": baseline_value, **(extra or {})})


def machine_description() -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory_gib:.0f} GiB, {platform.machine()}, {platform.system()}"


class Report:
    """Collects one part's rows and writes them as JSON, Markdown and (optionally) PNG plots."""

    def __init__(self, part: str, results_dir: Path = RESULTS_DIR):
        self.part = part
        self.results_dir = results_dir
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def as_dict(self) -> dict:
        try:
            import tensorflow as tf
            tf_version = tf.__version__
        except ImportError:
            tf_version = None
        return {"part": self.part,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine_description(), "tensorflow": tf_version,
                "rows": [asdict(r) for r in self.rows], "notes": self.notes}

    def markdown(self) -> str:
        lines = [f"### {self.part}", "",
                 "| case | candidate | baseline | ratio (median) | min | max | candidate s | "
                 "baseline s | target | met |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            met = {None: "", True: "yes", False: "**no**"}[r.meets_target]
            lines.append(
                f"| {r.case} | {r.candidate} | {r.baseline} | {r.ratio_median:.2f}x | "
                f"{r.ratio_min:.2f} | {r.ratio_max:.2f} | {_seconds(r.candidate_median_s)} | "
                f"{_seconds(r.baseline_median_s)} | {'' if r.target is None else r.target} | {met} |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def write(self) -> Path:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.results_dir / f"{self.part}.json"
        _atomic_write(json_path, json.dumps(self.as_dict(), indent=1))
        _atomic_write(self.results_dir / f"{self.part}.md", self.markdown())
        return json_path

    def plot(self, name: str, series: dict[str, tuple[list[float], list[float]]], *,
             xlabel: str, ylabel: str, title: str, logx: bool = False) -> Path:
        """Writes ``<part>_<name>.png`` with one line per series (x values, y values)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.results_dir / f"{self.part}_{name}.png"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def _seconds(value: float) -> str:
    return "" if value != value else f"{value:.4g}"  # NaN for count rows


def _atomic_write(path: Path, text: str) -> None:
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text)
    os.replace(staged, path)
