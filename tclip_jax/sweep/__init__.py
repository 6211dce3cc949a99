"""Resumable, data-parallel evaluation sweeps of relevance-map methods over datasets (``tclip sweep``)."""
from tclip_jax._exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["markdown", "summarize", "write_report"], "tclip_jax.sweep.report"),
    **dict.fromkeys(["SweepResult", "Throughput", "class_queries", "run_sweep"], "tclip_jax.sweep.runner"),
    "RunOptions": "tclip_jax.sweep.options",
    **dict.fromkeys(["ResultWriter", "read_all_records", "read_records"], "tclip_jax.sweep.store"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
