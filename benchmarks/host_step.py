"""TCLIP's host step per map (soft map: GMM + floor + blur; box: uint8 + Otsu + largest component), old vs
new, and how far the GMM threshold tau is from scikit-learn's fit on all values.

Maps: the embedded model's word maps (``TCLIP.from_pretrained().explain(scene.image, scene.caption)``,
``result.prompts[0].word_maps[i].heatmap``, at the image's size) on held-out synthetic scenes
(``make_scene(seed, size)`` for ``seed in heldout_seeds(...)``) at 224x224, 640x480 and 1920x1080.

Timing (single core): the process is pinned to one CPU (``os.sched_setaffinity``), OpenCV runs one thread
(``cv2.setNumThreads(1)``) and BLAS/OpenMP one thread (threadpoolctl). Per image, "old" is the previous
implementation (commit 58e4e45, reproduced below: scikit-learn GMM on 4096 quantiles, full-size separable blur,
``cv2.normalize`` + Otsu + ``connectedComponentsWithStats``) one map after the other, "new" is
``soft_maps_and_boxes`` on all maps of the image. Rounds alternate old and new over all images; the table
gives the median over rounds of the time per map, after a warm-up round (the new blur fits a small operator
once per image size; its one-off cost is reported separately).

Fidelity: for each map, the reference tau comes from scikit-learn's ``GaussianMixture(2, covariance_type="diag",
reg_covar=1e-6)`` fitted to ALL values, standardized as the new fit standardizes them (zero mean, unit
variance), started from the new fit's start (the hard split at the exact global 2-means optimum of the
values, computed on the sorted values) and run to convergence (``tol=1e-10``, ``max_iter=100000``). Also
reported: scikit-learn with its defaults (k-means start, ``random_state=0``, ``tol=1e-3``) on all values, and
the old method (the same on 4096 evenly spaced quantiles). Soft maps are compared with
``scipy.ndimage.gaussian_filter(mode="reflect", truncate=4)`` of the map floored at the reference tau, in
units of the map's range. Finally tau of the model-input map (224 x 224, before resampling to the image)
is compared with tau of the image-size map.

    python benchmarks/host_step.py                  # timing and fidelity; writes section 'host-step'
    python benchmarks/host_step.py --quick --no-write
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import threading
import pathlib
import sys
import time
import warnings

import cv2
import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (RESULTS_PATH, check_output_file, check_output_options, command_line,  # noqa: E402
                                load_average, machine_description, markdown_table, non_negative_int,
                                positive_int, refuse_part_of_a_table, run_main, today, write_section)
from tclip_jax.postprocess import (GmmFit, gaussian_intersection, gmm_thresholds,  # noqa: E402
                                   soft_maps_and_boxes)
from tclip_jax.postprocess._blas import SINGLE_THREADED_BLAS  # noqa: E402
from tclip_jax.postprocess.blur import axis_plan, error_bound, gaussian_blur, pyramid_levels  # noqa: E402
from tclip_jax.postprocess.boxes import Box  # noqa: E402
from tclip_jax.postprocess.sigma import DEFAULT_SIGMA_FRACTION  # noqa: E402
from tclip_jax.synthetic import heldout_seeds, make_scene  # noqa: E402
from tclip_jax.files import write_text_atomic  # noqa: E402

SIZES = {"224x224": (224, 224), "640x480": (480, 640), "1920x1080": (1080, 1920)}  # name: (H, W)
ALL_CPUS = os.sched_getaffinity(0)


# --- the previous implementation (commit 58e4e45), per map -----------------------------------------------
OLD_GMM_SAMPLES = 4096


def gmm_threshold_sklearn(scores: np.ndarray, seed: int = 0, max_samples: int | None = OLD_GMM_SAMPLES,
                          **gaussian_mixture_kwargs) -> GmmFit:
    """The previous method: scikit-learn's GaussianMixture (k-means start, ``random_state=seed``, tol 1e-3)
    on the standardized values, subsampled to ``max_samples`` evenly spaced quantiles (None: all values).

    Extra keyword arguments go to ``GaussianMixture`` (e.g. ``tol``, ``max_iter``, ``means_init``).
    The library's method until commit 58e4e45.
    """
    from sklearn.mixture import GaussianMixture

    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("scores is empty")
    if not np.isfinite(values).all():
        raise ValueError("scores contains NaN or infinite values")
    center, scale = float(values.mean()), float(values.std())
    if scale == 0.0:
        v = float(values[0])
        return GmmFit((v, v), (0.0, 0.0), (1.0, 0.0), v, "constant")
    if max_samples is not None and values.size > max_samples:
        values = _evenly_spaced_quantiles(np.asarray(scores).ravel(), max_samples)
    # "diag" equals "full" for 1-D data and is cheaper; other settings are scikit-learn's defaults.
    options = {"covariance_type": "diag", "random_state": seed, **gaussian_mixture_kwargs}
    gmm = GaussianMixture(n_components=2, **options)
    with SINGLE_THREADED_BLAS:  # a 4096-value fit is too small to gain from threads; they oversubscribe cores
        gmm.fit(((values - center) / scale)[:, None])
    order = np.argsort(gmm.means_[:, 0])
    means = tuple(float(center + scale * gmm.means_[k, 0]) for k in order)
    stds = tuple(float(scale * np.sqrt(gmm.covariances_[k, 0])) for k in order)
    weights = tuple(float(gmm.weights_[k]) for k in order)
    tau = gaussian_intersection(means, stds, weights)
    if tau is None:
        return GmmFit(means, stds, weights, center, "no_root_between_means")
    return GmmFit(means, stds, weights, tau, None)


def _evenly_spaced_quantiles(values: np.ndarray, count: int) -> np.ndarray:
    """np.quantile(values, linspace(0, 1, count)) (linear interpolation, float64) from one sort: several times
    faster. The sort runs in the values' own dtype (float32 maps sort about 3x faster than float64; widening
    keeps the order, so the result is the same)."""
    ordered = np.sort(values)
    position = np.linspace(0.0, ordered.size - 1, count)
    below = np.minimum(np.floor(position).astype(np.int64), ordered.size - 2)
    fraction = position - below
    lower, upper = ordered[below].astype(np.float64), ordered[below + 1].astype(np.float64)
    return lower + fraction * (upper - lower)




def old_soft_map(heatmap: np.ndarray) -> tuple[np.ndarray, float]:
    fit = gmm_threshold_sklearn(heatmap)  # unchanged from the old gmm_threshold
    kept = np.where(heatmap < np.float64(fit.tau), heatmap.min(), heatmap).astype(np.float32)
    return gaussian_blur(kept, DEFAULT_SIGMA_FRACTION * max(heatmap.shape)), fit.tau  # the new step's sigma


def old_box(heatmap: np.ndarray) -> Box:
    if not np.isfinite(heatmap).all():
        raise ValueError("heatmap contains NaN or infinite values")
    gray = cv2.normalize(heatmap, None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8UC1)
    _, mask = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, _, stats, _ = cv2.connectedComponentsWithStats((mask != 0).astype(np.uint8), connectivity=8)
    if count == 1:
        return Box(0, 0, mask.shape[1], mask.shape[0])
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[label, :4])
    return Box(x, y, x + w, y + h)


def old_host_step(maps) -> list:
    return [(old_soft_map(m), old_box(m)) for m in maps]


# --- maps --------------------------------------------------------------------------------------------------


def explained_images(explainer, size_hw, count: int, offset: int = 0):
    """(image-size word maps [Q, H, W], model-input word maps [Q, h, w]) of ``count`` held-out scenes."""
    for seed in heldout_seeds(count, offset):
        scene = make_scene(seed, size_hw)
        result = explainer.explain(scene.image, scene.caption)
        maps = np.stack([m.heatmap for m in result.prompts[0].word_maps])
        yield maps, input_size_maps(explainer, scene, len(maps))


def input_size_maps(explainer, scene, words: int):
    """The word maps at the model's input size, before `to_original` (each word's row of the distinct queries)."""
    encoded = explainer.encode_prompts([scene.caption])
    return explainer.input_maps(scene.image, encoded.queries.take(encoded.rows[:words]))[0]


# --- timing ------------------------------------------------------------------------------------------------


def time_size(images: list, rounds: int) -> dict:
    """Median seconds per map (wall clock and this thread's CPU time) of old, new, and new with two threads over
    the images, over ``rounds`` alternating rounds after a warm-up."""
    maps_total = sum(len(m) for m in images)
    # The pool's threads may use every allowed CPU (a thread inherits its creator's affinity when it starts);
    # this thread goes back to its single CPU afterwards.
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ALL_CPUS)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    barrier = threading.Barrier(2)
    list(pool.map(lambda _: barrier.wait(), range(2)))  # start both threads now
    os.sched_setaffinity(0, pinned)
    runs = {"old": lambda: [old_host_step(m) for m in images],
            "new": lambda: [soft_maps_and_boxes(m) for m in images],
            "new, 2 threads over images": lambda: list(pool.map(soft_maps_and_boxes, images))}
    for fn in runs.values():  # warm-up: caches, page faults
        fn()
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(rounds):  # the order rotates: each variant follows each other one equally often
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start, start_cpu = time.perf_counter(), time.thread_time()
            runs[name]()
            wall[name].append((time.perf_counter() - start) / maps_total)
            cpu[name].append((time.thread_time() - start_cpu) / maps_total)
    pool.shutdown()
    stages = stage_times(images, rounds)
    axis_plan.cache_clear()  # the one-off fit of the pyramid blur's coarse operators for a new image size
    start = time.perf_counter()
    soft_maps_and_boxes(images[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    soft_maps_and_boxes(images[0])
    setup = max(0.0, first - (time.perf_counter() - start))
    out = {"maps": maps_total, "images": len(images), "setup": setup, "shape": images[0].shape[1:], "rounds": rounds,
           "stages": stages}
    for name in runs:
        out[name] = {"wall": float(np.median(wall[name])), "wall_min": float(np.min(wall[name])),
                     "cpu": float(np.median(cpu[name]))}
    return out


def stage_times(images: list, rounds: int) -> dict:
    """CPU ms per map of each stage of the new host step (its internal functions, one image after the other)."""
    soft_module = sys.modules["tclip_jax.postprocess.soft"]
    gmm_module = sys.modules["tclip_jax.postprocess.gmm"]
    from tclip_jax.postprocess.boxes import checked_map_box

    prepared = []
    for maps in images:
        values = soft_module._maps_list(maps)
        stats = [soft_module._map_stats(v) for v in values]
        counts = np.stack([gmm_module.fine_histogram(v, s.lo, s.hi) for v, s in zip(values, stats)])
        hists = gmm_module.MapHistograms(counts, np.array([s.lo for s in stats]), np.array([s.hi for s in stats]))
        prepared.append((values, stats, hists, soft_module._fits(values, stats)))
    sigma = DEFAULT_SIGMA_FRACTION * max(images[0].shape[1:])
    stages = {
        "min/max": lambda v, s, h, f: [soft_module._map_stats(x) for x in v],
        "boxes": lambda v, s, h, f: [checked_map_box(x) for x in v],
        "GMM histograms": lambda v, s, h, f: [gmm_module.fine_histogram(x, y.lo, y.hi) for x, y in zip(v, s)],
        "GMM fit (EM)": lambda v, s, h, f: gmm_module.fit_histograms(h),
        "floor + blur (new output arrays)": lambda v, s, h, f: soft_module._write_soft_maps(v, s, f, sigma),
    }
    maps_total = sum(len(v) for v, _, _, _ in prepared)
    out = {}
    for name, fn in stages.items():
        times = []
        for _ in range(max(3, rounds // 2)):
            start = time.thread_time()
            for item in prepared:
                fn(*item)
            times.append((time.thread_time() - start) / maps_total)
        out[name] = float(np.median(times))
    return out


# --- fidelity ----------------------------------------------------------------------------------------------


def reference_tau(values: np.ndarray) -> tuple[float, float]:
    """(converged scikit-learn tau from the exact 2-means start, scikit-learn-defaults tau), all values."""
    from sklearn.mixture import GaussianMixture

    x = values.astype(np.float64).ravel()
    center, scale = x.mean(), x.std()
    z = np.sort((x - center) / scale)
    n = z.size
    cumulative = np.cumsum(z)
    k = np.arange(1, n)
    between = k * (n - k) * (cumulative[:-1] / k - (cumulative[-1] - cumulative[:-1]) / (n - k)) ** 2
    split = int(np.argmax(between)) + 1
    low, high = z[:split], z[split:]
    weights = np.array([low.size, high.size]) / n
    means = np.array([[low.mean()], [high.mean()]])
    variances = np.array([[low.var() + 1e-6], [high.var() + 1e-6]])
    out = []
    for options in ({"tol": 1e-10, "max_iter": 100000, "weights_init": weights, "means_init": means,
                     "precisions_init": 1.0 / variances, "init_params": "random_from_data"},
                    {}):
        gmm = GaussianMixture(2, covariance_type="diag", reg_covar=1e-6, random_state=0, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gmm.fit(z[:, None])
        order = np.argsort(gmm.means_[:, 0])
        tau = gaussian_intersection(tuple(center + scale * gmm.means_[order, 0]),
                                    tuple(scale * np.sqrt(gmm.covariances_[order, 0])), tuple(gmm.weights_[order]))
        out.append(float(center) if tau is None else tau)
    return out[0], out[1]


def reference_soft_map(values: np.ndarray, tau: float) -> np.ndarray:
    kept = np.where(values < np.float64(tau), values.min(), values).astype(np.float64)
    return ndimage.gaussian_filter(kept, DEFAULT_SIGMA_FRACTION * max(values.shape), mode="reflect", truncate=4.0)


def fidelity_size(explainer, size_hw, max_maps: int, offset: int) -> dict:
    rows = []
    for maps, small in explained_images(explainer, size_hw, max_maps, offset):
        soft, fits, _ = soft_maps_and_boxes(maps)
        small_fits = gmm_thresholds(small) if small is not None else [None] * len(maps)
        for m, s, fit, small_fit in zip(maps, soft, fits, small_fits):
            span = float(m.max() - m.min())
            ref, ref_default = reference_tau(m)
            old_soft, old_tau = old_soft_map(m)
            ref_soft = reference_soft_map(m, ref)
            same_tau = reference_soft_map(m, fit.tau)
            rows.append({"span": span, "new": fit.tau - ref, "old": old_tau - ref, "default": ref_default - ref,
                         "old_vs_default": old_tau - ref_default, "fallback": fit.fallback,
                         "soft_new": float(np.abs(s - ref_soft).max()) / span,
                         "soft_blur": float(np.abs(s - same_tau).max()) / span,
                         "soft_tau": float(np.abs(same_tau - ref_soft).max()) / span,
                         "soft_old": float(np.abs(old_soft - ref_soft).max()) / span,
                         "input_res": None if small_fit is None else small_fit.tau - fit.tau})
            if len(rows) >= max_maps:
                return summarise(rows)
    return summarise(rows)


def summarise(rows: list[dict]) -> dict:
    def dist(key, relative=False):
        values = [abs(r[key]) / (r["span"] if relative else 1.0) for r in rows if r[key] is not None]
        if not values:
            return None
        v = np.array(values)
        return {"max": v.max(), "p99": np.quantile(v, 0.99), "p90": np.quantile(v, 0.9), "median": np.median(v),
                "over_1e-3": int((v > 1e-3).sum()), "n": v.size}
    return {"maps": len(rows), "fallbacks": sum(r["fallback"] is not None for r in rows),
            **{key: dist(key) for key in ("new", "old", "default", "old_vs_default", "input_res")},
            "new_rel": dist("new", True), "soft_new": dist("soft_new"), "soft_blur": dist("soft_blur"),
            "soft_tau": dist("soft_tau"), "soft_old": dist("soft_old")}


# --- report ------------------------------------------------------------------------------------------------


def fmt_dist(d) -> list[str]:
    if d is None:
        return ["-"] * 5
    return [f"{d['max']:.1e}", f"{d['p99']:.1e}", f"{d['p90']:.1e}", f"{d['median']:.1e}",
            f"{d['over_1e-3']}/{d['n']}"]


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(type(value))


def report(timing: dict, fidelity: dict, runs: list[dict]) -> str:
    """The section: each run (of this process, or of --state's earlier ones) with its own machine and CPUs."""
    lines = ["## Host step per map: soft map (GMM, floor, blur) and box, old vs new; tau fidelity", ""]
    for r in runs:
        parts = ([f"timing {', '.join(r['timing'])}"] if r["timing"] else []) + \
                ([f"fidelity {', '.join(r['fidelity'])}"] if r["fidelity"] else [])
        where = (f"machine: {r['machine']}; {r['cpus']} CPUs allowed to the process" if "machine" in r
                 else "machine not recorded")
        lines.append(f"- {r['date']}: `{r['command']}` ({'; '.join(parts)}); {where}; load average (1/5/15 min) "
                     f"before {r['load_before']}, after {r['load_after']}; {r['minutes']:.0f} min")
    lines += ["- single core: pinned to one CPU (sched_setaffinity), cv2.setNumThreads(1), BLAS/OpenMP 1 thread "
              "(threadpoolctl)", ""]
    if timing:
        rounds = sorted({t["rounds"] for t in timing.values()})
        lines += [f"Time per map: median of {'/'.join(map(str, rounds))} rounds, the variants' order rotating "
                  "(wall clock, fastest round in brackets; "
                  "CPU = this thread's CPU time, which leaves out waiting for a core on this shared machine). "
                  "Maps: the embedded model's word maps on held-out scenes. Old: commit 58e4e45, one map at a time. "
                  "New: `soft_maps_and_boxes` on all maps of an image. Targets: <= 3 ms at 640x480, "
                  "<= 10 ms at 1920x1080.", "",
                  markdown_table(["size", "images / maps", "old ms/map (CPU)", "new ms/map (CPU)", "speed-up (wall)",
                                  "new, 2 threads over images", "first image of a new size"],
                                 [[name, f"{t['images']} / {t['maps']}",
                                   f"{t['old']['wall'] * 1e3:.1f} ({t['old']['wall_min'] * 1e3:.1f}) "
                                   f"[CPU {t['old']['cpu'] * 1e3:.1f}]",
                                   f"{t['new']['wall'] * 1e3:.2f} ({t['new']['wall_min'] * 1e3:.2f}) "
                                   f"[CPU {t['new']['cpu'] * 1e3:.2f}]",
                                   f"{t['old']['wall'] / t['new']['wall']:.0f}x",
                                   f"{t['new, 2 threads over images']['wall'] * 1e3:.2f} ms/map wall",
                                   f"+{t['setup'] * 1e3:.0f} ms" if name != "224x224" else "no fit (exact blur)"]
                                  for name, t in timing.items()]), "",
                  "New, by stage (CPU ms per map, each stage alone over the same images, back to back):", "",
                  markdown_table(["size", *next(iter(timing.values()))["stages"]],
                                 [[name, *(f"{v * 1e3:.2f}" for v in t["stages"].values())]
                                  for name, t in timing.items()]), ""]
    if fidelity:
        lines += ["|tau - reference| in map units; reference: scikit-learn GaussianMixture(2, diag, reg_covar=1e-6) "
                  "on ALL standardized values from the exact global 2-means split, tol=1e-10. 'sklearn defaults': "
                  "the same data with k-means start, random_state=0, tol=1e-3; 'old': that on 4096 quantiles.", "",
                  markdown_table(["size", "maps", "compared", "max", "p99", "p90", "median", "> 1e-3"],
                                 [[name, f["maps"], label, *fmt_dist(f[key])]
                                  for name, f in fidelity.items()
                                  for label, key in (("new - reference", "new"),
                                                     ("new - reference, / map range", "new_rel"),
                                                     ("old - reference", "old"),
                                                     ("sklearn defaults (all values) - reference", "default"),
                                                     ("old - sklearn defaults (all values)", "old_vs_default"),
                                                     ("model-input-size map - image-size map (new fit)", "input_res"),
                                                     ("soft map: new - scipy(reference tau), / range", "soft_new"),
                                                     ("  of which blur: new - scipy(new tau), / range", "soft_blur"),
                                                     ("  of which tau: scipy(new tau) - scipy(reference tau), / range",
                                                      "soft_tau"),
                                                     ("soft map: old - scipy(reference tau), / range", "soft_old"))]),
                  ""]
        lines += ["GMM fallbacks among the maps: "
                  + ", ".join(f"{name} {f['fallbacks']}" for name, f in fidelity.items()),
                  ""]
    lines += ["Blur: worst-case bound of the new blur against scipy for any map, in units of the map's range "
              "(`tclip_jax.postprocess.blur.error_bound`, exact 1-D operators):", "",
              markdown_table(["size", "sigma (px)", "pyramid levels", "bound / range"],
                             [[name, f"{DEFAULT_SIGMA_FRACTION * max(SIZES[name]):.2f}", levels, bound]
                              for name, levels, bound in (blur_bound(name) for name in SIZES)]), "", NOTES]
    return "\n".join(lines)


def blur_bound(name: str) -> tuple[str, int, str]:
    h, w = SIZES[name]
    sigma = DEFAULT_SIGMA_FRACTION * max(h, w)
    levels = pyramid_levels(sigma)
    if levels == 0:
        return name, 0, "exact (separable filter)"
    (ey, _), (ex, ax) = error_bound(h, sigma), error_bound(w, sigma)
    return name, levels, f"{(ey * ax + ex) / 2:.1e}"


NOTES = """How the new host step works (details in the module docstrings of `tclip_jax/postprocess`):

- GMM: per map one 16384-bin histogram of all values (a cv2 conversion to 16-bit bin indices and
  `cv2.calcHist`), grouped into 512 groups that each become a two-point Gauss rule matching the group's count,
  mean, variance (with the bins' uniform spread) and third moment; scikit-learn's EM (diagonal covariance,
  `reg_covar=1e-6` on the standardized values, the standardisation computed from the histogram) on those 1024
  weighted points for all maps of an image at once, from the hard split at the global 2-means optimum,
  run to its fixed point: EM steps until the residual is below 1e-3, then Newton steps on the fixed-point
  equation with the EM map's analytic Jacobian where EM contracts (spectral radius < 1), each kept only if
  it shrinks the residual; stop at a residual of 1e-8. Where plain EM still crawls after 500 evaluations
  (nearly unimodal maps), SQUAREM cycles take over (section 'GMM fits where EM crawls'); maps that converge
  within 500 evaluations never reach them. Deterministic (no seed). tau and the fallbacks as before.
- Why converged: scikit-learn's default stop (log-likelihood gain < 1e-3 per value) leaves EM far from its
  fixed point on these maps ('sklearn defaults - reference' above); the fit on all values that the issue asks
  for is only well defined at the fixed point.
- Resolution: the GMM is fitted to the map that is floored and blurred, i.e. the aggregated map at the
  image's size (the bilinear resampling of the model-input map). The aggregated map is a pixel map (the
  trimmed mean of the shifted, upsampled copies), so patch scores are not its values; the model-input map
  gives tau within the 'model-input-size map' row above (1.5e-4 or less), well inside 1e-3, but is not the
  map whose values tau splits, so it is not the default (it would save the GMM histogram pass at large sizes).
- Floor: exact comparison with tau; blur: a cv2 Gaussian pyramid with a least-squares coarse operator per
  axis length (bound above); boxes: OpenCV's uint8 conversion and Otsu, components on the foreground's
  bounding box.
- Soft-map differences are dominated by tau: where tau sits near a flat top of the map, a change of tau by
  1e-5 moves whole plateaus across it ('of which tau' rows); the blur itself stays within its bound.
- Threads: the library runs one thread (a pool over the maps of one image lost to a loop when the machine was
  loaded); it is thread-safe, so a caller can put images on a pool: the timing table's 2-thread column.
- 1920x1080 on one core stays above 10 ms: about ten full-size passes (min/max, uint8, Otsu, components,
  16-bit bins, histogram, floor (2), pyramid down and up) at ~1 ms each at 2 MP on this machine, plus
  writing and first-touching the 9 MB output per map (stage table, ~13 ms back to back); right after the
  old code (which churns memory) the same work takes up to ~22 ms, hence the spread between the median
  and the fastest round. The GMM fit itself is < 1 ms per map at every size."""


def earlier_state(parser: argparse.ArgumentParser, path: pathlib.Path | None, rewritten: bool) -> dict | None:
    """--state's earlier results (none yet for a file not written; None without --state), refused with one line
    before anything is measured unless it is a JSON file of this script's results, in a folder this process can
    write in when the run will rewrite it."""
    if path is None:
        return None
    if rewritten:
        check_output_file(parser, path, "--state")
    if not path.exists():
        return {"timing": {}, "fidelity": {}, "runs": []}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # not JSON, not text, or a folder
        parser.error(f"--state {path}: not a JSON file of this script's results ({error})")
    missing = [key for key in ("timing", "fidelity", "runs") if not isinstance(state, dict) or key not in state]
    if missing:
        parser.error(f"--state {path}: not a JSON file of this script's results (no {missing[0]!r} entry)")
    return state


FULL = {"timing_images": 4, "rounds": 7, "fidelity_maps": (240, 120, 40)}  # the defaults of the counts
QUICK = {"timing_images": 2, "rounds": 3, "fidelity_maps": (12, 8, 4)}   # and those of --quick


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES),
                        help="default: all (a subset, like --skip-timing or --skip-fidelity, needs --state or "
                             "--no-write)")
    parser.add_argument("--timing-images", type=positive_int,
                        help=f"held-out scenes timed per size (default {FULL['timing_images']}, "
                             f"{QUICK['timing_images']} with --quick)")
    parser.add_argument("--rounds", type=positive_int,
                        help=f"default {FULL['rounds']}, {QUICK['rounds']} with --quick")
    parser.add_argument("--fidelity-maps", type=non_negative_int, nargs=3, metavar=("S224", "S640", "S1920"),
                        help="maps compared with scikit-learn per size (224x224, 640x480, 1920x1080); 0 leaves "
                             f"that size's fidelity out (default {' '.join(map(str, FULL['fidelity_maps']))}, "
                             f"{' '.join(map(str, QUICK['fidelity_maps']))} with --quick)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smaller defaults of --timing-images, --rounds and --fidelity-maps (those given win)")
    parser.add_argument("--cpu", type=int, help="CPU to pin to (default: the last one allowed)")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS_PATH)
    parser.add_argument("--state", type=pathlib.Path,
                        help="JSON file of earlier results: what this run measures replaces its entries, the report "
                             "covers both (e.g. fidelity once, timing again at a quieter hour)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # flags given explicitly win over --quick
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_output_options(parser, "host-step", args.results, write=not args.no_write)
    fidelity_counts = dict(zip(SIZES, args.fidelity_maps))
    timed = set() if args.skip_timing else set(args.sizes)
    checked = set() if args.skip_fidelity else {name for name in args.sizes if fidelity_counts[name]}
    report_only = not timed and not checked  # only rewrite the report from --state
    if report_only and not (args.state and args.state.exists()):
        parser.error("a run that measures nothing (--skip-timing with --skip-fidelity, or with --fidelity-maps 0 at "
                     "its --sizes) needs an existing --state file")
    state = earlier_state(parser, args.state, rewritten=not report_only)
    refuse_part_of_a_table(parser, "--sizes, --skip-timing, --skip-fidelity or --fidelity-maps 0 without --state "
                           "measures",
                           args.state is None and not timed == checked == set(SIZES), write=not args.no_write,
                           table="the section", results_path=args.results)
    if args.cpu is not None and args.cpu not in ALL_CPUS:  # refused now, not by sched_setaffinity after loading
        parser.error(f"--cpu {args.cpu}: this process may run on CPUs {', '.join(map(str, sorted(ALL_CPUS)))} only")
    if report_only:
        text = report(state["timing"], state["fidelity"], state["runs"])
        print(text)
        if not args.no_write:
            write_section("host-step", text, args.results)
        return
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    load_before, started = load_average(), time.time()
    machine = machine_description()
    import tclip_jax

    explainer = tclip_jax.TCLIP.from_pretrained()
    os.sched_setaffinity(0, {cpu})
    cv2.setNumThreads(1)
    timing, fidelity = {}, {}
    with threadpool_limits(1):
        for name in args.sizes:
            if not args.skip_timing:
                images = [maps for maps, _ in explained_images(explainer, SIZES[name], args.timing_images)]
                timing[name] = time_size(images, args.rounds)
                t = timing[name]
                print(f"{name}: old {t['old']['wall'] * 1e3:.1f} ms/map (CPU {t['old']['cpu'] * 1e3:.1f}), "
                      f"new {t['new']['wall'] * 1e3:.2f} ms/map (CPU {t['new']['cpu'] * 1e3:.2f}), "
                      f"{t['maps']} maps; first-size fit +{t['setup'] * 1e3:.0f} ms", flush=True)
            if name in checked:
                # scenes after the timed ones
                fidelity[name] = fidelity_size(explainer, SIZES[name], fidelity_counts[name], offset=1000)
                f = fidelity[name]
                print(f"{name}: {f['maps']} maps, max |new - ref| {f['new']['max']:.1e}, "
                      f"max |old - ref| {f['old']['max']:.1e}, soft map max {f['soft_new']['max']:.1e}", flush=True)
    runs = [{"date": today(), "command": command_line(), "load_before": load_before, "load_after": load_average(),
             "minutes": (time.time() - started) / 60, "timing": sorted(timing), "fidelity": sorted(fidelity),
             "machine": machine, "cpus": len(ALL_CPUS)}]
    if state is not None:
        state["timing"].update(timing)
        state["fidelity"].update(fidelity)
        state["runs"] = [r for r in state["runs"]
                         if not (set(r["timing"]) <= set(timing) and set(r["fidelity"]) <= set(fidelity))]
        state["runs"] += [r for r in runs if r["timing"] or r["fidelity"]]
        write_text_atomic(args.state, json.dumps(state, indent=1, default=_jsonable))
        timing, fidelity, runs = state["timing"], state["fidelity"], state["runs"]
    text = report(timing, fidelity, runs)
    print(text)
    if not args.no_write:
        write_section("host-step", text, args.results)


if __name__ == "__main__":
    run_main(main)
