"""GMM fits where EM crawls: plain EM to convergence vs the default fit (SQUAREM after 500 evaluations) vs the
previous default (plain EM stopped at 5,000 steps), on the maps where this was seen.

Maps: TCLIP K = 25 on random ViT-B/32 weights (`timed_tclip`), the 80 COCO class names as prompts, `--images`
640x480 photo-like scenes (`photo_like_image(i)`): each image's distinct aggregated maps at the image's size,
as `soft_maps_and_boxes` receives them. On such nearly unimodal maps EM from the Otsu start passes a saddle of
the likelihood where its rate is ~1. Per image, all its maps are fitted in one batched call (as the host step
does) three ways:
- plain: `fit_histograms(..., squarem_after=inf, max_steps=200000)`, the reference fixed point;
- default: `fit_histograms` as shipped;
- capped: plain EM stopped at 5,000 evaluations (the previous default).
'crawling' maps are those plain EM needs more than `SQUAREM_AFTER` evaluations for; tau is taken from each fit
as the host step takes it (`fit_of_components`: the map's mean where the components do not cross), and tau
differences are in units of the map's range. Times: median of `--rounds` rounds, the variants interleaved, one thread.

    python benchmarks/gmm_crawl.py [--images 6] [--rounds 3] [--no-write]
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (check_output_options, command_line, load_average, machine_description,  # noqa: E402
                                markdown_table, photo_like_image, positive_int, run_main, timed_tclip, today, workloads,
                                write_section)

from tclip_jax.postprocess import gmm  # noqa: E402
from tclip_jax.postprocess._blas import SINGLE_THREADED_BLAS  # noqa: E402
from tclip_jax.postprocess.soft import fit_of_components  # noqa: E402

VARIANTS = {"plain": {"squarem_after": math.inf, "max_steps": 200_000},
            "default": {},
            "capped": {"squarem_after": math.inf, "max_steps": 5_000}}


def image_histograms(tclip, encoded, image: np.ndarray) -> tuple[list[np.ndarray], gmm.MapHistograms]:
    """The image's distinct maps at its size and their histograms, as the host step builds them."""
    maps, _ = tclip.image_maps(image, encoded.queries)
    return maps, gmm.map_histograms(maps, [float(m.min()) for m in maps], [float(m.max()) for m in maps])


def taus(params: gmm.MixtureParams, maps) -> np.ndarray:
    """tau per map, as the host step takes it from the fitted components (`fit_of_components`: the map's mean
    where they do not cross)."""
    return np.array([fit_of_components(params, row, values).tau for row, values in enumerate(maps)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive_int, default=6)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    check_output_options(parser, "gmm_crawl", write=not args.no_write)
    load_before = load_average()
    tclip = timed_tclip()
    encoded = tclip.encode_prompts(list(workloads()["coco80"]))
    rows, totals = [], {name: 0.0 for name in VARIANTS}
    for index in range(args.images):
        maps, hists = image_histograms(tclip, encoded, photo_like_image(index))
        results, times = {}, {name: [] for name in VARIANTS}
        with SINGLE_THREADED_BLAS:
            for _ in range(args.rounds):
                for name, options in VARIANTS.items():
                    began = time.perf_counter()
                    results[name] = gmm.fit_histograms(hists, **options)
                    times[name].append(time.perf_counter() - began)
        span = hists.hi - hists.lo
        tau = {name: taus(params, maps) for name, params in results.items()}
        plain_steps = results["plain"].steps
        crawling = plain_steps > gmm.SQUAREM_AFTER
        median = {name: float(np.median(t)) for name, t in times.items()}
        for name in VARIANTS:
            totals[name] += median[name]

        def gap(name):
            return float(np.max(np.abs(tau[name] - tau["plain"]) / span)) if crawling.any() else 0.0

        rows.append([index, len(span), int(crawling.sum()),
                     f"{int(plain_steps[crawling].max()) if crawling.any() else '-'}",
                     f"{int(results['default'].steps[crawling].max()) if crawling.any() else '-'}",
                     " / ".join(str(int(results[name].converged.sum())) for name in VARIANTS),
                     f"{gap('default'):.1e}", f"{gap('capped'):.1e}",
                     f"{median['plain']:.2f} s", f"{median['default']:.2f} s", f"{median['capped']:.2f} s"])
        print(rows[-1], flush=True)
    header = ["image", "maps", "crawling maps", "max plain evaluations", "max default evaluations",
              "converged plain / default / capped", "max tau gap default vs plain (/ range)",
              "max tau gap capped vs plain (/ range)", "plain time", "default time", "capped time"]
    rows.append(["all", "", "", "", "", "", "", "", f"{totals['plain']:.2f} s", f"{totals['default']:.2f} s",
                 f"{totals['capped']:.2f} s"])
    body = "\n".join([
        "## GMM fits where EM crawls (TCLIP K = 25, random ViT-B/32, 80 COCO prompts, 640x480)", "",
        f"- date: {today()}", f"- machine: {machine_description()}", f"- command: `{command_line()}`",
        f"- load average (1/5/15 min) before: {load_before}; after: {load_average()}",
        f"- per image, all its maps in one batched fit, one BLAS thread; median of {args.rounds} interleaved "
        "rounds. plain: EM (with Newton near the fixed point) to convergence, no cap; default: as shipped "
        f"(SQUAREM after {gmm.SQUAREM_AFTER} evaluations, cap {gmm.MAX_STEPS}); capped: the previous "
        "default (plain, 5,000 evaluations). Crawling: plain needs more than "
        f"{gmm.SQUAREM_AFTER} evaluations.", "", markdown_table(header, rows)])
    print(body)  # as the other scripts: the whole section, written or not
    if not args.no_write:
        write_section("gmm_crawl", body)


if __name__ == "__main__":
    run_main(main)
