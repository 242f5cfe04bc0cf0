"""What a command prints, and the log file that keeps everything.

Every command (``dvp_jax.main``, ``evaluate``, ``convert``, ``benchmark``, ``input.vipriors``)
follows the same rules:

- stderr shows dvp_jax's own messages: a header (what runs, where it writes, the config file
  and overrides, the devices), one progress display per training stage, evaluation results,
  and every warning or error of dvp_jax; results (tables, JSON lines) go to stdout;
- libraries (Orbax, TensorFlow, JAX, absl, clu) and dvp_jax's own detail lines reach the
  console only when ``--verbosity`` asks: -1 their warnings, 0 also INFO, 1 also DEBUG;
  by default only their errors;
- the log file (``WORKDIR/log.txt`` for training) receives everything at INFO and above
  (DEBUG with ``--verbosity>=1``), with timestamps, plus the full config.

Progress: on a terminal a live bar (tqdm) with step, epoch, loss, lr, img/s and ETA; on
anything else (a pipe, a file, a scheduler's log) a plain line at most every
``DVP_JAX_PROGRESS_SECONDS`` seconds (default 20) and at the last step.

TensorFlow's C++ notices (oneDNN, "All log messages before absl::InitializeLog()") bypass
Python and ignore ``TF_CPP_MIN_LOG_LEVEL`` in recent releases: commands that need TensorFlow
call ``import_tensorflow_quietly`` first, which imports it with file descriptor 2 redirected
and moves what it printed into the log file.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from typing import Sequence

from dvp_jax import cli

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONSOLE_LOGGER = "dvp_jax.console"  # Messages meant for the user (header, results, notes).
LOG_FILE_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"

_log = logging.getLogger(CONSOLE_LOGGER)
_configured = False
_console_handler: logging.Handler | None = None
_file_handler: logging.Handler | None = None
_library_level = logging.ERROR
_early_lines: list[str] = []  # Captured before the log file was opened.


def library_level(verbosity: int | None) -> int:
    """Lowest level of library (and dvp_jax detail) records shown on the console.

    verbosity: absl's convention (None = not given -> errors only, -1 warnings, 0 info,
    >= 1 debug).
    """
    if verbosity is None:
        return logging.ERROR
    if verbosity <= -1:
        return logging.WARNING
    return logging.INFO if verbosity == 0 else logging.DEBUG


def _is_console_message(record: logging.LogRecord) -> bool:
    return record.name == CONSOLE_LOGGER or record.name.startswith(CONSOLE_LOGGER + ".")


def _is_ours(record: logging.LogRecord) -> bool:
    return record.name.startswith("dvp_jax") or record.pathname.startswith(PACKAGE_DIR)


class _ConsoleFilter(logging.Filter):
    """User messages at INFO; dvp_jax warnings always; everything else from ``level`` on."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if _is_console_message(record):
            return record.levelno >= logging.INFO
        if _is_ours(record) and record.levelno >= logging.WARNING:
            return True
        return record.levelno >= self.level


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if _is_console_message(record) and record.levelno == logging.INFO:
            return message
        if _is_ours(record):
            return f"{record.levelname.lower()}: {message}"
        source = record.module if record.name == "absl" else record.name  # Orbax logs via absl.
        return f"{record.levelname} {source}: {message}"


class _ConsoleHandler(logging.Handler):
    """Writes to stderr through tqdm, so a live progress bar is redrawn below the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record))
        except Exception:  # pylint: disable=broad-except
            self.handleError(record)


def write(line: str, stream=None) -> None:
    """One line on the console (stderr by default), above any live progress bar."""
    stream = sys.stderr if stream is None else stream
    try:
        from tqdm import tqdm
        tqdm.write(line, file=stream)
    except ImportError:
        print(line, file=stream, flush=True)
    else:
        stream.flush()


def setup(verbosity: int | None = None) -> None:
    """Routes all Python logging through the console rules above (idempotent).

    Removes absl's stderr handler (timestamps and thread ids on every line), captures
    ``warnings.warn`` into logging, and sets ``TF_CPP_MIN_LOG_LEVEL`` unless it is set.
    """
    global _configured, _console_handler, _library_level
    level = _library_level = library_level(verbosity)
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = {logging.ERROR: "2", logging.WARNING: "1"}.get(
            level, "0")
    root = logging.getLogger()
    try:
        from absl import logging as absl_logging
        absl_handler = absl_logging.get_absl_handler()
        if absl_handler in root.handlers:
            root.removeHandler(absl_handler)
        # absl's own logger follows the root level from here on.
        logging.getLogger("absl").setLevel(logging.NOTSET)
    except ImportError:
        pass
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler) and handler.stream in (sys.stderr, sys.stdout):
            root.removeHandler(handler)
    if _console_handler is not None:
        root.removeHandler(_console_handler)
    _console_handler = _ConsoleHandler()
    _console_handler.addFilter(_ConsoleFilter(level))
    _console_handler.setFormatter(_ConsoleFormatter())
    root.addHandler(_console_handler)
    root.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.INFO)
    logging.captureWarnings(True)
    _configured = True


def log_to_file(path: str, title: str = "") -> None:
    """Appends every log record (INFO and above) to ``path``, e.g. WORKDIR/log.txt.

    A rerun (resume) appends below a separator line naming the start time and ``title``.
    """
    global _file_handler
    root = logging.getLogger()
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    _file_handler.setFormatter(logging.Formatter(LOG_FILE_FORMAT))
    root.addHandler(_file_handler)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    file_only(f"==== {now} {title}".rstrip())
    while _early_lines:
        file_only(_early_lines.pop(0))


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its import-time C++ notices moved from stderr to the log file
    (shown as before when ``--verbosity`` >= 0 asked for library INFO)."""
    if "tensorflow" in sys.modules:
        return
    if _library_level <= logging.INFO:
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        return
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace").strip()
    if text:
        message = "TensorFlow at import (stderr):\n" + text
        if _file_handler is not None:
            file_only(message)
        else:
            _early_lines.append(message)


