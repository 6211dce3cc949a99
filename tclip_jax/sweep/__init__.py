"""Resumable, data-parallel evaluation sweeps of relevance-map methods over datasets (``tclip sweep``)."""
from tclip_jax.sweep.evaluate import EvalOptions, evaluate_targets
from tclip_jax.sweep.methods import METHODS, Method, build_method, prompts_for, tclip_class_queries, tclip_method
from tclip_jax.sweep.report import markdown, summarize, write_report
from tclip_jax.sweep.runner import RunOptions, SweepResult, Throughput, run_sweep
from tclip_jax.sweep.store import ResultWriter, read_all_records, read_records

__all__ = [
    "METHODS",
    "EvalOptions",
    "Method",
    "ResultWriter",
    "RunOptions",
    "SweepResult",
    "Throughput",
    "build_method",
    "evaluate_targets",
    "markdown",
    "prompts_for",
    "read_all_records",
    "read_records",
    "run_sweep",
    "summarize",
    "tclip_class_queries",
    "tclip_method",
    "write_report",
]
