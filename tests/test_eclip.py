"""ECLIP: masked max pooling, the loss, a train step that moves only the projections, the ITSM, the projections
file, resuming, the attention of a Hugging Face ViT, and `tclip train-eclip` / `tclip explain --method eclip`."""
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from references import first_fingerprint
from tclip_jax.checkpoints.folder import flatten
from tclip_jax.checkpoints.load import load_clip
from tclip_jax.cli import main as tclip
from tclip_jax.image import prepare
from tclip_jax.methods.base import Query
from tclip_jax.methods.eclip import ECLIP, Settings, TrainSettings
from tclip_jax.methods.eclip.method import (PROJECTIONS_FILE, clip_projections, eclip_map,
                                            image_features, load_projections, save_projections)
from tclip_jax.methods.eclip.train import (Pairs, ViTAttention, clip_attention, contrastive_loss, epoch_order,
                                           file_pairs, make_optimizer, make_train_step, masked_max_pool,
                                           pair_features, train)
from tclip_jax.model import CLIP, PRESETS
from tclip_jax.model.tokenizer import PromptCutWarning
from tclip_jax.synthetic import make_scene

CAPTIONS = ["a red circle", "a blue square", "a green star", "a yellow heart"]


@pytest.fixture(scope="module")
def clip(fixtures_dir):
    return load_clip(fixtures_dir / "tiny_openai_clip.npz", activation="quick_gelu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A folder of four small images with captions.tsv."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("pairs")
    lines = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(make_scene(i, 64).image).save(folder / f"img{i}.png")
        lines.append(f"img{i}.png\t{caption}")
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n")
    return folder


def in_memory_pairs(count: int = 4) -> Pairs:
    scenes = [make_scene(seed, 64) for seed in range(count)]
    return Pairs("test scenes", f"test scenes {count}", count, lambda: ((s.image, s.caption, None) for s in scenes))


def test_masked_max_pool_is_the_channelwise_max_of_the_masked_patches():
    rng = np.random.default_rng(0)
    features, attention = rng.normal(size=(2, 5, 3)).astype(np.float32), rng.uniform(size=(2, 5)).astype(np.float32)
    expected = np.empty((2, 3), np.float32)
    for b in range(2):
        for c in range(3):
            expected[b, c] = max(features[b, p, c] * attention[b, p] for p in range(5))
    np.testing.assert_array_equal(np.asarray(masked_max_pool(features, attention)), expected)


def test_contrastive_loss_is_clips_symmetric_infonce(highest_precision):
    rng = np.random.default_rng(1)
    projections = {"image": rng.normal(size=(6, 4)), "text": rng.normal(size=(5, 4))}
    pooled, texts, logit_scale = rng.normal(size=(3, 6)), rng.normal(size=(3, 5)), np.float32(2.0)
    image = pooled @ projections["image"]
    text = texts @ projections["text"]
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    logits = np.exp(2.0) * image @ text.T
    rows = [-(logits[i, i] - np.log(np.exp(logits[i]).sum())) for i in range(3)]
    columns = [-(logits[i, i] - np.log(np.exp(logits[:, i]).sum())) for i in range(3)]
    expected = (np.mean(rows) + np.mean(columns)) / 2
    as32 = {k: v.astype(np.float32) for k, v in projections.items()}
    loss = contrastive_loss(as32, pooled.astype(np.float32), texts.astype(np.float32), logit_scale)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_epoch_order_is_a_permutation_of_its_epoch_and_seed():
    settings = TrainSettings()
    orders = {(seed, epoch): epoch_order(settings.replace(seed=seed), 10, epoch) for seed in (0, 1) for epoch in (0, 1)}
    assert all(sorted(order) == list(range(10)) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) == 4  # another order each epoch and each seed
    np.testing.assert_array_equal(epoch_order(settings, 10, 1), orders[0, 1])  # drawn again the same on a resume


def test_a_train_step_moves_the_projections_and_nothing_of_clip(clip):
    before = {k: v.copy() for k, v in flatten(clip.params).items()}
    pooled, texts, contents = pair_features(clip, in_memory_pairs(), progress=False)
    assert contents is None  # arrays, told apart by the pairs' fingerprint
    assert pooled.shape == (4, clip.config.vision_width) and texts.shape == (4, clip.config.text_width)
    settings = TrainSettings(learning_rate=1e-2)
    optimizer = make_optimizer(settings)
    projections = clip_projections(clip.params)
    opt_state = optimizer.init(projections)
    step = make_train_step(optimizer)
    arguments = (projections, opt_state, pooled, texts, clip.params["logit_scale"])
    # The step's inputs are the projections, the optimizer state, the features and the temperature: no CLIP
    # parameter reaches it, so no gradient of one is formed.
    jaxpr = jax.make_jaxpr(step)(*arguments)
    assert len(jaxpr.jaxpr.invars) == len(jax.tree_util.tree_leaves((projections, opt_state))) + 3
    moved, _, loss = step(*arguments)
    features = (pooled, texts, clip.params["logit_scale"])
    np.testing.assert_allclose(float(loss), float(contrastive_loss(projections, *features)), rtol=1e-6)
    # AdamW's first step in closed form (the moments are the gradient and its square, bias-corrected; optax's eps
    # 1e-8): -learning rate * (g / (|g| + eps) + weight decay * the projection).
    gradient = jax.grad(contrastive_loss)(projections, *features)
    for key in ("image", "text"):
        g = np.asarray(gradient[key], np.float64)
        expected = projections[key] - settings.learning_rate * (g / (np.abs(g) + 1e-8)
                                                                + settings.weight_decay * projections[key])
        np.testing.assert_allclose(np.asarray(moved[key]), expected, atol=1e-6, err_msg=key)
    after = flatten(clip.params)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


def test_itsm_is_the_cosine_of_projected_patches_and_prompt(clip, tmp_path, highest_precision):
    rng = np.random.default_rng(2)
    projections = {"image": rng.normal(size=(128, 64)).astype(np.float32),
                   "text": rng.normal(size=(128, 64)).astype(np.float32)}
    path = save_projections(tmp_path / PROJECTIONS_FILE, projections, clip)
    method = ECLIP(clip, Settings(projections=str(path)))
    pixels = method.prepare(make_scene(7, 96).image)[0][None]
    queries = method.encode([Query(p) for p in CAPTIONS[:2]])
    maps = np.asarray(method.grid_maps(method.params, pixels, queries))

    patches, grid = image_features(clip.model, clip.params, pixels)
    ids = clip.tokenizer.encode(CAPTIONS[:2], clip.config.context_length)
    text = clip.model.apply({"params": clip.params}, ids, method="encode_text")
    eot = np.asarray(text.tokens_normed)[np.arange(2), np.asarray(text.eot_index)]
    image_embeds, text_embeds = np.asarray(patches[0]) @ projections["image"], eot @ projections["text"]
    cosine = (image_embeds @ text_embeds.T) / np.outer(np.linalg.norm(image_embeds, axis=1),
                                                        np.linalg.norm(text_embeds, axis=1))
    assert maps.shape == (1, 2, *grid)
    np.testing.assert_allclose(maps[0], cosine.T.reshape(2, *grid), atol=1e-5)
    from_ids = eclip_map(clip.model, clip.params, pixels, ids, projections)  # the pure function, from token ids
    np.testing.assert_allclose(np.asarray(from_ids.maps), maps, atol=1e-6)


def test_without_projections_eclip_runs_on_clips_own_and_says_so(clip):
    with pytest.warns(UserWarning, match="using CLIP's own, i.e. untrained ECLIP"):
        method = ECLIP(clip)
    assert all(np.array_equal(method.projections[k], v) for k, v in clip_projections(clip.params).items())


def test_untrained_eclip_reads_a_projection_replaced_in_the_parameter_dict(clip, fixture_images):
    """It copied CLIP's projections when built: after `params["text"]["projection"] = new` its maps kept the old
    projection while its results recorded the new model's fingerprint. Its maps are those of an ECLIP built on the
    edited parameters."""
    params = jax.tree_util.tree_map(lambda leaf: leaf, clip.params)  # a dict tree of its own, the same leaves
    edited = dataclasses.replace(clip, params=params)
    with pytest.warns(UserWarning, match="untrained ECLIP"):
        method = ECLIP(edited)
    image = fixture_images["scene_224"]
    before = method.explain(image, ["a red circle"]).prompts[0].phrase.heatmap
    old = params["text"]["projection"]
    params["text"]["projection"] = np.asarray(old)[:, ::-1].copy()
    after = method.explain(image, ["a red circle"]).prompts[0].phrase.heatmap
    with pytest.warns(UserWarning, match="untrained ECLIP"):
        rebuilt = ECLIP(dataclasses.replace(clip, params=params))
    np.testing.assert_array_equal(after, rebuilt.explain(image, ["a red circle"]).prompts[0].phrase.heatmap)
    assert not np.allclose(after, before)
    # Its text features are kept while the parameters stay as they are, on a device too: each use read a new copy
    # of the projections, which the features' cache took for another model.
    with pytest.warns(UserWarning, match="untrained ECLIP"):
        on_device = ECLIP(dataclasses.replace(clip, params=jax.device_put(clip.params)))
    leaves = jax.tree_util.tree_leaves(on_device.params)
    assert all(a is b for a, b in zip(leaves, jax.tree_util.tree_leaves(on_device.params)))


def test_trained_eclip_is_refused_once_a_leaf_of_its_model_is_replaced(clip, tmp_path):
    """Trained projections were checked against the model once, when built: after a leaf of `clip.params` was
    replaced (another model, another fingerprint) it mapped with projections trained on the old model and recorded the
    new fingerprint. It is refused with the words a fresh build on the edited model gives."""
    params = jax.tree_util.tree_map(lambda leaf: leaf, clip.params)  # a dict tree of its own, the same leaves
    edited = dataclasses.replace(clip, params=params)
    path = save_projections(tmp_path / PROJECTIONS_FILE, clip_projections(clip.params), clip)
    method = ECLIP(edited, Settings(projections=str(path)))
    image = make_scene(0, 64).image
    method.explain(image, ["a red circle"])
    params["visual"]["proj"] = np.asarray(params["visual"]["proj"]) * 0.5
    with pytest.raises(ValueError, match="trained on another CLIP than this one") as fresh:
        ECLIP(edited, Settings(projections=str(path)))
    with pytest.raises(ValueError) as refused:
        method.explain(image, ["a red circle"])
    assert str(refused.value) == str(fresh.value)
    # Checked against the record read with the arrays: a JSON gone or rewritten since says nothing of them.
    path.with_suffix(".json").unlink()
    with pytest.raises(ValueError) as refused:
        method.explain(image, ["a red circle"])
    assert str(refused.value) == str(fresh.value)


def test_untrained_eclip_is_clips_dense_similarity_map(clip, fixture_npz, highest_precision):
    """With CLIP's own projections, the ITSM is the official plain CLIP's patch-text cosine (CLIP Surgery's
    fixture: `plain/similarity_single`, normalized patch tokens against normalized text features)."""
    reference = fixture_npz("clip_surgery/clip_surgery_tiny.npz")
    pixels = np.ascontiguousarray(reference["pixel_values"].transpose(0, 2, 3, 1))
    maps = eclip_map(clip.model, clip.params, pixels, reference["tokens/labels_single"],
                     clip_projections(clip.params)).maps
    cosine = reference["plain/similarity_single"][:, 1:]  # [B, 1 + P, T] without the class token
    expected = cosine.transpose(0, 2, 1).reshape(*cosine.shape[:1], cosine.shape[2], *maps.shape[2:])
    np.testing.assert_allclose(np.asarray(maps), expected, rtol=0, atol=1e-5)


def test_training_pools_the_patches_by_the_min_maxed_class_attention_of_the_last_block(clip, highest_precision):
    """pair_features' image feature: max over patches of Fᵢ ⊙ minmax(A), A the last block's softmax attention of the
    class-token query to the patch keys, mean over heads, computed here from that block's weights."""
    pairs = in_memory_pairs(2)
    config = clip.config
    pixels = np.stack([prepare(rgb, "whole", config)[0] for rgb, _, _ in pairs.read()])
    image = clip.model.apply({"params": clip.params}, pixels, True, method="encode_image")
    x = np.asarray(image.residual_stream[-2], np.float64)  # the stream entering the last block [B, 1 + P, width]
    block = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                   clip.params["visual"]["transformer"][f"block_{config.vision_layers - 1}"])
    centred = x - x.mean(axis=-1, keepdims=True)
    normed = centred / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + config.layer_norm_eps)
    normed = normed * block["ln_1"]["scale"] + block["ln_1"]["bias"]
    heads = config.vision_heads
    split = lambda y: y.reshape(*y.shape[:2], heads, -1)  # noqa: E731
    q = split(normed @ block["attn"]["query"]["kernel"] + block["attn"]["query"]["bias"])
    k = split(normed @ block["attn"]["key"]["kernel"] + block["attn"]["key"]["bias"])
    logits = np.einsum("bhd,bkhd->bhk", q[:, 0], k) / np.sqrt(q.shape[-1])  # class-token query, every key
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    attention = probs[:, :, 1:].mean(axis=1)  # [B, P]
    np.testing.assert_allclose(np.asarray(clip_attention(clip.model, clip.params, pixels)), attention, atol=1e-6)
    low, high = attention.min(axis=1, keepdims=True), attention.max(axis=1, keepdims=True)
    weights = (attention - low) / (high - low)
    patches = np.asarray(image.tokens_normed, np.float64)[:, 1:]
    pooled, _, _ = pair_features(clip, pairs, progress=False)
    np.testing.assert_allclose(pooled, (patches * weights[:, :, None]).max(axis=1), atol=1e-5)
    # An attention model's maps (--dino; here a stand-in) are min-maxed the same way.
    maps = np.random.default_rng(1).uniform(0.2, 0.7, size=attention.shape).astype(np.float32)
    low, high = maps.min(axis=1, keepdims=True), maps.max(axis=1, keepdims=True)
    weights = (maps - low) / (high - low)
    pooled, _, _ = pair_features(clip, pairs, lambda pixels, grid, config: maps, progress=False)
    np.testing.assert_allclose(pooled, (patches * weights[:, :, None]).max(axis=1), atol=1e-5)
    # A caption longer than the context is cut to it: two that differ only past it give the same Fₜ.
    long = "a red circle " * config.context_length
    image = next(pairs.read())[0]
    cut = Pairs("long captions", "long captions 2", 2,
                lambda: iter([(image, long + "above", None), (image, long + "below", None)]))
    with pytest.warns(PromptCutWarning):
        _, texts, _ = pair_features(clip, cut, progress=False)
    np.testing.assert_array_equal(texts[0], texts[1])


