"""The sweep's report: every process's records merged into dataset scores, as JSON, a Markdown table and an HTML page.

Scores (all fractions in the JSON; the Markdown shows box accuracy in percent, as the paper does):
- detection: ``box_accuracy`` = hits / units (micro, the paper's BoxAcc); ``box_accuracy_class_mean`` = mean
  over classes of each class's accuracy; ``mean_iou``; per class accuracy and unit count.
- segmentation: ``pointing_game`` (micro) and ``pointing_game_class_mean`` (TorchRay's per-class mean);
  ``energy_pg`` (energy in the mask's box) and ``energy_in_mask``, means over units; ``pixel_accuracy`` and
  ``miou`` (background/foreground mean, Chefer et al.) from summed counts; ``mask_iou`` = summed foreground
  intersection / summed foreground union; ``ap`` = mean AP over units (``metrics.summarize_segmentation``).
- seed metrics (``--metrics seed``): mSC, grid-searched and fixed-threshold mIoU (``metrics.seed``, over images:
  each image's units are the categories present).
- wrong attribute: ``wrong_pointing`` = the fraction of units with a named-but-wrong object whose map peaks on it.
Every score is also given per unit group (``groups``; a row each in the tables) where units have one. A group
"KIND N" (a synthetic word kind and a 1-based place, e.g. many_objects' ``shape 4``) also counts in the group KIND
pooled over places (``shape``; `unit_groups`), so such groups overlap (report.md says so): a unit counts in both, and
only the plain groups of a dataset whose groups have no places partition its units.
Records are merged in dataset order, so the report does not depend on how the sweep was split or resumed.
"""
from __future__ import annotations

import html
import json
import pathlib
import re

import numpy as np

from tclip_jax.environment import environment_line
from tclip_jax.files import loads_json, write_text_atomic
from tclip_jax.evaluation.metrics import SegmentationCounts, aggregate_by_class, summarize_segmentation
from tclip_jax.evaluation.metrics.seed import summarize_seed
from tclip_jax.sweep.store import read_all_records
from tclip_jax.synthetic import is_synthetic_dataset
from tclip_jax.visualize.figures import matmul_note, method_label

CONFIG_FILE = "sweep.json"
REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
# The paper's figures for TCLIP with CLIP ViT-B/32, shown beside a sweep run as the paper ran it (`paper_figures`):
# COCO val2017 and ImageNet-S919 (benchmarks/RESULTS.md), not the 50- or 300-class splits.
PAPER = {
    "coco": {"box_accuracy": 0.1907},
    "imagenet-s919": {"pointing_game": 0.775, "energy_pg": 0.445, "pixel_accuracy": 0.6925, "ap": 0.6295,
                      "mask_iou": 0.3817},
}
_SHOWN_ERRORS = 20
# "KIND N", a synthetic word kind and its place: also pooled as KIND (`unit_groups`). Only these kinds: a dataset's
# own group "Route 66" is no place of a "Route" group.
_PLACED_GROUP = re.compile(r"(colour|shape|relation) ([1-9][0-9]*)")


def summarize(records: list[dict]) -> dict:
    """Dataset scores of a sweep's records (see the module doc); with `groups` per unit group if units have one
    (`unit_groups`)."""
    records = sorted(records, key=lambda r: r["index"])
    units = [u for r in records if "units" in r for u in r["units"]]
    summary: dict = {
        "images": sum("units" in r for r in records),
        "units": len(units),
        "errors": [{"key": r["key"], "error": r["error"]} for r in records if "error" in r],
        **_task_scores(units),
    }
    seeded = [[(u["class"], u["seed"]) for u in r["units"] if "seed" in u] for r in records if "units" in r]
    if any(seeded):
        summary["seed"] = summarize_seed(seeded)
    members: dict[str, list[dict]] = {}
    for unit in units:
        for group in unit_groups(unit):
            members.setdefault(group, []).append(unit)
    if members:
        summary["groups"] = {g: {"units": len(members[g]), **_task_scores(members[g])} for g in sorted(members)}
    return summary


