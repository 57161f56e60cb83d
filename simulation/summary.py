"""Sweep summary: one row per job (overrides, final mean accuracy, gain over stage 0, wall time),
and the report over the sweep's runs (``report/``: tables with statistics over seeds, figures)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from meduniverse_flwr import report
from meduniverse_flwr.server.results import read_results, summarize

log = logging.getLogger(__name__)
COLUMNS = ("job", "overrides", "status", "final_mean_accuracy", "gain_over_stage0", "p_value", "wall_seconds")


def job_row(job_dir: Path) -> dict[str, Any]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = " ".join(OmegaConf.load(overrides_file)) if overrides_file.exists() else ""
    row = {"job": job_dir.name, "overrides": overrides, "status": "failed", "final_mean_accuracy": None,
           "gain_over_stage0": None, "p_value": None, "wall_seconds": None}
    results_file = job_dir / "results.json"
    if results_file.exists() and not (job_dir / "FAILED").exists():
        try:
            results = read_results(results_file)
        except ValueError as err:  # a job's file is read back like any other: checked, never trusted
            log.error("%s", err)
            return {**row, "status": "invalid results.json"}
        stages = results["stages"]
        summary = summarize(stages)  # from the checked stages, not the file's own summary
        row.update(status="completed", final_mean_accuracy=stages[-1]["mean_accuracy"],
                   gain_over_stage0=summary["accuracy_gain"][-1], p_value=summary["p_value"],
                   wall_seconds=round(sum(s["seconds"] for s in stages), 1))
    return row


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """``summary.csv`` and ``summary.md`` in ``sweep_dir`` from its job directories."""
    jobs = sorted((d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()), key=lambda d: int(d.name))
    rows = [job_row(d) for d in jobs]
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value):
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        log.info("sweep summary (%d jobs): %s", len(rows), sweep_dir / "summary.md")
        completed = [str(sweep_dir / row["job"]) for row in rows if row["status"] == "completed"]
        if len(completed) > 1:
            report.main([*completed, "--out", str(sweep_dir / "report")])
            log.info("sweep report: %s", sweep_dir / "report" / "report.md")
        failed = [row["job"] for row in rows if row["status"] != "completed"]
        if failed:
            # SystemExit, not an exception: Hydra turns callback exceptions into warnings
            raise SystemExit(f"{len(failed)} of {len(rows)} jobs failed ({', '.join(failed)}); "
                             f"see {sweep_dir / 'summary.md'}")