def test_projections_round_trip_and_refuse_another_models_shapes(clip, tmp_path):
    projections = {k: v + 1 for k, v in clip_projections(clip.params).items()}
    path = save_projections(tmp_path / PROJECTIONS_FILE, projections, clip, {"steps": 3})
    loaded, digest = load_projections(path, clip)
    assert all(np.array_equal(loaded[k], projections[k]) for k in ("image", "text"))
    # read-only as the model's weights: ECLIP keeps its text queries and device copy computed from them, so an
    # edit in place (`method.projections["text"] *= -1`) gave the old maps silently
    assert not any(loaded[k].flags.writeable for k in ("image", "text"))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    info = json.loads((tmp_path / PROJECTIONS_FILE).with_suffix(".json").read_text())
    assert info["shapes"] == {"image": [128, 64], "text": [128, 64]} and info["training"] == {"steps": 3}
    assert info["model"]["origin"].endswith("tiny_openai_clip.npz")
    save_projections(tmp_path / "small.safetensors", {"image": np.zeros((64, 64)), "text": np.zeros((128, 64))}, clip)
    with pytest.raises(ValueError, match="do not fit the model"):
        load_projections(tmp_path / "small.safetensors", clip)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_projections(tmp_path / "missing.safetensors", clip)
    with pytest.raises(ValueError, match=f"is a folder; name its {PROJECTIONS_FILE}"):
        load_projections(tmp_path, clip)