def unit_groups(unit: dict) -> tuple[str, ...]:
    """The groups a unit's figures count in: its own group, and where that is "KIND N" (a synthetic word kind,
    colour, shape or relation, and a 1-based place, e.g. many_objects' "shape 4") the kind pooled over places too
    ("shape"); none without a group."""
    if "group" not in unit:
        return ()
    placed = _PLACED_GROUP.fullmatch(unit["group"])
    return (unit["group"], placed.group(1)) if placed else (unit["group"],)


def _task_scores(units: list[dict]) -> dict:
    scores = {}
    boxes = [u for u in units if "hit" in u]
    if boxes:
        hits = aggregate_by_class([u["hit"] for u in boxes], [u["class"] for u in boxes])
        scores["detection"] = {
            "units": len(boxes),
            "box_accuracy": hits.micro,
            "box_accuracy_class_mean": hits.macro,
            "mean_iou": float(np.mean([u["iou"] for u in boxes])),
            "per_class": {c: {"accuracy": mean, "units": n} for c, (mean, n) in sorted(hits.per_class.items())},
        }
    masks = [u for u in units if "pg_hit" in u]
    if masks:
        pointing = aggregate_by_class([u["pg_hit"] for u in masks], [u["class"] for u in masks])
        counts = [SegmentationCounts(u["pixel_correct"], u["pixel_labeled"], np.array(u["area_inter"]),
                                     np.array(u["area_union"]), u["ap"]) for u in masks]
        totals = summarize_segmentation(counts)
        foreground_union = sum(c.area_union[1] for c in counts)
        scores["segmentation"] = {
            "units": len(masks),
            "pointing_game": pointing.micro,
            "pointing_game_class_mean": pointing.macro,
            "energy_pg": float(np.mean([u["energy_pg"] for u in masks])),
            "energy_in_mask": float(np.mean([u["energy_in_mask"] for u in masks])),
            "pixel_accuracy": totals["pixel_accuracy"],
            "ap": totals["map"],
            "mask_iou": float(sum(c.area_inter[1] for c in counts) / foreground_union) if foreground_union else 0.0,
            "miou": totals["miou"],
            "per_class": {c: {"pointing_game": mean, "units": n}
                          for c, (mean, n) in sorted(pointing.per_class.items())},
        }
        unclipped = sum(u.get("no_positive_relevance", False) for u in masks)
        if unclipped:
            scores["segmentation"]["no_positive_relevance"] = unclipped
    wrong = [u["wrong_pg_hit"] for u in units if "wrong_pg_hit" in u]
    if wrong:
        scores["wrong_attribute"] = {"units": len(wrong), "wrong_pointing": float(np.mean(wrong))}
    return scores


def run_name(run: dict) -> str:
    """A sweep's run as its report names it: the method with its non-default settings (`method_label`) and the
    model as given, e.g. "clip_surgery (feature_surgery=False) (ViT-B-32.pt)"."""
    return f"{method_label(run)} ({run['model']['origin']}){matmul_note(run)}"


def counts(summary: dict) -> str:
    """What a sweep scored, as its reports say it: "1 image, 3 units, 0 errors"."""
    return ", ".join(counted(n, noun) for n, noun in [(summary["images"], "image"), (summary["units"], "unit"),
                                                      (len(summary["errors"]), "error")])


def counted(number: int, noun: str) -> str:
    """The number with its regular noun: "1 image", "2 images"."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def markdown(config: dict, summary: dict) -> str:
    """The report as Markdown: one table per task, a row per unit group, the paper's row where comparable."""
    run = config["run"]
    name = run_name(run)
    return "\n".join([f"# Sweep: {config['dataset']}, {name}", "",
                      f"{counts(summary)}. Evaluation: {json.dumps(config['evaluation'], sort_keys=True)}. "
                      f"Settings: {json.dumps(run['settings'], sort_keys=True)}; input protocol "
                      f"{run['input_protocol']}. Data: {config.get('source') or config['dataset']}. "
                      f"{_prompts_and_samples(config)} {_environment(config)}", "", *_markdown_body(config, summary)])


def _environment(config: dict) -> str:
    """The environments the sweep's runs ran under (sweep.json's "environment": `runner._note_environment`), in a
    sentence."""
    runs = config.get("environment", [None])
    if runs == []:
        return "Environment: none recorded yet (no sample scored)."
    said = [environment_line(e) if isinstance(e, dict) else "not recorded (runs before 2026-12-07)"
            for e in (runs if isinstance(runs, list) else [None])]
    if len(said) == 1:
        return f"Environment: {said[0]}."
    return (f"Environment, by run (a run in the environment of the one before not listed again): "
            f"{'; then '.join(said)}.")


