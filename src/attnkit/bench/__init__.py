"""Benchmarks. ``run_speed_bench(config)`` times every backend that runs each mechanism next
to the SDPA baseline on the same inputs; ``write_report(results, out_dir)`` writes the JSON,
PNG and Markdown report. ``attnkit bench`` is the command-line front end."""

from attnkit.bench.report import Target, rich_table, targets, targets_table, write_report
from attnkit.bench.speed import (
    DEFAULT_MECHANISMS,
    Record,
    SpeedConfig,
    SpeedResults,
    quick_config,
    run_cell,
    run_speed_bench,
)

__all__ = [
    "DEFAULT_MECHANISMS",
    "Record",
    "SpeedConfig",
    "SpeedResults",
    "Target",
    "quick_config",
    "rich_table",
    "run_cell",
    "run_speed_bench",
    "targets",
    "targets_table",
    "write_report",
]