def _blocks_tuned(clip):
    """`clip` with its transformer blocks alone changed (a merged LoRA): projections, norms, embeddings as they are."""
    return dataclasses.replace(clip, params=jax.tree_util.tree_map_with_path(
        lambda path, a: a * 1.01 if "transformer" in jax.tree_util.keystr(path) else a, clip.params))


def test_projections_trained_on_another_clip_of_the_same_widths_are_refused(clip, tmp_path):
    """Widths do not tell models apart (ViT-B/32 and ViT-B/16 share theirs), nor do the tensors around the
    transformer blocks: the JSON beside the projections names the model they were trained on, by its config and
    every weight (a float16-rounded copy has other weights: another model)."""
    path = save_projections(tmp_path / PROJECTIONS_FILE, clip_projections(clip.params), clip)
    other = dataclasses.replace(clip, params=jax.tree_util.tree_map(lambda a: a * 1.01, clip.params), origin="other")
    with pytest.raises(ValueError, match=r"trained on another CLIP than this one: .*tiny_openai_clip.npz \(fingerprint "
                                         r"v2-[0-9a-f]{9}\) there, other with the quick_gelu activation \(fingerprint "):
        load_projections(path, other)
    other_eps = dataclasses.replace(clip, model=CLIP(dataclasses.replace(clip.config, layer_norm_eps=1e-6)))
    for another in (_blocks_tuned(clip), other_eps):
        with pytest.raises(ValueError, match="trained on another CLIP than this one"):
            load_projections(path, another)
    assert load_projections(path, dataclasses.replace(clip, origin="elsewhere"))[0]["image"].shape == (128, 64)
    other_path = save_projections(tmp_path / "other.safetensors", clip_projections(other.params), other)
    as_float16 = dataclasses.replace(other, params=jax.tree_util.tree_map(  # `other`'s weights are not float16-exact
        lambda a: np.asarray(a, np.float16).astype(np.float32), other.params))
    with pytest.raises(ValueError, match="trained on another CLIP than this one"):
        load_projections(other_path, as_float16)
    info = json.loads(path.with_suffix(".json").read_text())
    info["model"]["fingerprint"] = first_fingerprint(clip)  # as written before 2026-12-06: told by that definition
    path.with_suffix(".json").write_text(json.dumps(info))
    assert load_projections(path, dataclasses.replace(clip, origin="elsewhere"))[0]["image"].shape == (128, 64)
    with pytest.raises(ValueError, match="trained on another CLIP than this one"):
        load_projections(path, other)
    path.with_suffix(".json").write_text('{"model": "a string"}')
    with pytest.raises(ValueError, match=r"eclip_projections.json \(what the projections beside it were trained on\) is "
                                         "damaged: its model is str, not a record"):
        load_projections(path, clip)
    path.with_suffix(".json").unlink()  # copied without its JSON: nothing to check against
    assert load_projections(path, other)[0]["image"].shape == (128, 64)


def test_prompts_encoded_with_other_projections_are_refused(clip, tmp_path):
    """ECLIP's queries go through its projections: prompts encoded before the file was trained further in place
    (`train-eclip --resume`) are refused by the method built on the new file, and accepted by an equal one."""
    path = save_projections(tmp_path / PROJECTIONS_FILE, clip_projections(clip.params), clip)
    image = make_scene(0, 64).image
    encoded = ECLIP(clip, Settings(projections=str(path))).encode_prompts(["a red circle"])
    np.testing.assert_array_equal(ECLIP(clip, Settings(projections=str(path))).explain(image, encoded).prompts[0]
                                  .phrase.heatmap, ECLIP(clip, Settings(projections=str(path))).explain(
                                      image, ["a red circle"]).prompts[0].phrase.heatmap)
    save_projections(path, {k: v * 2 for k, v in clip_projections(clip.params).items()}, clip)
    with pytest.raises(ValueError, match="encoded by eclip with other settings than this eclip"):
        ECLIP(clip, Settings(projections=str(path))).explain(image, encoded)


def test_a_sweep_does_not_resume_over_projections_trained_further_in_the_same_file(clip, tmp_path):
    """`tclip train-eclip --resume` rewrites its projections file in place: a sweep resumed after that would mix the
    maps of two projections in one report, so it is refused, naming what changed."""
    from tclip_jax.evaluation.datasets import synthetic_dataset
    from tclip_jax.sweep import RunOptions, run_sweep

    path = save_projections(tmp_path / PROJECTIONS_FILE, clip_projections(clip.params), clip)
    options = RunOptions(limit=1, progress=False)
    run_sweep(synthetic_dataset(2), ECLIP(clip, Settings(projections=str(path))), tmp_path / "out", options=options)
    # The same projections copied elsewhere, named another way: told by their digest, not their path, so resumed.
    copy = tmp_path / "copy" / PROJECTIONS_FILE
    copy.parent.mkdir()
    shutil.copy(path, copy)
    shutil.copy(path.with_suffix(".json"), copy.with_suffix(".json"))
    grown = RunOptions(limit=2, resume=True, progress=False)
    run_sweep(synthetic_dataset(2), ECLIP(clip, Settings(projections=f"{tmp_path}/copy/../copy/{PROJECTIONS_FILE}")),
              tmp_path / "out", options=grown)
    save_projections(path, {k: v * 2 for k, v in clip_projections(clip.params).items()}, clip)
    with pytest.raises(ValueError, match=r"run\.projections\.sha256 \(stored '[0-9a-f]{64}', now '[0-9a-f]{64}'\)"):
        run_sweep(synthetic_dataset(2), ECLIP(clip, Settings(projections=str(path))), tmp_path / "out",
                  options=RunOptions(resume=True, progress=False))