def _markdown_body(config: dict, summary: dict) -> list[str]:
    """report.md's lines after its title and run description: the paper line, the tables and what they need said
    (report.html shows them too, `_markdown_blocks`)."""
    name = _cell(run_name(config["run"]))
    paper, why_not = paper_figures(config, summary)
    lines = ["The paper's figures (TCLIP, CLIP ViT-B/32, the whole split) are shown beside this run." if paper
             else f"No paper figure is shown: {why_not}.", ""]
    if not summary["units"]:  # no table below: say why rather than end the report on its description
        lines += ["Nothing was scored: " + ("no image read holds an object of the dataset's classes (its annotations "
                                            "have none, or only what the evaluation ignores)." if summary["images"]
                                            else "no sample could be read (see the errors below)."), ""]
    groups = {_cell(group): scores for group, scores in summary.get("groups", {}).items()}
    if "detection" in summary:
        lines += ["| Method | BoxAcc (%) | BoxAcc, class mean (%) | Mean IoU | Units |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label, scores in [(name, summary), *((f"{name}, {g}", s) for g, s in groups.items())]:
            if "detection" in scores:
                det = scores["detection"]
                lines.append(f"| {label} | {100 * det['box_accuracy']:.2f} | {100 * det['box_accuracy_class_mean']:.2f} "
                             f"| {det['mean_iou']:.4f} | {det['units']} |")
        if "box_accuracy" in paper:
            lines.append(f"| paper: TCLIP (ViT-B/32) | {100 * paper['box_accuracy']:.2f} | | | |")
        lines.append("")
    if "segmentation" in summary:
        columns = ("pointing_game", "energy_pg", "pixel_accuracy", "ap", "mask_iou")
        lines += ["| Method | PG | Energy-PG | Pixel acc. | AP | Mask IoU | PG, class mean | Units |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, scores in [(name, summary), *((f"{name}, {g}", s) for g, s in groups.items())]:
            if "segmentation" in scores:
                seg = scores["segmentation"]
                lines.append(f"| {label} | " + " | ".join(f"{seg[c]:.4f}" for c in columns)
                             + f" | {seg['pointing_game_class_mean']:.4f} | {seg['units']} |")
        if "pointing_game" in paper:
            lines.append("| paper: TCLIP (ViT-B/32) | " + " | ".join(f"{paper[c]:.4f}" for c in columns) + " | | |")
        lines.append("")
        if summary["segmentation"].get("no_positive_relevance"):
            empty = summary["segmentation"]["no_positive_relevance"]
            lines += [f"{empty} of {counted(summary['segmentation']['units'], 'unit')} "
                      f"{'has' if empty == 1 else 'have'} a relevance map with no positive value: pixel accuracy, AP, "
                      "mask IoU and the seed metrics clip negatives to 0 before min-max (Chefer et al.'s convention), "
                      "so they score those maps as empty masks; PG and energy-PG do not depend on the sign.", ""]
    if any(_PLACED_GROUP.fullmatch(g) for g in summary.get("groups", {})):
        lines += ["A word kind's row (colour, shape, relation) pools its rows by place (shape 1, shape 2, ...): the "
                  "rows' units overlap.", ""]
    if "seed" in summary:
        seed = summary["seed"]
        lines += ["The seed papers' metrics (ECLIP, CLIP Surgery; foreground categories):", "",
                  f"| Method | mIoU, grid-searched threshold | mIoU, threshold {seed['fixed_threshold']:.2f} | mSC (%) "
                  "| Categories |", "| --- | ---: | ---: | ---: | ---: |",
                  f"| {name} | {seed['miou_grid']:.4f} | {seed['miou_fixed']:.4f} | {100 * seed['msc']:.2f} "
                  f"| {seed['categories']} |", ""]
    if "wrong_attribute" in summary:
        wrong = summary["wrong_attribute"]
        lines += [f"Wrong-attribute pointing (the map peaks on the object the prompt names wrongly; lower is "
                  f"better): {wrong['wrong_pointing']:.4f} over {counted(wrong['units'], 'unit')}.", ""]
    if summary["errors"]:
        lines += ["Errors:", ""] + [f"- `{e['key']}`: {e['error']}" for e in summary["errors"][:_SHOWN_ERRORS]]
        if len(summary["errors"]) > _SHOWN_ERRORS:
            lines.append(f"- ... and {len(summary['errors']) - _SHOWN_ERRORS} more (see {REPORT_JSON})")
        lines.append("")
    return lines


def errors_listed(count: int) -> str:
    """Where the errors of `count` failed samples are listed: report.md lists the first `_SHOWN_ERRORS`, report.json
    all (for the line a sweep that scored some samples ends with)."""
    if count <= _SHOWN_ERRORS:
        return f"listed in {REPORT_MD}"
    return f"listed in {REPORT_JSON} (the first {_SHOWN_ERRORS} in {REPORT_MD})"


def _cell(text: str) -> str:
    """``text`` for a Markdown table cell: its pipes escaped, which would otherwise end the cell."""
    return text.replace("|", "\\|")


def _prompts_and_samples(config: dict) -> str:
    """What the sweep prompted with and which samples it covers, e.g. 'Prompts: the template "a photo of a {}.";
    samples: the first 50.' (a synthetic protocol's prompts are its scenes' captions and words)."""
    template = config.get("template")
    prompts = "" if template is None else f"Prompts: the template {json.dumps(template, ensure_ascii=False)}; "
    if template is None and not is_synthetic_dataset(config["dataset"]):
        prompts = "Prompts: the bare class names; "
    limit = config.get("limit")
    samples = "every sample" if limit is None else f"the first {limit}"
    return f"{prompts}{'samples' if prompts else 'Samples'}: {samples}."


def paper_figures(config: dict, summary: dict) -> tuple[dict, str]:
    """(the paper's figures comparable with this sweep, or {} and why there are none): a sweep run as the paper's
    (`config`) that scored every image of the whole split and no other (`summary`: no failed sample, as many images as
    the split has, so not a subset of its annotations either)."""
    run, dataset = config["run"], config["dataset"]
    if dataset not in PAPER:
        return {}, f"the paper reports no {dataset} figures"
    if run["method"] != "tclip":
        return {}, f"the method is {run['method']}, the paper's figures are TCLIP's"
    if run["model"].get("architecture") != "ViT-B/32" or run["model"].get("source") not in ("openai", "hf"):
        return {}, "the model is not OpenAI's CLIP ViT-B/32 (as a hub name, OpenAI .pt or Hugging Face folder)"
    if config.get("limit") is not None:
        return {}, f"the sweep covers the first {config['limit']} samples, the paper the whole split"
    from tclip_jax.methods.tclip.settings import Settings

    if run["settings"] != Settings().to_dict():
        return {}, "TCLIP's settings differ from the defaults the paper used"
    if config.get("template") not in (None, "{}"):  # "{}" prompts the bare names
        return {}, "the prompts fill a template, the paper's are the bare class names"
    from tclip_jax.evaluation.options import EvalOptions

    defaults = EvalOptions().to_dict()
    changed = [k for k in ("pg_tolerance", "threshold") if config["evaluation"][k] != defaults[k]]
    if dataset == "imagenet-s919" and changed:  # COCO's box accuracy depends on neither
        return {}, f"the evaluation's {changed[0]} is not the paper's"
    if dataset == "coco" and config.get("source", "").endswith("crowd drop"):
        return {}, "crowd boxes are dropped, the paper's evaluation (gScoreCAM's) keeps them"
    if summary["errors"]:
        return {}, (f"{counted(len(summary['errors']), 'sample')} could not be scored (listed below), the paper scored "
                    "the whole split")
    from tclip_jax.evaluation.datasets.coco import VAL2017_SAMPLES
    from tclip_jax.evaluation.datasets.imagenet_s import VALIDATION_IMAGES

    whole = {"coco": (VAL2017_SAMPLES, "val2017's images with an annotation"),
             "imagenet-s919": (VALIDATION_IMAGES[919], "ImageNet-S919's annotated validation images")}
    images, (split, what) = summary["images"], whole[dataset]
    if images != split:
        return {}, f"the sweep scored {counted(images, 'image')}, the whole split {split} ({what})"
    return PAPER[dataset], ""


def read_config(out: pathlib.Path) -> dict:
    """The sweep configuration stored in ``out``; a damaged file is named, with what to do."""
    path = out / CONFIG_FILE
    try:
        config = loads_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); it holds the sweep's configuration: restore it or start the "
                         "sweep in a new --out") from None
    if not isinstance(config, dict) or not {"run", "dataset", "evaluation"} <= set(config):
        raise ValueError(f"{path} is not a tclip sweep configuration; restore it or start the sweep in a new --out")
    return config


