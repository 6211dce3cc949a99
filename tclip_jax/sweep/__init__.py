"""Resumable, data-parallel evaluation sweeps of relevance-map methods over datasets (``tclip sweep``)."""
from tclip_jax.sweep.report import markdown, summarize, write_report
from tclip_jax.sweep.runner import RunOptions, SweepResult, Throughput, class_queries, run_sweep
from tclip_jax.sweep.store import ResultWriter, read_all_records, read_records

__all__ = [
    "ResultWriter",
    "RunOptions",
    "SweepResult",
    "Throughput",
    "class_queries",
    "markdown",
    "read_all_records",
    "read_records",
    "run_sweep",
    "summarize",
    "write_report",
]
