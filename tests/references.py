"""Comparing arrays with the official implementations' outputs (the fixtures): one helper for every parity test."""
import numpy as np

TOL = 1e-4


def assert_close(ours, reference, what, tol=TOL, relative=False):
    """Same shape and max abs error below `tol`; `relative`: below tol * max(1, |reference|) elementwise (float32
    sums of large magnitude cannot be closer than a few ulps). Errors are taken in float64."""
    ours = np.asarray(ours, np.float64)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != {reference.shape}"
    err = np.abs(ours - reference)
    bound = tol * np.maximum(1, np.abs(reference)) if relative else tol
    assert (err < bound).all(), f"{what}: max abs error {err.max()}"
