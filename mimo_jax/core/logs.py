"""Console output: the `mimo_jax` logger, verbosity, and progress that suits where stderr goes.

Progress is a tqdm bar when stderr is a terminal (a widget in a notebook). Into a log file or
a pipe a bar writes a carriage-return frame per refresh, hundreds of them, so there it becomes
one plain line every `every_s` seconds instead. Messages go through the `mimo_jax` logger
(plain text on stderr, printed above a live bar), so `--quiet` and `--verbose` are one call to
`set_verbosity`:

- "quiet": only errors from libraries and warnings from mimo_jax; no progress;
- "normal": mimo_jax messages and progress, library warnings;
- "verbose": as normal, plus the INFO logs of jax, Orbax, Grain (absl) and friends.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as _chosen_bar  # what tqdm.auto picked (already imported)
from tqdm.std import tqdm as _console_bar

LOGGER_NAME = "mimo_jax"
PLAIN_EVERY_S = 30.0  # a plain progress line at most this often when stderr is not a terminal
# Loggers of the libraries we drive; Orbax and Grain log through absl.
LIBRARY_LOGGERS = ("absl", "jax", "orbax", "grain")
VERBOSITIES = ("quiet", "normal", "verbose")
_LEVELS = {  # verbosity: (mimo_jax level, library level)
    "quiet": (logging.WARNING, logging.ERROR),
    "normal": (logging.INFO, logging.WARNING),
    "verbose": (logging.INFO, logging.INFO),
}
_verbosity = "normal"
_library_handler: logging.Handler | None = None


class _ConsoleHandler(logging.Handler):
    """Writes the message alone to the current sys.stderr, above any live tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def _library_logger() -> logging.Logger:
    log = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        log.addHandler(_ConsoleHandler())
        log.setLevel(_LEVELS[_verbosity][0])
        log.propagate = False  # printed once, by our handler, whatever the root logger has
    return log


def get_logger() -> logging.Logger:
    """The `mimo_jax` logger (messages print as plain lines on stderr)."""
    return _library_logger()


def info(message: str) -> None:
    """A progress message: shown unless quiet."""
    get_logger().info(message)


def set_verbosity(verbosity: str) -> None:
    """Set how much mimo_jax and the libraries it drives print (see the module docstring)."""
    global _verbosity, _library_handler
    if verbosity not in _LEVELS:
        raise ValueError(f"verbosity must be one of {', '.join(VERBOSITIES)}, got {verbosity!r}")
    _verbosity = verbosity
    ours, theirs = _LEVELS[verbosity]
    get_logger().setLevel(ours)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(theirs)
    root = logging.getLogger()
    if verbosity == "verbose" and not root.handlers:
        # Library INFO records propagate to the root logger, which has no handler by default
        # (Python's last-resort handler prints warnings only).
        _library_handler = logging.StreamHandler()
        _library_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(_library_handler)
    elif verbosity != "verbose" and _library_handler is not None:
        root.removeHandler(_library_handler)
        _library_handler = None


def verbosity() -> str:
    return _verbosity


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def bars_fit() -> bool:
    """Whether progress bars render: stderr is a terminal, or this is a notebook (widgets)."""
    return stderr_is_tty() or _chosen_bar is not _console_bar


class Ticker:
    """True from `due()` once `every_s` seconds have passed since the last `reset()`."""

    def __init__(self, every_s: float = PLAIN_EVERY_S):
        self.every_s = every_s
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def reset(self) -> None:
        self._last = time.monotonic()


class Progress:
    """Progress of a long task: a tqdm bar on a terminal, else a plain line every `every_s`.

    `plain=False` prints no plain lines (for callers that print their own periodic summary);
    `live` says whether a bar is showing. Disabled entirely when `enabled` is false or the
    verbosity is quiet.
    """

    def __init__(self, total: float | None = None, *, desc: str, unit: str = "it",
                 initial: int = 0, unit_scale: bool = False, enabled: bool = True,
                 plain: bool = True, every_s: float = PLAIN_EVERY_S):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.unit_scale = unit_scale
        self.n = initial
        self.postfix = ""
        self.enabled = enabled and get_logger().isEnabledFor(logging.INFO)
        self.plain = plain
        self._t0 = time.monotonic()
        self._ticker = Ticker(every_s)
        self._printed = False
        self._bar = None
        if self.enabled and bars_fit():
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000,
                             dynamic_ncols=True, smoothing=0.1, file=sys.stderr)

    @property
    def live(self) -> bool:
        return self._bar is not None

    def update(self, n: float = 1) -> None:
        self.set(self.n + n)

    def set(self, n: float, postfix: str | None = None) -> None:
        """Move to `n` (absolute), optionally with a new postfix such as "loss=2.31"."""
        delta, self.n = n - self.n, n
        if postfix is not None:
            self.postfix = postfix
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(delta)  # redraws at most every tqdm.mininterval
        elif self.enabled and self.plain and self._ticker.due():
            self._say()

    def line(self) -> str:
        """The plain progress line, e.g. `hf-to-orbax: 17% 1.2M/7.1M [00:12<01:01, 100kB/s]`."""
        fmt = "{desc}: " + ("{percentage:3.0f}% " if self.total else "")
        fmt += "{n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        return tqdm.format_meter(
            self.n, self.total, time.monotonic() - self._t0, prefix=self.desc, unit=self.unit,
            unit_scale=self.unit_scale, unit_divisor=1024 if self.unit_scale else 1000,
            bar_format=fmt, postfix=self.postfix or None, initial=self.initial)

    def _say(self) -> None:
        info(self.line())
        self._ticker.reset()
        self._printed = True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._printed:  # a log that showed the task under way also shows it finished
            self._say()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