def test_resume_gives_the_projections_of_an_uninterrupted_run(clip, data_dir, tmp_path):
    pairs = file_pairs(data_dir)
    settings = TrainSettings(epochs=2, batch_size=3, learning_rate=1e-2)
    whole = train(clip, pairs, tmp_path / "whole", settings, progress=False)
    train(clip, pairs, tmp_path / "parts", settings.replace(epochs=1), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(clip, pairs, tmp_path / "parts", settings, progress=False)
    with pytest.raises(ValueError, match="another run: settings"):
        train(clip, pairs, tmp_path / "parts", settings.replace(batch_size=2), resume=True, progress=False)
    resumed = train(clip, pairs, tmp_path / "parts", settings, resume=True, progress=False)
    assert whole.steps == resumed.steps == 2  # per epoch, a batch of 3; the fourth pair's batch of one is left out
    for key in ("image", "text"):
        np.testing.assert_array_equal(resumed.projections[key], whole.projections[key])
        assert not np.array_equal(whole.projections[key], clip_projections(clip.params)[key])
    np.testing.assert_array_equal(load_projections(resumed.path, clip)[0]["text"], whole.projections["text"])
    with pytest.raises(ValueError, match="2 epochs done, more than --epochs 1"):
        train(clip, pairs, tmp_path / "parts", settings.replace(epochs=1), resume=True, progress=False)


def test_a_checkpoint_a_killed_save_hid_is_put_back_before_the_run_looks_for_it(clip, data_dir, tmp_path):
    """A SIGKILL between a checkpoint save's two renames leaves the checkpoint hidden beside its place
    (`.checkpoint.HOST.old.*/checkpoint`, `staged_folder`). --resume then said the folder held no checkpoint, and a
    fresh run trained into it, its first save putting the hidden checkpoint back only to replace it: it is put back
    first (`mend_killed_swaps`), as `tclip explain` does, so a fresh run is refused and a resume goes on from it."""
    import os
    import socket

    pairs = file_pairs(data_dir)
    settings = TrainSettings(epochs=2, batch_size=3, learning_rate=1e-2)
    whole = train(clip, pairs, tmp_path / "whole", settings, progress=False)
    out = tmp_path / "parts"
    train(clip, pairs, out, settings.replace(epochs=1), progress=False)
    (out / PROJECTIONS_FILE).unlink()  # as a run killed in its second epoch's save leaves it: no projections yet

    def killed_between_the_renames():
        hidden = out / f".checkpoint.{socket.gethostname()}.old.abcdefgh"
        hidden.mkdir()
        (out / "checkpoint").rename(hidden / "checkpoint")
        os.utime(hidden, (0, 0))  # older than any live run's
        return hidden

    hidden = killed_between_the_renames()
    with pytest.raises(FileExistsError, match="holds a training checkpoint: pass --resume"):
        train(clip, pairs, out, settings, progress=False)
    assert (out / "checkpoint" / "state.json").is_file() and not hidden.exists()
    killed_between_the_renames()
    resumed = train(clip, pairs, out, settings, resume=True, progress=False)
    for key in ("image", "text"):
        np.testing.assert_array_equal(resumed.projections[key], whole.projections[key])


def test_resume_compares_the_data_and_model_not_how_their_paths_are_spelt(clip, data_dir, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    settings = TrainSettings(epochs=2, batch_size=3, learning_rate=1e-2)
    train(clip, file_pairs(data), tmp_path / "run", settings.replace(epochs=1), progress=False)
    monkeypatch.chdir(tmp_path)
    captions = data / "captions.tsv"
    text = captions.read_text()
    captions.write_text(text.replace("a red circle", "a red disk"))  # the same count, another caption
    with pytest.raises(ValueError, match="another run: pairs"):
        train(clip, file_pairs("data"), tmp_path / "run", settings, resume=True, progress=False)
    captions.write_text(text)
    # The same list and names, one image another file (the fingerprint holds each image's name and size).
    from PIL import Image

    image = data / "img0.png"
    kept = image.read_bytes()
    Image.fromarray(make_scene(9, 64).image).save(image)
    assert image.stat().st_size != len(kept)
    with pytest.raises(ValueError, match="another run: pairs"):
        train(clip, file_pairs("data"), tmp_path / "run", settings, resume=True, progress=False)
    image.write_bytes(kept)
    other = dataclasses.replace(clip, params=jax.tree_util.tree_map(lambda a: a * 1.01, clip.params))
    for another in (other, _blocks_tuned(clip)):
        with pytest.raises(ValueError, match="another run: model"):
            train(another, file_pairs("data"), tmp_path / "run", settings, resume=True, progress=False)
    done = train(clip, file_pairs("data"), "run", settings, resume=True, progress=False)
    assert done.steps == 2  # 1 an epoch
    # Resumed with every epoch done: no step, and the projections file is written again from the checkpoint.
    done.path.unlink()
    again = train(clip, file_pairs("data"), "run", settings, resume=True, progress=False)
    assert again.steps == 2 and again.loss is None and again.path.is_file()
    assert all(np.array_equal(again.projections[k], done.projections[k]) for k in ("image", "text"))


def test_resume_compares_the_images_contents_not_only_their_names_and_sizes(clip, tmp_path):
    """A resume compared each image by name and byte size: pictures of a format whose size is fixed by the picture's
    (BMP, PPM, uncompressed TIFF) replaced by others resumed silently. The contents' digest, read as the features are
    computed, is compared before any training step; a checkpoint that did not record it cannot tell, and is
    refused."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(make_scene(i, 64).image).save(data / f"img{i}.bmp")
    (data / "captions.tsv").write_text("".join(f"img{i}.bmp\t{CAPTIONS[i]}\n" for i in range(3)))
    settings = TrainSettings(epochs=2, batch_size=3, learning_rate=1e-2)
    train(clip, file_pairs(data), tmp_path / "run", settings.replace(epochs=1), progress=False)
    state_path = tmp_path / "run" / "checkpoint" / "state.json"
    state, trained = json.loads(state_path.read_text()), (tmp_path / "run" / PROJECTIONS_FILE).read_bytes()
    first, second = (data / "img0.bmp").read_bytes(), (data / "img1.bmp").read_bytes()
    assert len(first) == len(second) and first != second
    (data / "img0.bmp").write_bytes(second)
    (data / "img1.bmp").write_bytes(first)
    with pytest.raises(ValueError, match=r"^--resume: the checkpoint in \S+checkpoint is of another run: its images' "
                                         r"contents differ from these \(their names and sizes are the same; found as "
                                         r"the features were computed, before any training step\)$"):
        train(clip, file_pairs(data), tmp_path / "run", settings, resume=True, progress=False)
    assert json.loads(state_path.read_text()) == state  # no step taken, nothing saved
    assert (tmp_path / "run" / PROJECTIONS_FILE).read_bytes() == trained
    (data / "img0.bmp").write_bytes(first)
    (data / "img1.bmp").write_bytes(second)
    del state["pairs"]["contents"]  # as written before the contents were compared
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=OLDER.format("record compared the images by name and size alone")):
        train(clip, file_pairs(data), tmp_path / "run", settings, resume=True, progress=False)


def test_a_checkpoint_of_in_memory_pairs_resumed_on_files_is_of_another_run_not_older(clip, data_dir, tmp_path):
    """A run on pairs without files records no images' contents; resumed on a folder of images it was refused as
    written by an older tclip_jax that compared the images by name and size alone. It is a current checkpoint of
    another run: what differs is said, as for any other run."""
    settings = TrainSettings(epochs=1, batch_size=2, learning_rate=1e-2)
    train(clip, in_memory_pairs(), tmp_path / "run", settings, progress=False)
    recorded = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["pairs"]
    with pytest.raises(ValueError, match=r"^--resume: the checkpoint in \S+checkpoint is of another run: pairs ") as e:
        train(clip, file_pairs(data_dir), tmp_path / "run", settings.replace(epochs=2), resume=True, progress=False)
    assert f"{recorded['fingerprint']!r}" in str(e.value) and "older" not in str(e.value)


def test_an_image_damaged_past_its_header_is_named_by_its_line_and_a_tsv_list_is_read_as_the_folders(
        clip, data_dir, tmp_path):
    """An image cut short after its header passes the up-front check and fails only when decoded: it was reported
    without the list's line the other data errors give. `--data DIR/captions.tsv` was refused; it is the folder's
    list, read as such."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    as_file, as_folder = file_pairs(data / "captions.tsv"), file_pairs(data)
    assert (as_file.fingerprint, as_file.count) == (as_folder.fingerprint, as_folder.count)
    image = data / "img1.png"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"^{data / 'captions.tsv'}:2: cannot read image file {image}: image file is "
                                         "truncated"):
        pair_features(clip, file_pairs(data / "captions.tsv"), progress=False)


OLDER = (r"^--resume: the checkpoint in \S+ was written by an older tclip_jax, whose {}, so it cannot tell what it was "
         r"trained on; train afresh in another --out$")


def test_a_checkpoint_written_before_fingerprints_is_refused_in_one_line(clip, data_dir, tmp_path):
    """Its state.json names the model, data and attention by path: a model changed at the same path would resume."""
    settings = TrainSettings(epochs=2, batch_size=3, learning_rate=1e-2)
    train(clip, file_pairs(data_dir), tmp_path / "old", settings.replace(epochs=1), progress=False)
    state_path = tmp_path / "old" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state.update(model={k: state["model"][k] for k in ("origin", "source")}, pairs=state["pairs"]["description"],
                 pair_count=state["pairs"]["count"], attention="clip")  # the earlier layout
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=OLDER.format("record named the model, the data and the attention model by "
                                                      "path alone")):
        train(clip, file_pairs(data_dir), tmp_path / "old", settings, resume=True, progress=False)