def say(message: str) -> None:
    """A message for the user: the console (stderr) and the log file."""
    if _configured:
        _log.info(message)
    else:  # Used as a library without ``setup``: still visible.
        write(message)


def file_only(message: str) -> None:
    """A line for the log file only (the full config, every progress step, ...)."""
    _log.info(message, extra={"file_only": True})


def header(lines: Sequence[str]) -> None:
    """The run's header: the first line as is, the others indented."""
    for i, line in enumerate(lines):
        say(line if i == 0 else f"  {line}")


def devices_line() -> str:
    """'4 x cpu (TFRT_CPU_0 ...), 1 process' style description of what JAX will use."""
    import jax
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices} - {devices[0].platform})
    processes = jax.process_count()
    return (f"{len(devices)} x {devices[0].platform}" +
            (f" ({', '.join(kinds)})" if kinds else "") +
            f", {processes} process{'es' if processes > 1 else ''}")


# ----------------------------------------------------------------------------- help


def exit_on_help(argv: Sequence[str]) -> None:
    """For the absl apps on the global ``flags.FLAGS`` (main, evaluate): ``--help`` prints the
    usage and exits 0 (absl itself exits 1). The tools parse through ``cli.parse`` instead.

    ``--helpfull`` also lists the flags of every library module.
    """
    args = [a.split("=")[0] for a in argv[1:]]
    if not any(a in cli.HELP_FLAGS for a in args):
        return
    from absl import app
    app.usage(shorthelp="--helpfull" not in args, writeto_stdout=True)
    if "--helpfull" not in args:
        print("\nTry --helpfull to see the flags of every module.")
    sys.exit(0)


# ----------------------------------------------------------------------------- progress


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _number(value: float) -> str:
    """A metric in at most 4 significant digits (0.000758 -> 7.58e-04, 6.3419 -> 6.342)."""
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"


BAR_FORMAT = "{desc}  ETA {remaining} {bar}"  # desc: label, step and metrics (see update).


def progress_interval_s() -> float:
    return float(os.environ.get("DVP_JAX_PROGRESS_SECONDS", "20"))


class Progress:
    """One training stage on the console.

    A terminal (``stream.isatty()``) gets a live tqdm bar; anything else gets a plain line at
    the first update, then at most every ``interval_s`` seconds, and at the last step. Every
    update also goes to the log file with all metrics. ``enabled=False`` (processes other
    than 0) prints nothing.
    """

    def __init__(self, label: str, total_steps: int, start_step: int = 0, *,
                 enabled: bool = True, stream=None, interval_s: float | None = None):
        self.label = label
        self.total = int(total_steps)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval_s = progress_interval_s() if interval_s is None else interval_s
        self._last_line = -float("inf")
        self._bar = None
        if not enabled:
            return
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        if start_step:
            say(f"{label}: resuming from step {start_step}")
        if is_tty:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            try:  # A terminal of unknown width (0 columns) gets 100.
                sized = os.get_terminal_size(self.stream.fileno()).columns > 0
            except (AttributeError, OSError, ValueError):
                sized = False
            # The numbers first; the bar takes what width is left (none on a narrow terminal).
            self._bar = tqdm(total=self.total, initial=int(start_step),
                             desc=f"{label}  step {start_step}/{self.total}",
                             file=self.stream, dynamic_ncols=sized, ncols=None if sized else 100,
                             leave=True, bar_format=BAR_FORMAT)

    def update(self, step: int, *, epoch: float, metrics: dict, steps_per_sec: float,
               images_per_sec: float) -> None:
        """Shows step, epoch, loss, lr, img/s and ETA; logs every metric to the file."""
        if not self.enabled:
            return
        shown = {"epoch": f"{epoch:.2f}"}
        for key in ("loss", "lr"):
            if key in metrics:
                shown[key] = _number(float(metrics[key]))
        shown["img/s"] = f"{images_per_sec:.0f}"
        eta = _format_eta((self.total - step) / max(steps_per_sec, 1e-9))
        file_only(f"{self.label} step {step}/{self.total} epoch {epoch:.2f} " +
                  " ".join(f"{k}={_number(float(v))}" for k, v in sorted(metrics.items())) +
                  f" | {steps_per_sec:.2f} steps/s {images_per_sec:.0f} img/s ETA {eta}")
        if self._bar is not None:
            cells = "  ".join(f"{k} {v}" for k, v in shown.items())
            self._bar.set_description_str(f"{self.label}  step {step}/{self.total}  {cells}",
                                          refresh=False)
            self._bar.update(step - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval_s or step >= self.total:
            self._last_line = now
            cells = "  ".join(f"{k} {v}" for k, v in shown.items())
            write(f"{self.label}  step {step}/{self.total}  {cells}  ETA {eta}", self.stream)

    def note(self, message: str) -> None:
        """A line above the bar (evaluation results), also in the log file."""
        if self.enabled:
            say(f"{self.label}  {message}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
