"""`tclip` command line: one sub-command module each (convert, explain, sweep, train-eclip: module train_eclip).

Sub-command modules import their heavy dependencies (jax, the model, the datasets) inside `run`, so that help
and argument errors come back at once. Errors in what the user gave (files, folders, values) end the command
with one line on stderr and exit status 2; anything else with one line naming the internal error and exit
status 1 (set TCLIP_TRACEBACK=1 to see the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Optional, Sequence

from tclip_jax.files import ctrl_c_held, run_early_end_cleanups

# Sub-command name -> help. Its module under tclip_jax.cli (the name with '-' as '_') has `add_arguments(parser)`
# and `run(args) -> int`.
COMMANDS = {
    "convert": "Convert a CLIP checkpoint (Hugging Face, OpenAI, OpenCLIP) to a tclip_jax folder.",
    "explain": "Per-word TCLIP heatmaps, soft maps and boxes (or a baseline's maps) for images and prompts.",
    "sweep": "Evaluate a method over a dataset (COCO boxes or masks, ImageNet-S, VOC, synthetic), resumable.",
    "train-eclip": "Train ECLIP's projections (masked max pooling, contrastive) on a frozen CLIP, resumable.",
}
# What the user can fix: a missing or unreadable file, a bad value, no network, a missing optional package.
USER_ERRORS = (OSError, ValueError, TypeError, ImportError)
# Sub-command -> what needs less memory, said when a run runs out of it.
LESS_MEMORY = {
    "explain": "a smaller image (or --input-protocol whole), fewer prompts or fewer translated copies need less",
    "sweep": "a smaller --batch-size, --input-protocol whole or fewer translated copies need less",
    "train-eclip": "a smaller --batch-size needs less in the training steps (the features are computed 32 pairs at "
                   "a time whatever it is)",
    "convert": "converting holds the checkpoint twice in memory",
}


class OneLineErrors(argparse.ArgumentParser):
    """A parser (and, through `add_subparsers`, each sub-command's) that refuses arguments in one line, as the
    commands' own errors are, not under the whole usage block; exit status 2, as argparse's. A flag is taken only as
    spelled in full (``allow_abbrev=False``): argparse read ``--transl 1`` as ``--translations 1``, and a later flag
    sharing the prefix would have changed what such a line meant (or refused it as ambiguous)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def refuse(self, message: str):
        """What the program itself refuses once its arguments are parsed (a bad value, a folder in use, a full disk):
        one line, exit status 2, without the --help hint (the training scripts, whose errors are not raised)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


class CommandParser(OneLineErrors):
    """A sub-command's parser, which refuses the arguments it does not know itself, naming the sub-command and its
    help ("tclip explain: error: unrecognized arguments: --bogus (see tclip explain --help)"): argparse hands them up
    to the top-level parser, whose refusal named "tclip" and "tclip --help", which lists no flag of the command."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="tclip", description="TCLIP: what does CLIP see per token?")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"tclip_jax.cli.{name.replace('-', '_')}")
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def program() -> int:
    """`tclip` as a program (the console script, ``python -m tclip_jax``): `main`, then, after a Ctrl-C or SIGTERM,
    the process ends without the interpreter's teardown, which crashed (SIGSEGV, 5 of 30 tries) when the signal
    had landed inside an XLA compilation; every file of the command is closed or removed by then. So does a process
    of a multi-process sweep that ends with an error (`sharding.joined`): another process's end left it unable to
    finish (`sharding.peer_stopped`), or its own error, which the others did not share. Its teardown waited on
    JAX's shutdown barrier for the processes still running (about 300 s) and then aborted (SIGABRT, a C++ trace),
    and so did theirs; ended at once, it is seen gone at the others' next barrier, where they end in one line."""
    status = main()
    sharding = sys.modules.get("tclip_jax.sweep.sharding")  # only a sweep starts jax.distributed
    in_turn = sharding is not None and (sharding.peer_stopped() or status != 0 and sharding.joined())
    if status in (130, 143) or in_turn:
        _end_early(status)
    return status


def _end_early(status: int) -> None:
    """Ends the process with ``status`` (130, 143; a multi-process sweep's error status) at once, in turn with
    the other processes of a multi-process sweep (`tclip_jax.sweep.sharding.end_in_turn`), after the cleanups of the
    blocks still running (the watchdog's case: `tclip_jax.files.at_early_end`, e.g. a new sweep's folder and lock)."""
    run_early_end_cleanups()
    sys.stdout.flush()
    sys.stderr.flush()
    if "tclip_jax.sweep.sharding" in sys.modules:  # only a sweep starts jax.distributed
        sys.modules["tclip_jax.sweep.sharding"].end_in_turn(_SigtermWatchdog.GRACE_S)
    os._exit(status)


def main(argv: Optional[Sequence[str]] = None) -> int:
    with redelivered_interrupts():
        return _main(argv)


@contextlib.contextmanager
def redelivered_interrupts() -> Iterator[None]:
    """While the block runs, a Ctrl-C or SIGTERM whose exception Python dropped is sent again
    (`InterruptRedelivery`); the hook before is put back after."""
    redelivery = sys.unraisablehook = InterruptRedelivery(sys.unraisablehook)
    try:
        yield
    finally:
        if sys.unraisablehook is redelivery:  # else a later hook (another main, in a thread) holds it: left in place
            sys.unraisablehook = redelivery.previous_hook
        redelivery.close()


@contextlib.contextmanager
def sigterm_as_interrupt(who: str) -> Iterator[None]:
    """While the block runs, a SIGTERM raises `Terminated` where a Ctrl-C would raise KeyboardInterrupt, and ends the
    process with 143 if it has not ended `_SigtermWatchdog.GRACE_S` later (`who`: the program, in that line). Only
    the main thread can set handlers, and one set outside Python (None) could not be put back: elsewhere the block
    just runs."""
    watched = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not None
    watchdog = _SigtermWatchdog(who) if watched else None
    try:
        yield
    finally:
        if watchdog is not None:
            watchdog.close()


@contextlib.contextmanager
def warnings_as_lines(who: str) -> Iterator[None]:
    """While the block runs, a warning is said in one line naming `who` (the program); the hook before is put back
    after, so that later warnings of the process (a notebook's, a test's) are not said as the command's. The line is
    written as tqdm writes, clearing a progress bar on stderr first and drawing it again below. So are matplotlib's
    warnings, which it logs (`_MatplotlibLines`): with no handler, logging wrote them raw on stderr."""
    def ours(message, *_):
        from tqdm import tqdm

        tqdm.write(f"{who}: warning: {_one_line(message)}", file=sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = ours
    # A handler of its own on matplotlib's logger: logging's last resort (raw lines on stderr) serves no record that
    # finds one; a handler the process set up (a notebook's) still gets them, as it asked.
    matplotlib_log, lines = logging.getLogger("matplotlib"), _MatplotlibLines(ours)
    matplotlib_log.addHandler(lines)
    try:
        yield
    finally:
        if warnings.showwarning is ours:  # else a later hook (another main, in a thread) holds it: left in place
            warnings.showwarning = previous
        matplotlib_log.removeHandler(lines)


class _MatplotlibLines(logging.Handler):
    """Says matplotlib's log records of level WARNING and above with `say`. A config folder matplotlib cannot make
    or write (HOME unwritable) is logged as two long records, the reason and the temporary folder used instead:
    said once, in one line."""

    # The format strings of matplotlib's records for that (matplotlib._get_config_or_cache_dir).
    UNWRITABLE = ("mkdir -p failed for path", "%s is not a writable directory")
    TEMPORARY = "Matplotlib created a temporary cache directory"

    def __init__(self, say: Callable[..., None]):
        super().__init__(logging.WARNING)
        self.say = say
        self.unwritable = ""  # the folder, where matplotlib named it

    def emit(self, record: logging.LogRecord) -> None:
        text = str(record.msg)
        if text.startswith(self.UNWRITABLE):  # said with the temporary folder, the next record
            self.unwritable = f" {record.args[0]}" if record.args else ""
        elif text.startswith(self.TEMPORARY):
            self.say(f"matplotlib cannot write its config folder{self.unwritable}, so it uses a temporary one; set "
                     "MPLCONFIGDIR to a writable folder to give it one")
        else:
            self.say(record.getMessage())


def _main(argv: Optional[Sequence[str]]) -> int:
    try:
        parser = build_parser()  # imports the sub-commands (OpenCV, numpy): long enough to be interrupted in
    except KeyboardInterrupt:
        print("tclip: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with sigterm_as_interrupt(f"tclip {args.command}"), warnings_as_lines(f"tclip {args.command}"):
            refused = _xla_flags_refused()
            if refused is not None:
                raise ValueError(refused)
            with ctrl_c_held():  # a Ctrl-C inside jaxlib's native start-up crashed the interpreter on its way out
                importlib.import_module("jax")
            return args.run(args)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        print(f"tclip {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except USER_ERRORS as err:
        if os.environ.get("TCLIP_TRACEBACK"):
            raise
        print(f"tclip {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: one line, not a traceback, but say so
        if os.environ.get("TCLIP_TRACEBACK"):
            raise
        if _out_of_memory(err):  # not a bug: the run asked for more memory than the machine has
            print(f"tclip {args.command}: error: out of memory ({_one_line(err)[:160]}); "
                  f"{LESS_MEMORY.get(args.command, 'a smaller model or input needs less')}", file=sys.stderr)
            return 2
        backend = _backend_failure()
        if backend is not None:  # not a bug either: the environment names a platform this machine lacks
            print(f"tclip {args.command}: error: {backend}", file=sys.stderr)
            return 2
        print(f"tclip {args.command}: internal error ({type(err).__name__}): {_one_line(err)} "
              "(set TCLIP_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where a Ctrl-C would be, so that a run killed so cleans up as after a Ctrl-C (staged
    folders removed, a checkpoint replaced whole or not at all)."""


class _SigtermWatchdog:
    """While a command runs: a SIGTERM raises `Terminated` in the main thread, and if the process has not ended
    `GRACE_S` seconds later (the main thread blocked in native code, e.g. an XLA computation or a wait on another
    process, runs no Python signal handler) it ends at once with status 143, as an unhandled SIGTERM would. A
    thread learns of the signal from the wakeup fd, which the C-level handler writes even then."""

    GRACE_S = 10.0

    def __init__(self, who: str):
        self.who = who
        self.done = threading.Event()
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.write_end, False)
        self.previous_handler = signal.signal(signal.SIGTERM, self._raise)
        self.previous_fd = signal.set_wakeup_fd(self.write_end)
        threading.Thread(target=self._watch, name="tclip-sigterm", daemon=True).start()

    @staticmethod
    def _raise(signum, frame):
        raise Terminated()

    def _watch(self) -> None:
        while data := os.read(self.read_end, 64):  # b"" once closed
            if self.previous_fd != -1:  # the wakeup fd someone else set (an asyncio loop) still hears its signals
                try:
                    os.write(self.previous_fd, data)
                except OSError:
                    pass
            if signal.SIGTERM in data and not self.done.wait(self.GRACE_S):
                print(f"{self.who}: terminated", file=sys.stderr, flush=True)
                _end_early(143)
        os.close(self.read_end)

    def close(self) -> None:
        self.done.set()
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGTERM, self.previous_handler)
        os.close(self.write_end)  # ends the thread's read


class InterruptRedelivery:
    """An unraisablehook that sends a swallowed Ctrl-C or SIGTERM again. Python drops an exception raised inside
    a garbage-collector callback ("Exception ignored in"), and JAX has one that runs at every collection: a signal
    whose handler ran there was lost and the run went on to the end with status 0. The signal is sent again from
    a thread a moment later, once the collection is over (sent from the hook, its handler would run in the hook,
    whose exceptions are dropped too)."""

    DELAY_S = 0.05

    def __init__(self, previous_hook):
        self.previous_hook = previous_hook
        self.timers: list[threading.Timer] = []
        self.active = True

    def __call__(self, unraisable) -> None:
        if self.active and isinstance(unraisable.exc_value, KeyboardInterrupt):
            number = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
            timer = threading.Timer(self.DELAY_S, os.kill, (os.getpid(), number))
            timer.daemon = True
            timer.start()
            self.timers.append(timer)
        else:
            self.previous_hook(unraisable)

    def close(self) -> None:
        """The command has ended: nothing left to interrupt; still in a chain of hooks, it passes everything on."""
        self.active = False
        for timer in self.timers:
            timer.cancel()


def _out_of_memory(err: BaseException) -> bool:
    """numpy's MemoryError, or XLA's allocation failure (a JaxRuntimeError saying RESOURCE_EXHAUSTED or "Out of
    memory")."""
    text = str(err)
    return isinstance(err, MemoryError) or (type(err).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and (
        "RESOURCE_EXHAUSTED" in text or "Out of memory" in text))


def _backend_failure() -> Optional[str]:
    """What to say where the command failed because JAX cannot start a backend (JAX_PLATFORMS=cuda on a machine
    without CUDA: jax 0.10 raises a bare AssertionError wherever a computation first asks for a device), told by
    asking for the devices again; None where JAX has not been imported or starts."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        jax.devices()
    except Exception as err:
        platforms = os.environ.get("JAX_PLATFORMS")
        if platforms:
            return (f"JAX cannot start the platform JAX_PLATFORMS={platforms!r} names ({_one_line(err)}); unset "
                    "JAX_PLATFORMS, or name one this machine has (e.g. cpu)")
        return f"JAX cannot start a backend ({_one_line(err)}); JAX_PLATFORMS=cpu runs on the CPU"
    return None


# Makes what reads XLA_FLAGS (a CPU client: every XLA flag, the GPU's too, is known to it) and nothing else.
_XLA_FLAGS_PROBE = "from jaxlib import xla_client; xla_client.make_cpu_client()"
# A glog error or fatal line ("F1207 16:29:42.795357 10858 parse_flags_from_env.cc:234] Unknown flag in ...").
_XLA_LOG_LINE = re.compile(r"^[EF]\d{4} [^\]]*\] (.*)$", re.MULTILINE)


def _xla_flags_refused() -> Optional[str]:
    """What to say where XLA would refuse the XLA_FLAGS set (an unknown flag, a value it cannot read), else None.
    XLA reads them as JAX starts its backend and aborts the process from C++ on a bad one (its fatal line, status 1),
    after the command had made its --out folder and lock: so they are tried first, in a child process making only a
    CPU client (about 0.2 s, only where XLA_FLAGS is set, once per value in a process: a test session's or notebook's
    commands). The child's failing for any other reason says nothing of the flags: the command runs as it would
    have."""
    flags = os.environ.get("XLA_FLAGS", "")
    return _xla_refusal(flags) if flags.strip() else None


@functools.lru_cache(maxsize=None)
def _xla_refusal(flags: str) -> Optional[str]:
    try:
        probe = subprocess.run([sys.executable, "-c", _XLA_FLAGS_PROBE], env={**os.environ, "XLA_FLAGS": flags},
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if probe.returncode == 0 or "parse_flags_from_env" not in probe.stderr:
        return None
    said = _XLA_LOG_LINE.search(probe.stderr)  # the first: a value's error line comes before the fatal one
    reason = f" ({said.group(1).strip()})" if said else ""
    # jaxlib's XLA knows no TPU flag: libtpu reads those, from LIBTPU_INIT_ARGS (a TPU VM aborts on them here too)
    tpu = "; TPU flags (--xla_tpu_...) go in LIBTPU_INIT_ARGS" if "--xla_tpu_" in flags else ""
    return f"XLA refuses XLA_FLAGS={flags!r}{reason}{tpu}; correct it or unset XLA_FLAGS"


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())  # spaces inside a line kept