def test_a_checkpoint_of_a_first_definition_fingerprint_is_refused_in_one_line(clip, data_dir, tmp_path):
    """A fingerprint of 16 hex digits, no "v2-", covered too few weights to tell the model the run trained on (the
    attention model's: its weights rounded to float16, not its config)."""
    settings = TrainSettings(epochs=2, batch_size=3, learning_rate=1e-2)
    train(clip, file_pairs(data_dir), tmp_path / "old", settings.replace(epochs=1), progress=False)
    state_path = tmp_path / "old" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    for key, why in (("model", "model fingerprint covered fewer weights"),
                     ("attention", "fingerprint of the attention model covered neither its config nor its weights "
                                   "whole")):
        state_path.write_text(json.dumps({**state, key: {**state[key], "fingerprint": "0123456789abcdef"}}))
        with pytest.raises(ValueError, match=OLDER.format(why)):
            train(clip, file_pairs(data_dir), tmp_path / "old", settings, resume=True, progress=False)


def test_training_that_diverges_stops_and_saves_nothing_and_a_fresh_run_keeps_earlier_projections(clip, data_dir,
                                                                                                  tmp_path):
    largest = float(np.finfo(np.float32).max)
    with pytest.raises(ValueError, match=r"training diverged in epoch 1 \(loss [0-9.]+\): the projections are not "
                                         "finite; nothing was saved"):  # a step of float32's largest overflows at once
        train(clip, file_pairs(data_dir), tmp_path / "inf", TrainSettings(epochs=2, batch_size=4,
                                                                          learning_rate=largest), progress=False)
    assert not (tmp_path / "inf" / PROJECTIONS_FILE).exists() and not (tmp_path / "inf" / "checkpoint").exists()
    with pytest.raises(ValueError, match=r"training diverged in epoch 2 \(loss nan\): the projections are not "
                                         "finite; the checkpoint of epoch 1 is kept. A lower --learning-rate may "
                                         r"help, in another --out \(or once \S+checkpoint is removed\)$"):
        train(clip, file_pairs(data_dir), tmp_path / "nan", TrainSettings(epochs=2, batch_size=4,
                                                                          learning_rate=1e38), progress=False)
    assert not (tmp_path / "nan" / PROJECTIONS_FILE).exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / PROJECTIONS_FILE).write_bytes(b"earlier")
    with pytest.raises(FileExistsError, match=f"holds {PROJECTIONS_FILE} \\(of an earlier run\\)"):
        train(clip, file_pairs(data_dir), tmp_path / "kept", TrainSettings(epochs=1), progress=False)
    assert (tmp_path / "kept" / PROJECTIONS_FILE).read_bytes() == b"earlier"


def test_a_full_disk_while_saving_a_checkpoint_is_the_oserror_it_is(tmp_path, monkeypatch):
    """safetensors says a full disk as its own SafetensorError, which `tclip train-eclip` said as an internal error
    (status 1); it is raised as the OSError it wraps (one line, status 2), and the checkpoint is not left half
    written. The library's error as it raised it on a full tmpfs, with the part of the file it had written."""
    import errno

    import safetensors
    import safetensors.numpy

    from tclip_jax.methods.eclip.train import save_checkpoint

    def full_disk(arrays, path, metadata=None):
        pathlib.Path(path).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError) as raised:
        save_checkpoint(tmp_path / "checkpoint", {"image": np.ones((4, 2), np.float32)}, (np.zeros(3, np.float32),),
                        {"epoch": 1, "step": 2})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename.endswith("/state.safetensors")
    assert list(tmp_path.iterdir()) == []


def _json_write_fails_on_a_full_disk(monkeypatch):
    """Every write of a .json file through `tclip_jax.files` raises ENOSPC, as a full disk does."""
    import errno
    import io

    import tclip_jax.files

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = open
    monkeypatch.setattr(tclip_jax.files, "open", lambda file, mode="r", *args, **kwargs: FullDisk(file, "w") if (
        ".json." in os.fspath(file) and "w" in mode) else real_open(file, mode, *args, **kwargs), raising=False)


