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


def first_fingerprint(clip) -> str:
    """A model's fingerprint as tclip_jax recorded it before 2026-12-06 (sweep.json, eclip_projections.json), written
    out again from its definition: SHA-256 over the SHA-256 of each part (the MLP activation; then the projections,
    positional embeddings and final layer norms, each its shape's repr and its float16 bytes), 16 hex digits."""
    import hashlib

    visual, text = clip.params["visual"], clip.params["text"]
    leaves = [visual["proj"], text["projection"], visual["positional_embedding"], text["positional_embedding"],
              visual["ln_post"]["bias"], visual["ln_post"]["scale"], text["ln_final"]["bias"], text["ln_final"]["scale"]]
    parts = [clip.config.activation.encode()] + [repr(np.shape(leaf)).encode() + np.asarray(leaf, np.float16).tobytes()
                                                 for leaf in leaves]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def author_kept_positions(tokenizer, token_ids) -> np.ndarray:
    """int32 positions of one token row that the TCLIP author's similarity code keeps: not SOT, EOT or padding, and
    not a piece that decodes to "", "!" or "." (its filter, written out)."""
    from tclip_jax.model.tokenizer import EOT_TOKEN, PAD_ID, SOT_TOKEN

    dropped = {"", SOT_TOKEN, EOT_TOKEN, "!", "."}
    token_ids = np.asarray(token_ids)
    assert token_ids.ndim == 1, f"one token row, got shape {token_ids.shape}"
    kept = [p for p, i in enumerate(token_ids.tolist())
            if i not in (tokenizer.sot_id, tokenizer.eot_id, PAD_ID) and tokenizer.decode_piece(i) not in dropped]
    return np.asarray(kept, dtype=np.int32)
