"""Gate evaluation of an embedded model on held-out synthetic protocols: the instrument of the recipe search.

For each protocol of `tclip_jax.synthetic.PROTOCOLS` (see its module docstring) and the first `--scenes` held-out
seeds, every evaluation unit's word is mapped by TCLIP (`TCLIP.encode_prompts` / `device_maps`, maps brought to
the image's size with `to_original`) and scored:
- ``pointing``: the map's argmax pixel lies in a referent's silhouette (`pointing_game`, tolerance 1);
- ``box_acc``: the Otsu box (largest component, `heatmap_box`) has IoU >= 0.5 with a referent's box (`box_hit`);
- ``pointing_painted``: the argmax lies on a referent's painted pixels (differs from pointing for outlines only);
- ``wrong``: wrong_attribute only, the argmax lies in the named-but-wrong object's silhouette.
Means are reported per word kind (colour, shape, relation) and over all units; many_objects also per phrase
position. Retrieval: image <-> text top-1 by the global embeddings among `retrieval_scenes(256)`.

    PYTHONPATH=. python training/gates.py --model tclip_jax/data/default_model --translations 25 --scenes 100 \
        --out gates.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import jax
import numpy as np

from tclip_jax.loading import LoadedClip, load_clip
from tclip_jax.method.explainer import TCLIP, Settings
from tclip_jax.metrics import box_hit, pointing_game
from tclip_jax.postprocess import heatmap_box
from tclip_jax.preprocess import to_original, whole_image
from tclip_jax.synthetic import KINDS, PROTOCOLS, ProtocolSample, heldout_seeds, protocol_sample, retrieval_scenes

QUERY_BLOCK = 8  # queries per device call are padded to a multiple of this, to bound recompilation
RETRIEVAL_SCENES = 256


def unit_scores(explainer: TCLIP, samples: Sequence[ProtocolSample]) -> list[dict]:
    """One record per unit of `samples`: kind, position and the scores (see the module docstring)."""
    prompts = list(dict.fromkeys(u.prompt for s in samples for u in s.units))
    encoded = explainer.encode_prompts(prompts)
    first = np.cumsum([0] + [len(words) for words in encoded.words])
    records = []
    for sample in samples:
        if not sample.units:
            continue
        rows = []
        for unit in sample.units:
            p = prompts.index(unit.prompt)
            (w,) = [i for i, word in enumerate(encoded.words[p]) if (word.start, word.end) == unit.span]
            rows.append(first[p] + w)
        queries = encoded.queries[rows]
        padded = -(-len(rows) // QUERY_BLOCK) * QUERY_BLOCK
        queries = np.concatenate([queries, np.repeat(queries[:1], padded - len(rows), axis=0)])
        _, pixels, geometry = explainer.preprocess(sample.image)
        _, maps = explainer.device_maps(pixels[None], queries)
        maps = to_original(np.asarray(maps[0][:len(rows)]), geometry)
        objects = sample.scene.objects
        for unit, heatmap in zip(sample.units, maps):
            painted = np.logical_or.reduce([objects[i].mask for i in unit.referents])
            record = {"protocol": unit.protocol, "kind": unit.kind, "position": unit.position,
                      "pointing": float(pointing_game(heatmap, unit.gt_mask)),
                      "pointing_painted": float(pointing_game(heatmap, painted)),
                      "box_acc": float(box_hit(heatmap_box(heatmap, rule=explainer.settings.box_rule),
                                               unit.gt_boxes))}
            if unit.wrong_mask is not None:
                record["wrong"] = float(pointing_game(heatmap, unit.wrong_mask))
            records.append(record)
    return records


def summarise(records: Sequence[dict]) -> dict:
    """Means per kind and over all units (and per position where positions are set)."""
    metrics = ("pointing", "box_acc", "pointing_painted", "wrong")

    def means(group: Sequence[dict]) -> dict:
        out = {"units": len(group)}
        for m in metrics:
            values = [r[m] for r in group if m in r]
            if values:
                out[m] = float(np.mean(values))
        return out

    summary = {"all": means(records)}
    for kind in KINDS:
        group = [r for r in records if r["kind"] == kind]
        if group:
            summary[kind] = means(group)
    positions = sorted({r["position"] for r in records if r["position"]})
    if positions:
        summary["by_position"] = {str(p): means([r for r in records if r["position"] == p]) for p in positions}
    return summary


def retrieval(clip: LoadedClip, count: int = RETRIEVAL_SCENES, chunk: int = 64) -> dict:
    """Image <-> text top-1 among `retrieval_scenes(count)` by the global embeddings (whole-image input)."""
    scenes = retrieval_scenes(count)
    size = clip.config.image_size
    apply = jax.jit(lambda params, pixels, ids: clip.model.apply({"params": params}, pixels, ids)[1:])
    image_embeds, text_embeds = [], []
    for start in range(0, count, chunk):
        part = scenes[start:start + chunk]
        pixels = np.stack([whole_image(s.image, size)[0] for s in part])
        ids = clip.tokenizer.encode([s.caption for s in part], clip.config.context_length)
        images, texts = apply(clip.params, pixels, ids)
        image_embeds.append(np.asarray(images))
        text_embeds.append(np.asarray(texts))
    similarity = np.concatenate(image_embeds) @ np.concatenate(text_embeds).T
    truth = np.arange(count)
    return {"scenes": count, "image_to_text_top1": float(np.mean(similarity.argmax(1) == truth)),
            "text_to_image_top1": float(np.mean(similarity.argmax(0) == truth))}


def evaluate(clip: LoadedClip, translations: int, scenes: int, protocols: Sequence[str] = PROTOCOLS,
             offset: int = 0, with_retrieval: bool = True) -> dict:
    explainer = TCLIP(clip, Settings(translations=translations))
    result = {"settings": dataclasses.asdict(explainer.settings),
              "seeds": {"start": heldout_seeds(scenes, offset).start, "stop": heldout_seeds(scenes, offset).stop},
              "protocols": {}}
    for protocol in protocols:
        start = time.perf_counter()
        samples = [protocol_sample(protocol, seed) for seed in heldout_seeds(scenes, offset)]
        result["protocols"][protocol] = summarise(unit_scores(explainer, samples))
        print(f"{protocol}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if with_retrieval:
        result["retrieval"] = retrieval(clip)
    return result


def table(result: dict) -> str:
    """Markdown: one row per protocol, pointing / BoxAcc per kind (and the wrong-object rate)."""
    lines = ["| protocol | units | PG colour | PG shape | PG relation | PG all | Box colour | Box shape | Box all "
             "| wrong-object |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda summary, kind, m: f"{summary[kind][m]:.3f}" if kind in summary and m in summary[kind] else "-"
    for name, s in result["protocols"].items():
        lines.append(f"| {name} | {s['all']['units']} | {fmt(s, 'colour', 'pointing')} | {fmt(s, 'shape', 'pointing')}"
                     f" | {fmt(s, 'relation', 'pointing')} | {fmt(s, 'all', 'pointing')} | {fmt(s, 'colour', 'box_acc')}"
                     f" | {fmt(s, 'shape', 'box_acc')} | {fmt(s, 'all', 'box_acc')} | {fmt(s, 'all', 'wrong')} |")
    if "retrieval" in result:
        r = result["retrieval"]
        lines.append(f"\nRetrieval top-1 on {r['scenes']} held-out scenes: image->text {r['image_to_text_top1']:.3f}, "
                     f"text->image {r['text_to_image_top1']:.3f}")
    return "\n".join(lines)


# The fast subset tests/test_default_model.py re-measures on each shipped model (recorded in gates_fast.json).
FAST_SPEC = {"translations": 1, "scenes": 16,
             "protocols": ["captions", "bare_words", "colour_twins", "wrong_attribute", "small_objects"]}
FAST_FILE = "gates_fast.json"
FAST_MARGIN = 0.15  # below the full K=1 benchmark: 16 scenes per protocol are a noisy sample
RETRIEVAL_MARGIN = 0.05


def fast_bars(full_k1: dict) -> list[dict]:
    """Bars for the fast subset, a margin below (wrong-object rate: above) the full K=1 benchmark's figures."""
    bars = []
    for protocol in FAST_SPEC["protocols"]:
        summary = full_k1["protocols"][protocol]
        for kind in ("colour", "shape"):
            if kind in summary:
                bars.append({"protocol": protocol, "kind": kind, "metric": "pointing",
                             "at_least": round(max(0.0, summary[kind]["pointing"] - FAST_MARGIN), 3)})
        if "wrong" in summary["all"]:
            bars.append({"protocol": protocol, "kind": "all", "metric": "wrong",
                         "at_most": round(min(1.0, summary["all"]["wrong"] + FAST_MARGIN), 3)})
    for metric in ("image_to_text_top1", "text_to_image_top1"):
        bars.append({"protocol": "retrieval", "metric": metric,
                     "at_least": round(max(0.0, full_k1["retrieval"][metric] - RETRIEVAL_MARGIN), 3)})
    return bars


def record_fast(folder: pathlib.Path, full_k1: dict) -> dict:
    """Measures the fast subset on the checkpoint in `folder` and writes it, with its bars, to gates_fast.json."""
    result = evaluate(load_clip(folder), FAST_SPEC["translations"], FAST_SPEC["scenes"], FAST_SPEC["protocols"])
    record = {"spec": FAST_SPEC, "result": result, "bars": fast_bars(full_k1)}
    (folder / FAST_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--translations", type=int, default=25)
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes per protocol")
    parser.add_argument("--protocols", nargs="*", default=list(PROTOCOLS))
    parser.add_argument("--no-retrieval", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--record-fast", type=pathlib.Path, default=None, metavar="FULL_K1_JSON",
                        help="write the fast subset of --model with bars from this full K=1 result, and stop")
    args = parser.parse_args()
    if args.record_fast:
        record = record_fast(pathlib.Path(args.model), json.loads(args.record_fast.read_text()))
        print(table(record["result"]))
        return
    result = evaluate(load_clip(args.model), args.translations, args.scenes, args.protocols,
                      with_retrieval=not args.no_retrieval)
    result["model"] = str(args.model)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