def test_a_failed_projections_save_leaves_the_pair_there_was_never_projections_without_their_json(
        clip, fixtures_dir, tmp_path, monkeypatch, capsys):
    """The projections were written before their JSON: a full disk on the JSON (or Ctrl-C, SIGTERM between the two)
    left projections without a JSON, which loading checks by widths alone (projections of another model of the same
    widths were accepted), or new projections beside the JSON of the old. A save writes both, then lands them
    together: a failed one leaves the pair there was (or nothing), and a signal during the renames is held until the
    pair is whole."""
    import signal

    import tclip_jax.files

    old = save_projections(tmp_path / PROJECTIONS_FILE, clip_projections(clip.params), clip)
    kept = {p.name: p.read_bytes() for p in (old, old.with_suffix(".json"))}
    doubled = {k: v * 2 for k, v in clip_projections(clip.params).items()}
    (tmp_path / "fresh").mkdir()
    with monkeypatch.context() as patched:
        _json_write_fails_on_a_full_disk(patched)
        for path in (old, tmp_path / "fresh" / PROJECTIONS_FILE):
            with pytest.raises(OSError, match="No space left on device"):
                save_projections(path, doubled, clip, {"steps": 1})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == kept  # no temporaries either
    assert list((tmp_path / "fresh").iterdir()) == []

    real_replace = os.replace

    def interrupted_between(source, target):  # Ctrl-C as the first file lands
        signal.raise_signal(signal.SIGINT)
        real_replace(source, target)

    with monkeypatch.context() as patched:
        patched.setattr(tclip_jax.files.os, "replace", interrupted_between)
        with pytest.raises(KeyboardInterrupt):
            save_projections(old, doubled, clip, {"steps": 1})
    np.testing.assert_array_equal(load_projections(old, clip)[0]["text"], doubled["text"])
    assert json.loads(old.with_suffix(".json").read_text())["training"] == {"steps": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eclip_projections.json", PROJECTIONS_FILE, "fresh"]

    # On the command line: one line, status 2, and no projections file left without its JSON.
    _json_write_fails_on_a_full_disk(monkeypatch)
    out = tmp_path / "run"
    assert tclip(["train-eclip", "--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--activation", "quick_gelu",
                  "--synthetic", "2", "--epochs", "1", "--batch-size", "2", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1, err
    assert not (out / PROJECTIONS_FILE).exists() and not (out / PROJECTIONS_FILE).with_suffix(".json").exists()


def test_a_damaged_checkpoint_is_named(clip, data_dir, tmp_path):
    settings = TrainSettings(epochs=1, batch_size=4)
    train(clip, file_pairs(data_dir), tmp_path / "run", settings, progress=False)
    state = tmp_path / "run" / "checkpoint" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"the checkpoint in .*checkpoint is damaged \(SafetensorError"):
        train(clip, file_pairs(data_dir), tmp_path / "run", settings.replace(epochs=2), resume=True, progress=False)


@pytest.mark.parametrize("tamper, why", [
    (lambda state, arrays: state.update(epoch="1"), "its epoch is '1', not a count"),
    (lambda state, arrays: state.update(step=-3), "its step is -3, not a count"),
    (lambda state, arrays: state.update(epoch=True), "its epoch is True, not a count"),
    (lambda state, arrays: arrays.update({"projections/image": arrays["projections/image"][:, :4].copy()}),
     r"projections/image is float32 \(\d+, 4\), not float32 \(\d+, \d+\)"),
    (lambda state, arrays: arrays.update({"projections/text": arrays["projections/text"].astype(np.float16)}),
     r"projections/text is float16 \(128, 64\), not float32 \(128, 64\)"),
    (lambda state, arrays: arrays["projections/image"].__setitem__((0, 0), np.nan), "projections/image is not finite"),
    (lambda state, arrays: arrays["optimizer/1"].flat.__setitem__(0, np.inf), "optimizer/1 is not finite")])
def test_a_tampered_checkpoint_is_named_damaged(clip, tmp_path, tamper, why):
    """Keys alone were checked: these gave raw errors, a wrong diagnosis, or (all epochs done) NaN projections."""
    import safetensors.numpy

    pairs = in_memory_pairs(4)
    settings = TrainSettings(epochs=1, batch_size=4)
    train(clip, pairs, tmp_path / "run", settings, progress=False)
    (tmp_path / "run" / PROJECTIONS_FILE).unlink()
    folder = tmp_path / "run" / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    arrays = safetensors.numpy.load_file(folder / "state.safetensors")
    tamper(state, arrays)
    (folder / "state.json").write_text(json.dumps(state))
    safetensors.numpy.save_file(arrays, folder / "state.safetensors")
    with pytest.raises(ValueError, match=rf"^--resume: the checkpoint in \S+ is damaged \({why}\); train afresh "):
        train(clip, pairs, tmp_path / "run", settings, resume=True, progress=False)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the limit's own refusal is tested
def test_lists_in_spreadsheet_encodings_and_bad_rows_are_read_or_named(data_dir, tmp_path):
    import shutil

    from PIL import Image

    for i in range(2):
        shutil.copy(data_dir / f"img{i}.png", tmp_path / f"img{i}.png")
    listing = tmp_path / "pairs.csv"
    listing.write_bytes("path,caption\nimg0.png,a red circle\nimg1.png,a blue square\n".encode("utf-8-sig"))
    assert file_pairs(listing).count == 2  # a byte-order mark, as Excel writes: not part of the first column
    listing.write_bytes("path,caption\nimg0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="pairs.csv is not UTF-8 text"):
        file_pairs(listing)
    listing.write_text("path,caption\nimg0.png,a red circle, and more\n")
    with pytest.raises(ValueError, match=r"pairs.csv:2: more fields than the header's"):
        file_pairs(listing)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not an image")
    listing.write_text("path,caption\nimg0.png,a red circle\nbroken.png,a square\n")
    with pytest.raises(ValueError, match=r"pairs.csv:3: cannot read image file .*broken.png"):
        file_pairs(listing)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    listing.write_text("path,caption\nbig.png,a square\n")
    assert file_pairs(listing).count == 1
    with pytest.raises(ValueError, match=r"pairs.csv:2: .*1,600 pixels, more than the limit of 1,000"):
        from tclip_jax.image.io import max_pixels, set_max_pixels

        limit = max_pixels()
        set_max_pixels(1000)
        try:
            file_pairs(listing)
        finally:
            set_max_pixels(limit)


def test_the_attention_of_a_hugging_face_vit(tmp_path):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    attention = ViTAttention(tmp_path / "vit")
    pixels = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)  # CLIP-normalized
    # The input of a CLIP that normalizes pixels as some of LAION's do (mean and std 0.5), un-normalized as it was.
    clip_config = dataclasses.replace(PRESETS["ViT-B/32"], image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    maps = attention(pixels, (4, 4), clip_config)  # the ViT's own grid: no resizing
    from tclip_jax.methods.eclip.train import IMAGENET_MEAN, IMAGENET_STD

    rgb = (pixels * 0.5 + 0.5 - IMAGENET_MEAN) / IMAGENET_STD
    model = ViTModel.from_pretrained(tmp_path / "vit", attn_implementation="eager").eval()
    with torch.no_grad():
        probs = model(pixel_values=torch.from_numpy(rgb.transpose(0, 3, 1, 2)), output_attentions=True).attentions
    np.testing.assert_allclose(maps, probs[-1][:, :, 0, 1:].mean(dim=1).numpy(), rtol=1e-4, atol=1e-6)
    # Resized to CLIP's grid bilinearly (align_corners=False): at exactly half the side, the means of 2x2 blocks.
    blocks = maps.reshape(2, 2, 2, 2, 2).mean(axis=(2, 4)).reshape(2, 4)  # [B, gh, 2, gw, 2] -> [B, gh*gw]
    np.testing.assert_allclose(attention(pixels, (2, 2), clip_config), blocks, rtol=1e-5, atol=1e-7)
    with pytest.raises(FileNotFoundError, match="attention model folder .* not found"):
        ViTAttention(tmp_path / "no_such_vit")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.npz is a file; name a Hugging Face ViTModel folder"):
        ViTAttention(tmp_path / "weights.npz")
    assert ViTAttention(str(tmp_path / "vit") + "/").fingerprint == attention.fingerprint  # spelt otherwise
    # transformers builds a ViT from any config and leaves what the weights lack random: refused instead.
    from transformers import CLIPConfig, CLIPModel

    CLIPModel(CLIPConfig(text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "intermediate_size": 32},
                         vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "intermediate_size": 32, "image_size": 32, "patch_size": 16},
                         projection_dim=8)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"--dino .*clip is a 'clip' model, not a ViT"):
        ViTAttention(tmp_path / "clip")
    deeper = ViTConfig(**{**config.to_dict(), "num_hidden_layers": 3})
    (tmp_path / "vit" / "config.json").write_text(deeper.to_json_string())  # weights of 2 layers for 3
    with pytest.raises(ValueError, match=r"its weights lack \d+ of the ViT's tensors \(e\.g\. layers?\.2\..*\), which "
                                         "would be random"):
        ViTAttention(tmp_path / "vit")


def test_a_vit_is_fed_the_pixels_its_preprocessor_config_normalizes_as_transformers_does(tmp_path):
    """A ViT whose preprocessor_config.json gives its own mean and std (0.5 and 0.5, as ViTImageProcessor's
    defaults) was fed ImageNet-normalized pixels: its attention is that of transformers' ViTImageProcessor and
    ViTModel, on an image at the ViT's own size (no resizing on either side)."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(tmp_path / "vit")
    maps, expected = _attention_and_transformers(tmp_path / "vit", side=64)  # the ViT's own size
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6)
    # A preprocessor config it cannot read, or whose pixels no input here computes, is said in one line, naming it.
    for config_text, problem in [('{"image_std": [0.5, 0, 0.5]}', r"image_std must be 3 positive numbers"),
                                 ('{"do_rescale": false}', r"do_rescale = False is not supported"),
                                 ('{"rescale_factor": 1}', r"rescale_factor = 1 is not supported"),
                                 ('{"do_resize": false}', r"do_resize = False is not supported"),
                                 ('{"resample": 0}', r"resample = 0 is not supported \(2: bilinear, 3: bicubic\)")]:
        (tmp_path / "vit" / "preprocessor_config.json").write_text(config_text)
        with pytest.raises(ValueError, match=r"^--dino .*vit: cannot read its preprocessor_config.json \(" + problem):
            ViTAttention(tmp_path / "vit")


@pytest.mark.parametrize("resample", [2, 3])
def test_a_vit_smaller_than_clips_input_sees_it_resized_as_its_image_processor_resizes(tmp_path, resample):
    """CLIP's input was resized to the ViT's bilinearly without antialiasing, whatever its preprocessor_config.json's
    resample: 96 -> 32 pixels then gave attention 0.0018 off transformers' ViTImageProcessor (PIL's antialiased
    resize) and ViTModel, 70 % of the maps' range. Now within 5 % of the range (PIL resizes 8-bit pixels, rounded)."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}, resample=resample).save_pretrained(tmp_path / "vit")
    maps, expected = _attention_and_transformers(tmp_path / "vit", side=96)
    np.testing.assert_allclose(maps, expected, rtol=0, atol=0.05 * np.ptp(expected))


