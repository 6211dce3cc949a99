"""benchmarks/: the scripts refuse what they cannot run with one line (argparse's) before measuring, and report what they
measured as measured."""
import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import memory, sweep_throughput  # noqa: E402
from benchmarks._common import check_output_file, positive_int  # noqa: E402


def test_counts_are_integers_of_at_least_one():
    assert positive_int("3") == 3
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
            positive_int(bad)
    done = subprocess.run([sys.executable, "benchmarks/startup.py", "--repeats", "0", "--no-write"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("startup.py: error: argument --repeats: expected an integer >= 1, "
                                                    "got 0")


@pytest.mark.parametrize("command, message", [
    (["benchmarks/host_step.py", "--timing-images", "0"], "argument --timing-images: expected an integer >= 1, got 0"),
    (["benchmarks/host_step.py", "--fidelity-maps", "3", "-1", "3"],
     "argument --fidelity-maps: expected an integer >= 0, got -1"),
    (["benchmarks/host_step.py", "--cpu", "99999"], "--cpu 99999: this process may run on CPUs "),
    (["benchmarks/speed.py", "--threads", "-1"], "argument --threads: expected an integer >= 1, got -1"),
    (["benchmarks/gpu_profile.py", "--batches", "8", "0"], "argument --batches: expected an integer >= 1, got 0"),
    (["benchmarks/gpu_profile.py", "--explain-images", "0"], "argument --explain-images: expected an integer >= 1"),
    (["benchmarks/gpu_profile.py", "--budget-s", "0"], "argument --budget-s: expected a number of seconds > 0, got 0"),
    (["benchmarks/gpu_profile.py", "--budget-s", "nan"],
     "argument --budget-s: expected a number of seconds > 0, got nan"),
    (["benchmarks/gpu_profile.py", "--methods", "rclip"],
     "--methods chooses the methods of --embedded-dtypes; the profile measures TCLIP alone"),
    (["benchmarks/gpu_profile.py", "--embedded-dtypes", "1", "--methods", "tclipp"],
     "argument --methods: invalid choice: 'tclipp'"),
    (["benchmarks/map_gradient.py", "--sizes", "16"],
     "argument --sizes: expected a map side of at least one patch (32 pixels), got 16"),
    (["benchmarks/memory.py", "--measure", "0"], "argument --measure: expected an integer >= 1, got 0"),
    (["benchmarks/speed.py", "--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["benchmarks/memory.py", "--prompts", "1", "1000"],
     "--prompts 1000: there are only 903 single-word class names"),
    (["benchmarks/sweep_throughput.py", "--scenes", "2", "--batch-size", "2"],
     "--scenes 2 with --batch-size 2 is one batch; the rate after the first batch and the device's waiting share "
     "need two"),
    (["benchmarks/sweep_throughput.py", "--model", "{tmp}", "--scenes", "2", "--batch-size", "1"],
     "the run on 1 device(s) failed: FileNotFoundError: {tmp} is not a CLIP checkpoint folder"),
])
def test_bad_arguments_end_a_benchmark_with_one_line(tmp_path, command, message):
    done = subprocess.run([sys.executable, *(c.format(tmp=tmp_path) for c in command), "--no-write"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message.format(tmp=tmp_path) in done.stderr.strip().splitlines()[-1]


def test_help_of_a_benchmark_that_imports_its_libraries_after_parsing_imports_none_of_them():
    """map_gradient.py and model.py parse their arguments before importing JAX, PyTorch and transformers (seconds
    each on a loaded machine), so --help and argument errors are quick."""
    code = ("import runpy, sys\n"
            "for script in ('benchmarks/map_gradient.py', 'benchmarks/model.py'):\n"
            "    sys.argv = [script, '--help']\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as end:\n"
            "        assert end.code == 0, end.code\n"
            "print(sorted(name for name in ('jax', 'torch', 'transformers') if name in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_section_is_replaced_whole_and_the_text_around_it_kept(tmp_path):
    from benchmarks._common import write_section

    results = tmp_path / "RESULTS.md"
    write_section("one", "first table", results)
    results.write_text(results.read_text() + "\nReading by hand, after the end marker.\n")
    write_section("two", "another", results)
    write_section("one", "new table", results)
    text = results.read_text()
    assert text.index("<!-- one:start -->\nnew table\n<!-- one:end -->") < text.index("Reading by hand") \
        < text.index("<!-- two:start -->\nanother\n<!-- two:end -->")
    assert "first table" not in text and sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]
    with pytest.raises(ValueError, match="section name must be"):
        write_section("bad name", "x", results)


def test_a_synthetic_run_of_some_methods_or_protocols_is_not_written_over_a_whole_table():
    for part in (["--methods", "tclip_k1"], ["--protocols", "captions"]):
        done = subprocess.run([sys.executable, "benchmarks/synthetic_grounding.py", "--scenes", "1", *part], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].endswith("--methods or --protocols measure part of a model's "
                                                             "table, which would replace the whole one in RESULTS.md: "
                                                             "add --no-write")


def test_sweep_throughput_reports_the_load_average_read_before_its_runs(monkeypatch, capsys):
    runs = []

    monkeypatch.setenv("XLA_FLAGS", "--a_users_flag=1")  # never reaches XLA: the children are simulated

    def child_run(command, **kwargs):  # each simulated device count's measuring run, without measuring
        users, own = kwargs["env"]["XLA_FLAGS"].split(" ")  # the user's flags kept, the device count added
        assert users == "--a_users_flag=1"
        devices = int(own.removeprefix("--xla_force_host_platform_device_count="))
        runs.append(devices)
        throughput = {"devices": devices, "images": 4, "batches": 2, "wall_seconds": 1.0, "images_per_second": 4.0,
                      "steady_images_per_second": 5.0, "device_wait_share": 0.1}
        return subprocess.CompletedProcess(command, 0, json.dumps(throughput) + "\n", "")

    monkeypatch.setattr(sweep_throughput.subprocess, "run", child_run)
    monkeypatch.setattr(sweep_throughput, "machine_description", lambda: "a machine")
    monkeypatch.setattr(sweep_throughput, "load_average", lambda: f"load after {len(runs)} runs")
    monkeypatch.setattr(sys, "argv", ["sweep_throughput.py", "--scenes", "4", "--batch-size", "2", "--no-write"])
    sweep_throughput.main()
    assert runs == list(sweep_throughput.DEVICE_COUNTS)
    assert "load average before the run: load after 0 runs\n" in capsys.readouterr().out


def test_memory_ends_a_failed_run_with_its_last_line_after_the_rows_measured_before_it(monkeypatch, capsys):
    def child_run(command, **kwargs):  # the measuring run of each prompt count, without measuring
        assert command[-1] == "--no-write"  # the parent writes RESULTS.md; the child must not need to
        count = int(command[command.index("--measure") + 1])
        if count == 80:
            return subprocess.CompletedProcess(command, 1, "", "Traceback (most recent call last):\n  ...\n"
                                                                "MemoryError: out of memory\n")
        measured = {"prompts": count, "distinct_arrays": 2, "result_mib": 3.0, "peak_rss_mib": 500.0}
        return subprocess.CompletedProcess(command, 0, json.dumps(measured) + "\n", "")

    monkeypatch.setattr(memory.subprocess, "run", child_run)
    monkeypatch.setattr(sys, "argv", ["memory.py"])  # argparse's program name
    with pytest.raises(SystemExit) as raised:
        memory.main(["--prompts", "1", "80", "400", "--no-write"])
    out, err = capsys.readouterr()
    assert raised.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("memory.py: error: the run with 80 prompts failed: MemoryError: out of "
                                            "memory")
    assert out.strip().splitlines() == ["1 prompts: peak RSS 500 MiB, result 3 MiB"]


@pytest.mark.parametrize("command, message", [
    (["benchmarks/speed.py", "--section", "bad name", "--no-write"],
     "section name must be letters, digits, '_', '.' or '-', got 'bad name'"),
    (["benchmarks/speed.py", "--results", "{tmp}/none/RESULTS.md"],
     "results file {tmp}/none/RESULTS.md: the folder {tmp}/none does not exist"),
    (["benchmarks/host_step.py", "--results", "{tmp}/none/RESULTS.md"], "the folder {tmp}/none does not exist"),
    (["benchmarks/host_threads.py", "--results", "{tmp}/none/RESULTS.md"], "the folder {tmp}/none does not exist"),
    (["benchmarks/gpu_profile.py", "--results", "{tmp}/none/RESULTS.md"], "the folder {tmp}/none does not exist"),
    (["benchmarks/gpu_profile.py", "--json", "{tmp}/none/rows.json", "--no-write"],
     "--json {tmp}/none/rows.json: the folder {tmp}/none does not exist"),
    (["benchmarks/synthetic_grounding.py", "--json", "{tmp}/none/g.json", "--no-write"],
     "--json {tmp}/none/g.json: the folder {tmp}/none does not exist"),
    (["benchmarks/host_step.py", "--state", "{tmp}/not_json.json", "--no-write"],
     "--state {tmp}/not_json.json: not a JSON file of this script's results (Expecting value"),
    (["benchmarks/host_step.py", "--state", "{tmp}/other.json", "--skip-timing", "--skip-fidelity", "--no-write"],
     "--state {tmp}/other.json: not a JSON file of this script's results (no 'timing' entry)"),
    (["benchmarks/host_step.py", "--state", "{tmp}/none/state.json", "--no-write"],
     "--state {tmp}/none/state.json: the folder {tmp}/none does not exist"),
])
def test_outputs_a_benchmark_could_not_write_are_refused_before_it_measures(tmp_path, command, message):
    (tmp_path / "not_json.json").write_text("not json\n")
    (tmp_path / "other.json").write_text('{"rows": []}\n')
    done = subprocess.run([sys.executable, *(c.format(tmp=tmp_path) for c in command)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message.format(tmp=tmp_path) in done.stderr.strip().splitlines()[-1]


def test_an_output_file_that_is_a_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        check_output_file(argparse.ArgumentParser(prog="bench"), tmp_path, "--json")
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"bench: error: --json {tmp_path} is a folder, not a file"


def test_an_output_file_through_a_link_is_taken_and_one_under_a_link_to_nothing_refused(tmp_path, capsys):
    """A link to a file not yet made is written through (files.write_text_atomic makes its target): taken, as before
    this session's link checks; a file in a folder that is a link to nothing cannot be written: one line naming it."""
    from tclip_jax.files import write_text_atomic

    parser = argparse.ArgumentParser(prog="bench")
    (tmp_path / "later.json").symlink_to(tmp_path / "made.json")
    check_output_file(parser, tmp_path / "later.json", "--json")
    write_text_atomic(tmp_path / "later.json", "{}")
    assert (tmp_path / "made.json").read_text() == "{}"
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit):
        check_output_file(parser, tmp_path / "gone" / "x.json", "--json")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"bench: error: --json {tmp_path / 'gone' / 'x.json'}: "
                                                                f"{tmp_path / 'gone'} is a link to nothing; remove it "
                                                                "or name another folder")


def test_an_output_file_is_checked_as_it_is_written_by_renaming_in_its_folder(tmp_path, capsys, monkeypatch):
    """Outputs are written atomically (a temporary file renamed over the file): the folder must be writable, and
    the file's own write bit does not matter. (As root every access check passes, so os.access is replaced.)"""
    import os

    folder, parser = tmp_path / "out", argparse.ArgumentParser(prog="bench")
    folder.mkdir()
    (folder / "RESULTS.md").write_text("old")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: pathlib.Path(path) != folder / "RESULTS.md"
                        and real_access(path, mode))
    check_output_file(parser, folder / "RESULTS.md", "results file")  # a read-only file: renamed over, fine
    monkeypatch.setattr(os, "access", lambda path, mode: pathlib.Path(path) != folder and real_access(path, mode))
    with pytest.raises(SystemExit):
        check_output_file(parser, folder / "RESULTS.md", "results file")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"bench: error: results file {folder / 'RESULTS.md'}: "
                                                                f"cannot write in {folder}")


@pytest.mark.parametrize("damage", [
    lambda text: text.replace("<!-- host-threads:end -->\n", ""),
    lambda text: text + "\n<!-- host-threads:start -->\nagain\n<!-- host-threads:end -->\n",
    lambda text: text.replace("<!-- host-threads:start -->\nold\n<!-- host-threads:end -->",
                              "<!-- host-threads:end -->\nold\n<!-- host-threads:start -->"),
], ids=["end removed", "repeated", "end before start"])
def test_damaged_markers_of_the_section_are_refused_before_the_benchmark_measures(tmp_path, damage):
    results = tmp_path / "RESULTS.md"
    results.write_text(damage("# Results\n\n<!-- host-threads:start -->\nold\n<!-- host-threads:end -->\n\nReading.\n"))
    before = results.read_text()
    done = subprocess.run([sys.executable, "benchmarks/host_threads.py", "--results", str(results), "--images", "1",
                           "--rounds", "1", "--threads", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"host_threads.py: error: {results} has ")
    assert done.stderr.strip().splitlines()[-1].endswith("markers (one each, in that order, or none); fix it by hand")
    assert results.read_text() == before


PART_OF_THE_TABLE = ("error: --workloads measures part of the section's table, which would replace the whole one in "
                     "RESULTS.md: add --no-write")


def test_a_speed_run_of_some_workloads_is_not_written_over_the_whole_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    done = subprocess.run([sys.executable, "benchmarks/speed.py", "--workloads", "prompt", "--results", str(results),
                           "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"speed.py: {PART_OF_THE_TABLE}"
    assert results.read_text() == "# Results\n"


def test_an_explain_overlap_run_of_some_workloads_is_not_written_over_the_whole_table(monkeypatch, capsys):
    """explain_overlap.py writes only benchmarks/RESULTS.md: run in this process, where it cannot measure or write."""
    from benchmarks import explain_overlap

    monkeypatch.setattr(explain_overlap, "timed_tclip", lambda: pytest.fail("explain_overlap.py measured"))
    monkeypatch.setattr(explain_overlap, "write_section", lambda *_: pytest.fail("explain_overlap.py wrote"))
    monkeypatch.setattr(sys, "argv", ["explain_overlap.py"])  # argparse's program name
    with pytest.raises(SystemExit) as raised:
        explain_overlap.main(["--workloads", "coco80"])
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"explain_overlap.py: {PART_OF_THE_TABLE}"


PART_OF_HOST_STEP = ("--sizes, --skip-timing, --skip-fidelity or --fidelity-maps 0 without --state measures part of "
                     "the section")


class Measured(Exception):
    """Raised where a benchmark begins to measure (its first reading of the load average)."""


def _started_measuring():
    raise Measured


@pytest.mark.parametrize("script, options, message", [
    ("host_step", ["--sizes", "224x224", "640x480"], PART_OF_HOST_STEP),
    ("host_step", ["--skip-timing"], PART_OF_HOST_STEP),
    ("host_step", ["--skip-fidelity"], PART_OF_HOST_STEP),
    ("host_step", ["--skip-timing", "--state", "{tmp}/state.json"], None),
    ("host_step", ["--sizes", "224x224", "--no-write"], None),
    ("host_step", ["--skip-timing", "--sizes", "224x224", "640x480", "--fidelity-maps", "12", "12", "0", "--no-write"],
     None),  # RESULTS.md's check of 2026-12-04
    ("host_step", ["--fidelity-maps", "12", "0", "4"], PART_OF_HOST_STEP),
    ("memory", ["--prompts", "1", "80"], "--prompts measures part of the section's table"),
    ("memory", ["--prompts", "1", "80", "400", "800"], None),
    ("map_gradient", ["--sizes", "112"], "--sizes measures part of the section's table"),
    ("host_threads", ["--threads", "2", "4"], "--threads measures part of the section's table"),
    ("gpu_profile", ["--batches", "8"], "--models or --batches measure part of the section's table"),
    ("gpu_profile", ["--models", "ViT-B/32"], "--models or --batches measure part of the section's table"),
    ("gpu_profile", ["--batches", "8", "--no-write"], None),
    ("gpu_profile", ["--embedded-dtypes", "1", "--methods", "rclip"], "--methods measures part of the section's table"),
    ("gpu_profile", ["--embedded-dtypes", "1", "--methods", "rclip", "--no-write"], None),
])
def test_a_run_of_part_of_a_table_is_not_written_over_the_whole_one(tmp_path, monkeypatch, capsys, script, options,
                                                                     message):
    """Run in this process, stopped where it would begin to measure; None: the run is let through."""
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    monkeypatch.setattr(module, "load_average", _started_measuring)
    if script == "gpu_profile":  # measures on a GPU only
        monkeypatch.setattr(module, "jax", argparse.Namespace(devices=lambda: [argparse.Namespace(platform="gpu")]))
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])  # argparse's program name
    argv = [option.format(tmp=tmp_path) for option in options]
    if message is None:
        with pytest.raises(Measured):
            module.main(argv)
    else:
        with pytest.raises(SystemExit) as raised:
            module.main(argv)
        assert raised.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"{script}.py: error: {message}, which would replace the whole one in RESULTS.md: add --no-write")


def _host_step_with_fidelity_stubbed(monkeypatch):
    """benchmarks.host_step with its model and map comparison stubbed, and the list of (size, maps) it is asked to
    compare."""
    import tclip_jax
    from benchmarks import host_step

    asked = []
    compared = {"span": 1.0, "fallback": None, "input_res": None, **dict.fromkeys(
        ("new", "old", "default", "old_vs_default", "soft_new", "soft_blur", "soft_tau", "soft_old"), 0.0)}
    monkeypatch.setattr(host_step, "fidelity_size", lambda explainer, size_hw, maps, offset: asked.append(
        (size_hw, maps)) or host_step.summarise([compared]))
    monkeypatch.setattr(tclip_jax.TCLIP, "from_pretrained", lambda: None)
    monkeypatch.setattr(host_step, "machine_description", lambda: "a machine")
    monkeypatch.setattr(host_step.os, "sched_setaffinity", lambda pid, cpus: None)  # this process stays unpinned
    monkeypatch.setattr(host_step.cv2, "setNumThreads", lambda threads: None)
    monkeypatch.setattr(sys, "argv", ["host_step.py"])  # argparse's program name
    return host_step, asked


def test_host_step_leaves_out_the_fidelity_of_a_size_given_0_maps(monkeypatch, capsys):
    """--fidelity-maps 0 at a size: no map of that size is compared, and a run left with nothing to measure needs
    --state. The model and the comparison are stubbed: the sizes and counts asked for are recorded."""
    host_step, asked = _host_step_with_fidelity_stubbed(monkeypatch)
    host_step.main(["--skip-timing", "--fidelity-maps", "2", "0", "1", "--no-write"])
    assert asked == [(host_step.SIZES["224x224"], 2), (host_step.SIZES["1920x1080"], 1)]
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in printed if " | new - reference |" in line] == ["| 224x224", "| 1920x1080"]
    with pytest.raises(SystemExit) as raised:
        host_step.main(["--skip-timing", "--sizes", "640x480", "--fidelity-maps", "2", "0", "1", "--no-write"])
    assert raised.value.code == 2 and asked == [(host_step.SIZES["224x224"], 2), (host_step.SIZES["1920x1080"], 1)]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "host_step.py: error: a run that measures nothing (--skip-timing with --skip-fidelity, or with "
        "--fidelity-maps 0 at its --sizes) needs an existing --state file")


def test_host_step_counts_given_explicitly_win_over_quick(monkeypatch, capsys):
    """--quick sets the counts not given; --fidelity-maps given beside it is what runs. The comparison is stubbed."""
    host_step, asked = _host_step_with_fidelity_stubbed(monkeypatch)
    host_step.main(["--quick", "--skip-timing", "--fidelity-maps", "2", "0", "1", "--no-write"])
    host_step.main(["--quick", "--skip-timing", "--sizes", "640x480", "--no-write"])
    assert asked == [(host_step.SIZES["224x224"], 2), (host_step.SIZES["1920x1080"], 1), (host_step.SIZES["640x480"], 8)]


def test_host_step_reports_each_run_of_its_state_with_the_machine_it_ran_on(tmp_path, monkeypatch, capsys):
    """--state keeps runs of other machines: each run's line names its own machine and CPU count (an entry written
    before runs recorded them says so), not the machine that writes the report. Model and comparison stubbed."""
    import tclip_jax
    from benchmarks import host_step

    compared = {"span": 1.0, "fallback": None, "input_res": None, **dict.fromkeys(
        ("new", "old", "default", "old_vs_default", "soft_new", "soft_blur", "soft_tau", "soft_old"), 0.0)}
    monkeypatch.setattr(host_step, "fidelity_size", lambda *_, **__: host_step.summarise([compared]))
    monkeypatch.setattr(tclip_jax.TCLIP, "from_pretrained", lambda: None)
    monkeypatch.setattr(host_step.os, "sched_setaffinity", lambda pid, cpus: None)  # this process stays unpinned
    monkeypatch.setattr(host_step.cv2, "setNumThreads", lambda threads: None)
    monkeypatch.setattr(host_step, "ALL_CPUS", {0, 1, 2})
    monkeypatch.setattr(sys, "argv", ["host_step.py"])  # argparse's program name
    state = tmp_path / "state.json"
    for machine, maps in (("machine A", ["2", "0", "0"]), ("machine B", ["0", "0", "1"])):
        monkeypatch.setattr(host_step, "machine_description", lambda machine=machine: machine)
        host_step.main(["--skip-timing", "--fidelity-maps", *maps, "--state", str(state), "--no-write"])
    saved = json.loads(state.read_text())
    del saved["runs"][0]["machine"], saved["runs"][0]["cpus"]  # as written before runs recorded them
    state.write_text(json.dumps(saved))
    capsys.readouterr()
    monkeypatch.setattr(host_step, "machine_description", lambda: "machine C")
    host_step.main(["--skip-timing", "--skip-fidelity", "--state", str(state), "--no-write"])
    printed = capsys.readouterr().out
    runs = [line for line in printed.splitlines() if line.startswith("- 2")]
    assert len(runs) == 2 and "machine not recorded" in runs[0] and "machine A" not in printed
    assert "machine: machine B; 3 CPUs allowed to the process" in runs[1] and "machine C" not in printed


def test_baselines_prints_its_section_header_with_no_write_too(monkeypatch, capsys):
    """--no-write prints the whole section (machine, date, load, command), as every script does. The model and the
    methods' rows are stubbed."""
    from benchmarks import baselines

    monkeypatch.setattr(baselines, "init_params", lambda config: None)
    monkeypatch.setattr(baselines, "save_checkpoint", lambda folder, params, config: folder)
    monkeypatch.setattr(baselines, "load_clip", lambda folder: None)
    monkeypatch.setattr(baselines, "METHODS", {"m": None})
    monkeypatch.setattr(baselines, "method_row", lambda name, *_: (name, 1, 0, "1.00", "0.20"))
    monkeypatch.setattr(baselines, "machine_description", lambda: "a machine")
    monkeypatch.setattr(baselines, "write_section", lambda *_: pytest.fail("--no-write wrote the section"))
    monkeypatch.setattr(sys, "argv", ["baselines.py", "--no-write", "--repeats", "1"])
    baselines.main()
    printed = capsys.readouterr().out
    assert "Machine: a machine" in printed and "load average before the run: " in printed
    assert "Command: `" in printed and "--no-write --repeats 1` (median of 1" in printed and "| m | 1 | 0 |" in printed


def test_a_gpu_profile_smoke_run_writes_no_results_but_its_json(tmp_path, monkeypatch):
    """--smoke writes nothing to the results file, with --embedded-dtypes too; --json is written in both. The
    measurements are replaced by rows of the shape they return."""
    from benchmarks import gpu_profile

    compared = {"method": "tclip", "bf16_map_diff": 0.01, "bf16_map_diff_median": 0.01, "bf16_tau_diff": 0.02,
                "bf16_boxes_equal": "1/1"}
    timed = {"batch": 1, "maps": 1, "device_ms": 1.0, "floor_ms": 1.0, "host_ms": 1.0, "explain_ms": 2.0,
             "explain_over_floor": 2.0, "skipped": False}
    monkeypatch.setattr(gpu_profile, "embedded_dtype_rows",
                        lambda scenes, methods: [{"model": "m", "workload": "w", **compared}])
    monkeypatch.setattr(gpu_profile, "profile", lambda *_: [{"model": "tiny", "dtype": "float32", "workload": "w",
                                                             **timed}, {"model": "tiny", "workload": "w", **compared}])
    monkeypatch.setattr(gpu_profile, "machine_description", lambda: "a machine")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n<!-- dtype-maps:start -->\nold\n<!-- dtype-maps:end -->\n")
    for options in (["--embedded-dtypes", "1"], []):
        rows = tmp_path / f"rows{len(options)}.json"
        assert gpu_profile.main(["--smoke", *options, "--results", str(results), "--json", str(rows)]) == 0
        assert results.read_text() == "# Results\n\n<!-- dtype-maps:start -->\nold\n<!-- dtype-maps:end -->\n"
        assert json.loads(rows.read_text())[-1]["bf16_boxes_equal"] == "1/1"


def test_a_gpu_profile_run_that_measured_no_configuration_writes_nothing(tmp_path, monkeypatch, capsys):
    """A budget spent before the first configuration leaves the results file's section (and --json) as they were:
    a table of rows all 'skipped (time budget)' would replace measured ones. The profile is stubbed."""
    from benchmarks import gpu_profile

    monkeypatch.setattr(gpu_profile, "jax", argparse.Namespace(devices=lambda: [argparse.Namespace(platform="gpu")]))
    monkeypatch.setattr(gpu_profile, "make_scene", lambda seed, hw: argparse.Namespace(image=None))
    monkeypatch.setattr(gpu_profile, "profile", lambda plan, configs, images, deadline: [
        {"model": m, "dtype": "float32", "workload": "w", "batch": b, "skipped": True}
        for m in plan.models for b in plan.batches])
    monkeypatch.setattr(gpu_profile, "machine_description", lambda: "a machine")
    monkeypatch.setattr(sys, "argv", ["gpu_profile.py"])
    results, rows = tmp_path / "RESULTS.md", tmp_path / "rows.json"
    before = "# Results\n\n<!-- gpu-profile:start -->\nthe measured table\n<!-- gpu-profile:end -->\n"
    results.write_text(before)
    assert gpu_profile.main(["--budget-s", "1e-9", "--results", str(results), "--json", str(rows)]) == 1
    assert results.read_text() == before and not rows.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpu_profile.py: no configuration started within --budget-s 1e-09; nothing written"]


def test_a_bar_inside_a_table_cell_is_escaped():
    from benchmarks._common import markdown_table
    from benchmarks.gpu_profile import dtype_table

    assert markdown_table(["a", "max |a - b|"], [["x|y", r"already \| escaped"]]).splitlines() == [
        r"| a | max \|a - b\| |", "| --- | --- |", r"| x\|y | already \| escaped |"]
    table = dtype_table([{"model": "m", "method": "rclip", "workload": "w", "bf16_map_diff": 0.1,
                          "bf16_map_diff_median": 0.05, "bf16_tau_diff": None, "bf16_boxes_equal": "1/2"}])
    header, _, row = table.splitlines()
    assert header.count("|") - header.count(r"\|") == 8  # 7 cells
    assert row == "| m | rclip | w | 1.0e-01 | 5.0e-02 | - | 1/2 |"  # no tau: a dash


def test_the_dtype_comparison_takes_each_maps_own_range_the_median_over_maps_and_tau_where_there_is_one():
    """compare_dtypes against the figures worked out by hand: three maps over two images, one flat (its range taken
    as 1), tau of the maps that have a fit only."""
    from benchmarks.gpu_profile import compare_dtypes
    from tclip_jax.methods.base import HostMaps
    from tclip_jax.postprocess import Box

    fit = lambda tau: argparse.Namespace(tau=tau)  # noqa: E731 (compare_dtypes reads gmm.tau alone)
    first = np.array([[[0, 1], [2, 4]], [[0, 0], [0, 2]]], np.float32)  # ranges 4 and 2
    first_low = first + np.array([[[0, 0.4], [0, 0]], [[0, 0], [-0.6, 0]]], np.float32)  # 0.4 / 4, 0.6 / 2
    flat, flat_low = np.full((1, 2, 2), 5, np.float32), np.full((1, 2, 2), 5.2, np.float32)  # 0.2 / 1
    box, other = Box(0, 0, 1, 1), Box(0, 0, 2, 1)
    outputs = {"float32": [(first, [HostMaps(None, fit(1.0), box), HostMaps(None, fit(0.5), box)]),
                           (flat, [HostMaps(None, None, box)])],
               "bfloat16": [(first_low, [HostMaps(None, fit(1.2), box), HostMaps(None, fit(0.5), other)]),
                            (flat_low, [HostMaps(None, None, box)])]}
    compared = compare_dtypes(outputs)
    assert compared["bf16_map_diff"] == pytest.approx(0.3, abs=1e-6)
    assert compared["bf16_map_diff_median"] == pytest.approx(0.2, abs=1e-6)
    assert compared["bf16_tau_diff"] == pytest.approx(0.2 / 4) and compared["bf16_boxes_equal"] == "2/3"
    no_fits = {d: [(maps, [HostMaps(None, None, box)] * len(maps)) for maps, _ in rows] for d, rows in outputs.items()}
    assert compare_dtypes(no_fits)["bf16_tau_diff"] is None


@pytest.mark.parametrize("name", ["tclip", "rclip"])
def test_the_dtype_comparison_takes_the_maps_tau_and_boxes_explain_gives(tiny_model, name):
    """scene_outputs is explain's pipeline: its maps are explain's distinct maps (TCLIP: each word, then the caption;
    a prompt-level method: the caption), and so are their tau and boxes. The tiny test model, a small scene."""
    from benchmarks.gpu_profile import scene_outputs
    from tclip_jax.checkpoints.load import LoadedClip
    from tclip_jax.methods import get
    from tclip_jax.methods.tclip import TCLIP
    from tclip_jax.model.tokenizer import default_tokenizer
    from tclip_jax.synthetic import HELDOUT_SEED_START, make_scene

    clip = LoadedClip(*tiny_model, default_tokenizer(), "tclip", "test")
    method = get(name)(clip, TCLIP.Settings(translations=1) if name == "tclip" else None)  # one copy: cheaper
    scene = make_scene(HELDOUT_SEED_START, (96, 128))
    maps, hosts = scene_outputs(method, scene.image, scene.caption)
    (prompt,) = method.explain(scene.image, scene.caption).prompts
    explained = list({id(m.heatmap): m for m in (*prompt.word_maps, prompt.phrase)}.values())  # equal queries share
    assert len(maps) == len(hosts) == len(explained) == (len(prompt.words) + 1 if name == "tclip" else 1)
    for array, host, result in zip(maps, hosts, explained):
        np.testing.assert_array_equal(array, result.heatmap)
        assert host.box == result.box and (host.gmm is None) == (result.tau is None) == (name != "tclip")
        assert host.gmm is None or host.gmm.tau == result.tau


def test_a_ctrl_c_ends_a_benchmark_with_one_line_and_status_130():
    """startup.py times fresh processes: once it has started one, it is inside its main, and a SIGINT there is a
    Ctrl-C mid-measurement. Every script runs its main through the same `run_main`."""
    import signal
    import time

    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "_common.py")
    assert all(p.read_text().endswith('\nif __name__ == "__main__":\n    run_main(main)\n') for p in scripts)
    process = subprocess.Popen([sys.executable, "benchmarks/startup.py", "--repeats", "1000", "--no-write"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        children = pathlib.Path(f"/proc/{process.pid}/task/{process.pid}/children")  # Linux
        deadline = time.monotonic() + (60 if children.exists() else 5)
        while time.monotonic() < deadline and not (children.exists() and children.read_text().strip()):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines() == ["startup.py: interrupted"] and out == ""


def test_gmm_crawl_takes_tau_as_the_host_step_does_where_the_components_do_not_cross():
    """A fit whose weighted densities do not cross between the means falls back to the map's mean in the host step
    (`soft.py`); gmm_crawl's tau gap compares those taus, not NaN that np.nanmax would drop."""
    from benchmarks import gmm_crawl
    from tclip_jax.postprocess import gmm, gmm_thresholds

    rng = np.random.default_rng(2)
    maps = [rng.laplace(0.0, 1.0, (60, 60)),  # unimodal: no crossing (as test_postprocess's fallback case)
            np.concatenate([rng.normal(0.0, 1.0, 2400), rng.normal(5.0, 1.0, 1200)]).reshape(60, 60)]
    params = gmm.fit_histograms(gmm.map_histograms(maps, [m.min() for m in maps], [m.max() for m in maps]))
    host = gmm_thresholds(maps)
    assert [fit.fallback for fit in host] == ["no_root_between_means", None]
    taus = gmm_crawl.taus(params, maps)
    assert taus[0] == pytest.approx(maps[0].mean(), abs=1e-12)
    np.testing.assert_array_equal(taus, [fit.tau for fit in host])


def test_the_readme_names_every_benchmark_script():
    section = (ROOT / "README.md").read_text().split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert [name for name in scripts if f"`{name}`" not in section] == []


def test_every_benchmark_parser_takes_flags_only_as_spelled_in_full():
    """The CLI's parsers refuse abbreviations (`OneLineErrors`); the scripts' own parsers must too, or a flag added
    later that shares a prefix would change what a recorded command line (RESULTS.md) ran."""
    import ast

    scripts = sorted(ROOT.glob("benchmarks/*.py")) + [ROOT / "docs" / "screenshots.py"]
    calls = [(script.name, call) for script in scripts for call in ast.walk(ast.parse(script.read_text()))
             if isinstance(call, ast.Call) and ast.unparse(call.func) == "argparse.ArgumentParser"]
    assert len({name for name, _ in calls}) >= 15
    for name, call in calls:
        abbrev = [k.value for k in call.keywords if k.arg == "allow_abbrev"]
        assert len(abbrev) == 1 and isinstance(abbrev[0], ast.Constant) and abbrev[0].value is False, name