def write_report(out: pathlib.Path) -> dict:
    """Merge every process's records under ``out``, write report.json, report.md and report.html, and keep in
    gallery/ only report.html's pictures; returns the JSON."""
    from tclip_jax.sweep.vis import GALLERY_DIR, best_and_worst, prune_gallery

    config = read_config(out)
    records = read_all_records(out)
    summary = summarize(records)
    report = {"config": config, **summary}
    chosen = best_and_worst(records)
    write_text_atomic(out / REPORT_JSON, json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out / REPORT_MD, markdown(config, summary))
    write_text_atomic(out / REPORT_HTML, html_report(config, summary, chosen, out))
    prune_gallery(out / GALLERY_DIR, chosen)
    return report


# ------------------------------------------------------------------------------------------------ report.html
_HTML_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; color: #1d1d1f;
  max-width: 1180px; margin: 0 auto; padding: 12px 16px; background: #f6f6f4; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 22px 0 8px; }
h3 { font-size: 15px; margin: 0 0 6px; }
.meta { color: #5f6368; font-size: 12.5px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0; }
th, td { border: 1px solid #d6d6d2; padding: 3px 8px; font-variant-numeric: tabular-nums; }
td.num { text-align: right; }
.bars { display: grid; grid-template-columns: minmax(120px, max-content) 1fr 8.5em; gap: 2px 10px; align-items: center;
  background: #fff; border: 1px solid #d6d6d2; padding: 8px; }
.bar { height: 12px; background: #e4e4e0; } .bar span { display: block; height: 100%; background: #0b57d0; }
.classes { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 10px; }
.class { background: #fff; border: 1px solid #d6d6d2; border-radius: 6px; padding: 8px; }
.units { display: flex; gap: 8px; } figure { margin: 0; flex: 1 1 0; min-width: 0; }
figure img { width: 100%; height: auto; display: block; border: 1px solid #d6d6d2; }
figcaption { font-size: 12px; } .hit { color: #1e7a1e; font-weight: 600; } .miss { color: #b3261e; font-weight: 600; }
.missing { font-size: 12px; color: #5f6368; border: 1px dashed #d6d6d2; padding: 20px 6px; text-align: center; }
"""


def html_report(config: dict, summary: dict, chosen: dict[str, dict], out: pathlib.Path) -> str:
    """report.html: the scores table, per-class accuracy bars, and each class's best and worst unit (`chosen`:
    `sweep.vis.best_and_worst`) with its picture (ground truth green, predicted box red; `sweep.vis.UnitGallery`),
    IoU and hit or miss."""
    from tclip_jax.sweep.vis import GALLERY_DIR, gallery_name, unit_score

    esc = html.escape
    run = config["run"]
    name = run_name(run)
    parts = [f"<h1>Sweep: {esc(config['dataset'])}, {esc(name)}</h1>",
             f"<p class=\"meta\">{counts(summary)}. Evaluation: "
             f"<code>{esc(json.dumps(config['evaluation'], sort_keys=True))}</code>. Settings: "
             f"<code>{esc(json.dumps(run['settings'], sort_keys=True))}</code>; input protocol "
             f"{esc(str(run['input_protocol']))}. Source: {esc(str(config.get('source') or '—'))}. "
             f"{esc(_prompts_and_samples(config))} {esc(_environment(config))} "
             f"Also: <a href=\"{REPORT_MD}\">{REPORT_MD}</a>, "
             f"<a href=\"{REPORT_JSON}\">{REPORT_JSON}</a>.</p>"]
    parts += _markdown_blocks(_markdown_body(config, summary))  # what report.md says below its description
    # Per-class accuracy bars.
    for task, score, label in (("detection", "accuracy", "BoxAcc"), ("segmentation", "pointing_game", "Pointing game")):
        if task not in summary:
            continue
        per_class = sorted(summary[task]["per_class"].items(), key=lambda item: (-item[1][score], item[0]))
        rows = "".join(f"<div>{esc(c)}</div><div class=\"bar\"><span style=\"width:{100 * v[score]:.2f}%\"></span>"
                       f"</div><div>{100 * v[score]:.1f} % ({v['units']})</div>" for c, v in per_class)
        parts.append(f"<h2>{label} per class</h2><div class=\"bars\">{rows}</div>")
    # Best and worst unit per class.
    if chosen:
        parts.append("<h2>Best and worst unit per class</h2><p class=\"meta\">Map in turbo colours, min to max (as "
                     "tclip explain draws it), ground truth in green, the predicted box in red. Box units rank by box "
                     "IoU (a hit: IoU ≥ 0.5), mask units by foreground IoU at the threshold (a hit: the pointing "
                     "game); ties go to the earlier sample.</p>")
        cards = []
        for cls in sorted(chosen):
            figures = []
            places = chosen[cls]
            same = places["best"] == places["worst"]
            for place in ("best",) if same else ("best", "worst"):
                record, position = places[place]
                unit = record["units"][position]
                iou_name, iou, hit, verdict = unit_score(unit)
                picture = f"{GALLERY_DIR}/{gallery_name(record['key'], cls, position)}"
                shown = (f"<img loading=\"lazy\" src=\"{esc(picture)}\" alt=\"{esc(cls)}: {esc(record['key'])}\">"
                         if (out / picture).is_file() else
                         "<div class=\"missing\">no picture: it could not be written (a full disk?), or the sweep "
                         "is from before pictures were kept; <code>--resume</code> draws it</div>")
                query = f"<br>query: “{esc(unit['prompt'])}”" if unit.get("prompt") else ""
                group = f" ({esc(unit['group'])})" if unit.get("group") else ""
                figures.append(f"<figure>{shown}<figcaption>{'best and worst' if same else place}: sample "
                               f"<code>{esc(record['key'])}</code>{group}<br>{iou_name} {iou:.4f}, "
                               f"<span class=\"{'hit' if hit else 'miss'}\">{esc(verdict)}</span>{query}"
                               f"</figcaption></figure>")
            cards.append(f"<section class=\"class\"><h3>{esc(cls)}</h3><div class=\"units\">{''.join(figures)}"
                         f"</div></section>")
        parts.append(f"<div class=\"classes\">{''.join(cards)}</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Sweep: {esc(config['dataset'])}, {esc(run['method'])}</title>\n"
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<style>{_HTML_STYLE}</style>\n</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")


def _markdown_blocks(lines: list[str]) -> list[str]:
    """Markdown ``lines`` of the kinds report.md writes as HTML: tables (numbers right-aligned, as the Markdown
    says; ``\\|`` a pipe inside a cell), lists (``- ``), paragraphs; ``code`` spans."""
    def inline(text: str) -> str:
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))

    blocks, block = [], []
    for line in lines + [""]:
        kind = "table" if line.startswith("|") else "list" if line.startswith("- ") else "p" if line else None
        if block and kind != block[0]:
            rows = block[1:]
            if block[0] == "table":
                cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip()[1:-1])]
                         for row in rows]
                header, right, body = cells[0], [a.endswith(":") for a in cells[1]], cells[2:]
                head = "".join(f"<th>{inline(h)}</th>" for h in header)
                cell = ('<td class="num">{}</td>', "<td>{}</td>")
                body_html = "".join("<tr>" + "".join(cell[not r].format(inline(c)) for c, r in zip(row, right))
                                    + "</tr>" for row in body)
                blocks.append(f"<table><tr>{head}</tr>{body_html}</table>")
            elif block[0] == "list":
                blocks.append("<ul>" + "".join(f"<li>{inline(row[2:])}</li>" for row in rows) + "</ul>")
            else:
                blocks.append(f"<p>{inline(' '.join(rows))}</p>")
            block = []
        if kind is not None:
            block = block or [kind]
            block.append(line)
    return blocks