def _attention_and_transformers(folder: pathlib.Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(`ViTAttention` of the ViT in `folder` on 4x4 grids of two random side x side images, as a CLIP with OpenAI's
    mean and std feeds them; the reference: transformers' ViTImageProcessor of the folder and ViTModel on the same
    8-bit images)."""
    import torch
    from transformers import ViTImageProcessor, ViTModel

    images = np.random.default_rng(3).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    clip_config = PRESETS["ViT-B/32"]  # OpenAI's mean and std, un-normalized again
    pixels = (images / 255 - np.asarray(clip_config.image_mean)) / np.asarray(clip_config.image_std)
    maps = ViTAttention(folder)(pixels.astype(np.float32), (4, 4), clip_config)
    processor = ViTImageProcessor.from_pretrained(folder)
    model = ViTModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        probs = model(**processor(images=list(images), return_tensors="pt"), output_attentions=True).attentions
    return maps, probs[-1][:, :, 0, 1:].mean(dim=1).numpy()


def test_the_attention_models_fingerprint_tells_its_config_and_exact_weights_and_damage_is_one_line(tmp_path):
    """It hashed the weights rounded to float16 alone: another config (heads, activation), or weights that differ
    below float16's resolution, resumed a run trained on the other ViT."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16), add_pooling_layer=False).save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "heads4")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "heads4" / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4,
                                                                "hidden_act": "relu"}))
    model = ViTModel.from_pretrained(tmp_path / "a", add_pooling_layer=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p * 1e-4)  # below float16's resolution for most entries
    model.save_pretrained(tmp_path / "tweak")
    prints = {n: ViTAttention(tmp_path / n).fingerprint for n in ("a", "heads4", "tweak")}
    assert len(set(prints.values())) == 3 and all(p.startswith("v2-") for p in prints.values()), prints
    # Damage: one line naming --dino and the folder; a pickled .bin is never read.
    shutil.copytree(tmp_path / "a", tmp_path / "trunc")
    (tmp_path / "trunc" / "model.safetensors").write_bytes((tmp_path / "a" / "model.safetensors").read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"^--dino \S+trunc: cannot load it \(SafetensorError: "):
        ViTAttention(tmp_path / "trunc")
    shutil.copytree(tmp_path / "a", tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"^--dino \S+bin has no model.safetensors \(pytorch_model.bin is a pickle, "
                                         r"which could run code when read: save its weights as safetensors\)$"):
        ViTAttention(tmp_path / "bin")
    (tmp_path / "heads4" / "config.json").write_text(json.dumps({**config, "hidden_act": "no_such_act"}))
    with pytest.raises(ValueError, match=r"^--dino \S+heads4: cannot load it \(KeyError: "):
        ViTAttention(tmp_path / "heads4")


def test_loading_the_attention_model_draws_no_progress_bar_of_its_own(tmp_path, capsys):
    """transformers' "Loading weights" bar is not train-eclip's to show (and its setting is put back)."""
    import torch
    from transformers import ViTConfig, ViTModel
    from transformers.utils import logging as transformers_logging

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    capsys.readouterr()
    transformers_logging.enable_progress_bar()
    ViTAttention(tmp_path / "vit")
    captured = capsys.readouterr()
    assert "Loading" not in captured.err + captured.out and transformers_logging.is_progress_bar_enabled()


def test_a_hub_attention_model_comes_from_the_hub_cache_and_offline_says_what_to_do(tmp_path, monkeypatch):
    import shutil

    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import, from the env
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "cache" / "models--somebody--tiny-dino"  # huggingface_hub's cache layout of a download
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "vit", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pixels = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    from_hub = ViTAttention("somebody/tiny-dino")
    assert from_hub.origin == "somebody/tiny-dino"
    config = PRESETS["ViT-B/32"]
    np.testing.assert_array_equal(from_hub(pixels, (2, 2), config),
                                  ViTAttention(tmp_path / "vit")(pixels, (2, 2), config))
    with pytest.raises(ConnectionError, match=r"cannot fetch 'somebody/no-dino' .*pass DIR as --dino\.$"):
        ViTAttention("somebody/no-dino")


@pytest.mark.parametrize("absent", ["transformers", "torch"])
def test_dino_without_transformers_or_torch_names_the_extra_to_install(tmp_path, capsys, monkeypatch, absent):
    """transformers and torch are optional (the test and convert extras held them): an installed user's --dino said
    "error: No module named 'transformers'". It names the extra that installs both, as a pickled checkpoint names
    the convert extra, before anything is written."""
    import sys

    monkeypatch.setitem(sys.modules, absent, None)  # import fails as if not installed
    assert tclip(["train-eclip", "--synthetic", "2", "--dino", "facebook/dino-vitb16", "--out",
                  str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("tclip train-eclip: error: --dino needs transformers and PyTorch: pip install "
                                       "'tclip_jax[dino]'\n")
    assert not (tmp_path / "o").exists()


def test_train_then_explain_from_the_command_line(clip, fixtures_dir, data_dir, tmp_path, capsys):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    model = str(fixtures_dir / "tiny_openai_clip.npz")
    out = tmp_path / "eclip"
    assert tclip(["train-eclip", "--model", model, "--activation", "quick_gelu", "--data", str(data_dir),
                  "--dino", str(tmp_path / "dino"), "--epochs", "1", "--batch-size", "4", "--out", str(out)]) == 0
    assert "(1 step, last loss" in capsys.readouterr().out  # one step, said so
    info = json.loads((out / PROJECTIONS_FILE).with_suffix(".json").read_text())
    assert info["training"]["attention"]["origin"] == str(tmp_path / "dino")
    assert info["training"]["attention"]["resize"] == "bilinear, antialiased"  # CLIP's 224 pixels to the ViT's 64
    projections = out / PROJECTIONS_FILE
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "red circle", "--method", "eclip",
                  "--option", f"projections={projections}", "--model", model, "--activation", "quick_gelu",
                  "--out", str(tmp_path / "x")]) == 0
    record = json.loads((tmp_path / "x" / "scene_224" / "result.json").read_text())
    assert record["run"]["method"] == "eclip" and record["run"]["projections"] == {
        "file": str(projections.resolve()), "sha256": hashlib.sha256(projections.read_bytes()).hexdigest()}
    assert (tmp_path / "x" / "scene_224" / record["prompts"][0]["phrase"]["overlay"]).is_file()
    assert "warning" not in capsys.readouterr().err

    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "red circle", "--method", "eclip",
                  "--model", model, "--activation", "quick_gelu", "--out", str(tmp_path / "y"), "--no-html"]) == 0
    record = json.loads((tmp_path / "y" / "scene_224" / "result.json").read_text())
    assert record["run"]["projections"] == "CLIP's own projections (untrained ECLIP)"

    # --resume goes on from the checkpoint: --epochs 1, then 2 resumed, is an uninterrupted run of 2.
    assert tclip(["train-eclip", "--model", model, "--activation", "quick_gelu", "--data", str(data_dir),
                  "--dino", str(tmp_path / "dino"), "--epochs", "2", "--batch-size", "4", "--out", str(out),
                  "--resume"]) == 0
    assert "2 steps" in capsys.readouterr().out
    whole = train(clip, file_pairs(data_dir), tmp_path / "whole", TrainSettings(epochs=2, batch_size=4),
                  ViTAttention(tmp_path / "dino"), progress=False)
    resumed, _ = load_projections(projections, clip)
    for key in ("image", "text"):
        np.testing.assert_array_equal(resumed[key], whole.projections[key], err_msg=key)
    # A run begun before CLIP's input was shrunk to the ViT's antialiased (its record says no resize) is not resumed
    # with the other attention maps.
    state_file = out / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["attention"]["resize"]
    state_file.write_text(json.dumps(state))
    assert tclip(["train-eclip", "--model", model, "--activation", "quick_gelu", "--data", str(data_dir),
                  "--dino", str(tmp_path / "dino"), "--epochs", "3", "--batch-size", "4", "--out", str(out),
                  "--resume"]) == 2
    assert "is of another run: attention {" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, before our refusal
