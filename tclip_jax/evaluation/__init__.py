"""Evaluation protocols over datasets (synthetic scenes: `tclip_jax.evaluation.synthetic`)."""