def test_bad_inputs_give_one_line_errors(fixtures_dir, data_dir, tmp_path, capsys, monkeypatch):
    model = str(fixtures_dir / "tiny_openai_clip.npz")

    def fails(argv, message):
        assert tclip(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "captions.tsv").write_text("\n")
    fails(["train-eclip", "--data", str(empty), "--out", str(tmp_path / "o")], "has no image-text pairs")
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "captions.tsv").write_text("gone.png\ta cat\n")
    fails(["train-eclip", "--data", str(missing), "--out", str(tmp_path / "o")], "captions.tsv:1: image")
    fails(["train-eclip", "--synthetic", "2", "--dino", str(tmp_path / "no_dino"), "--out", str(tmp_path / "o")],
          "attention model folder")
    for count in ("0", "20000000"):  # past the training scenes it said "training seeds must stay below ..."
        fails(["train-eclip", "--synthetic", count, "--out", str(tmp_path / "o")],
              "--synthetic must be an integer from 1 to 10000000 (the synthetic training scenes there are), got "
              + count)
    (missing / "pairs.csv").write_text("path,caption\n,a cat\n")  # it said "image <the list's folder> not found"
    fails(["train-eclip", "--data", str(missing / "pairs.csv"), "--out", str(tmp_path / "o")],
          f"{missing / 'pairs.csv'}:2: the image path is empty")
    assert not (tmp_path / "o").exists()
    # --max-pixels is the limit the images' headers are checked against (the process's: restored after).
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    large = tmp_path / "large"
    large.mkdir()
    Image.new("RGB", (40, 40)).save(large / "big.png")
    (large / "captions.tsv").write_text("big.png\ta cat\n")
    fails(["train-eclip", "--data", str(large), "--max-pixels", "1000", "--out", str(tmp_path / "o")],
          f"captions.tsv:1: image file {large / 'big.png'} (40x40) has 1,600 pixels, more than the limit of 1,000")
    (tmp_path / "a_file").write_text("x")  # refused before any feature is computed
    fails(["train-eclip", "--synthetic", "2", "--out", str(tmp_path / "a_file" / "o")],
          f"--out {tmp_path / 'a_file' / 'o'}: {tmp_path / 'a_file'} is a file, not a folder")

    clip = load_clip(model, activation="quick_gelu")
    wrong = save_projections(tmp_path / "wrong.safetensors", {"image": np.zeros((64, 64)), "text": np.zeros((128, 64))},
                             clip)
    explain = ["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "a cat", "--method", "eclip",
               "--model", model, "--activation", "quick_gelu", "--out", str(tmp_path / "x")]
    fails(explain + ["--option", f"projections={wrong}"], "do not fit the model")
    fails(explain + ["--option", "projection=x"], "unknown option 'projection' (did you mean 'projections'?); known "
                                                  "settings: box_rule, truncate, projections")
    assert not (tmp_path / "x").exists()


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_ends_as_if_alone(clip, tmp_path):
    """Two runs into one --out at once each wrote its files over the other's, and both reported success: while one
    runs (here: held reading its data), another into the same folder, however spelt, is refused in one line."""
    import threading

    from tclip_jax.methods.eclip.train import train

    reading, release = threading.Event(), threading.Event()
    scenes = [make_scene(seed, 64) for seed in range(4)]

    def held():
        reading.set()
        release.wait(60)
        yield from ((s.image, s.caption, None) for s in scenes)

    settings = TrainSettings(epochs=1, batch_size=2)
    first = {}
    runner = threading.Thread(target=lambda: first.update(result=train(
        clip, Pairs("held", "held", 4, held), tmp_path / "out", settings, progress=False)))
    runner.start()
    assert reading.wait(60)
    for spelt in (tmp_path / "out", f"{tmp_path}/x/../out"):
        with pytest.raises(ValueError, match=f"another train-eclip run \\(process {os.getpid()} on .*\\) is running in "):
            train(clip, in_memory_pairs(4), spelt, settings, progress=False)
    release.set()
    runner.join(120)
    alone = train(clip, in_memory_pairs(4), tmp_path / "alone", settings, progress=False)
    np.testing.assert_array_equal(first["result"].projections["text"], alone.projections["text"])
    scenes_again = Pairs("held", "held", 4, lambda: ((s.image, s.caption, None) for s in scenes))
    assert train(clip, scenes_again, tmp_path / "out", settings.replace(epochs=2), resume=True,
                 progress=False).steps == 4  # once it has ended
    assert not list((tmp_path / "out").glob("*.lock"))
    with pytest.raises(FileNotFoundError, match="holds no training checkpoint"):  # refused inside the lock
        train(clip, scenes_again, tmp_path / "new" / "deeper", settings, resume=True, progress=False)
    assert not (tmp_path / "new").exists()  # the folders made for the lock are gone


@pytest.mark.parametrize("name", ["learning_rate", "weight_decay"])
def test_a_learning_rate_or_weight_decay_float32_cannot_hold_is_refused_at_once(name, tmp_path, capsys):
    """optax runs both in float32: --learning-rate 1e300 passed (only <= 0 was refused), trained, warned "overflow
    encountered in cast" and ended as diverged. Refused when the settings are made, in one line naming the flag,
    before anything is made; float32's largest value itself is taken."""
    largest, smallest = float(np.finfo(np.float32).max), float(np.finfo(np.float32).smallest_subnormal)
    # 2**128: the first power of two past float32's range; 2**-150: half its smallest, which rounds to 0
    for value in (1e300, 2.0 ** 128, -1e39, 1e-50, 2.0 ** -150):
        with pytest.raises(ValueError, match=f"^{name} must be a finite number that float32 holds \\(at most "
                                             "3.40282e\\+38 in magnitude, and 0 or at least 1.4013e-45\\), got "
                                             f"{re.escape(repr(value))}$"):
            TrainSettings(**{name: value})
    assert getattr(TrainSettings(**{name: largest}), name) == largest
    assert getattr(TrainSettings(**{name: smallest}), name) == smallest
    flag = "--" + name.replace("_", "-")
    assert tclip(["train-eclip", "--synthetic", "4", "--epochs", "1", "--batch-size", "2", flag, "1e300",
                  "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"tclip train-eclip: error: {flag} must be a finite number that float32 holds "
                                       "(at most 3.40282e+38 in magnitude, and 0 or at least 1.4013e-45), got "
                                       "1e+300\n")
    assert not (tmp_path / "out").exists()


def test_a_contrastive_batch_of_one_pair_is_refused(clip, tmp_path):
    """InfoNCE over one pair is 0 with no gradient: a batch size of 1, or data of one pair, trained nothing (the
    projections were CLIP's own times AdamW's decay) and reported success."""
    from tclip_jax.methods.eclip.train import TrainSettings, synthetic_pairs, train

    with pytest.raises(ValueError, match="batch_size must be >= 2, got 1"):
        TrainSettings(batch_size=1)
    with pytest.raises(ValueError, match="^1 synthetic training scene holds 1 image-text pair; contrastive training "
                                         "needs at least 2$"):
        train(clip, synthetic_pairs(1), tmp_path / "one", TrainSettings(epochs=1, batch_size=2), progress=False)
    assert not (tmp_path / "one").exists()
    # An epoch's last batch of one pair is left out: 3 pairs in batches of 2 make one step an epoch, not two.
    settings = TrainSettings(epochs=2, batch_size=2)
    three = train(clip, synthetic_pairs(3), tmp_path / "three", settings, progress=False)
    assert three.steps == 2 and three.loss > 0
    # Each epoch's batch is the first two of epoch_order over all three pairs, so the pair left out varies.
    pooled, texts, _ = pair_features(clip, synthetic_pairs(3), progress=False)
    optimizer = make_optimizer(settings)
    step = make_train_step(optimizer)
    projections = clip_projections(clip.params)
    opt_state, logit_scale = optimizer.init(projections), clip.params["logit_scale"]
    for epoch in range(settings.epochs):
        index = epoch_order(settings, 3, epoch)[:2]
        projections, opt_state, _ = step(projections, opt_state, pooled[index], texts[index], logit_scale)
    for key in ("image", "text"):
        np.testing.assert_allclose(three.projections[key], projections[key], atol=1e-7, err_msg=key)
    # A checkpoint written before took a step on that batch: not resumed (one without such a batch is, above).
    state_path = tmp_path / "three" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    del state["one_pair_batch"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="is of another run: one_pair_batch None there, 'left out' here \\(it was "
                                         "written before an epoch's last batch of a single pair was left out"):
        train(clip, synthetic_pairs(3), tmp_path / "three", TrainSettings(epochs=3, batch_size=2), resume=True,
              progress=False)
