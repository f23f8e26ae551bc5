"""Where progress goes: a live bar on a terminal, plain lines otherwise, and every line to ``--log-file``.

A serial console or a fleet tool's log (journald drops what passes 10,000 lines in 30 s by default) gets one
plain line per event and one per layer committed, numbered ``N/M``, and a summary with the rate and the ETA at
most every ``SUMMARY_EVERY`` seconds; a person at a terminal gets one bar (layers done of total, files per
second, ETA, current step), cut to the terminal's width, with the events printed above it.  The log file gets
every line and every layer step with a timestamp, whatever the terminal shows, and keeps the error that ended
a run.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Dict, Optional, TextIO

from migrations_state.machine import COMMITTED, LINKED
from migrator import interrupts
from migrator.errors import EXIT_USAGE, MigratorError

BAR_WIDTH = 24
REDRAW_EVERY = 0.1  # seconds
SUMMARY_EVERY = 10.0  # seconds, at least, between two summary lines without a terminal
MIB = 1 << 20


class Reporter:
    """Callable with an event line; ``step`` for a layer step done.  Use as a context manager so a failure
    is logged and the bar's line is ended."""

    def __init__(self, quiet: bool = False, log_file: Optional[str] = None, stream: Optional[TextIO] = None,
                 ) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bar = not quiet and self.stream.isatty()
        self.log = None
        if log_file:
            try:
                fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise MigratorError(f"--log-file {log_file}: {exc.strerror}", EXIT_USAGE) from exc
            self.log = os.fdopen(fd, "a", buffering=1)
        self.started = time.monotonic()
        self.layers = self.done_layers = self.entries = self.done_entries = 0
        self.current = ""
        self._drawn = 0.0
        self.byte_total = self.done_bytes = 0
        self._layer_entries: Dict[str, int] = {}  # the entries each layer not yet committed linked
        self._summarized = time.monotonic()

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, kind, exc, _tb) -> None:
        if isinstance(exc, interrupts.Stopped):
            self._log(f"stopped by {exc.args[0]} at a safe point")
        elif exc is not None and not isinstance(exc, KeyboardInterrupt):
            self._log(f"error: {' '.join(str(exc).split())}")
        elif kind is KeyboardInterrupt:
            self._log("interrupted")
        self.close()

    def __call__(self, msg: str) -> None:
        interrupts.check()
        self._log(msg)
        if self.quiet:
            return
        if self.bar:
            self.stream.write(f"\r\033[K{msg}\n")
            self._draw(force=True)
        else:
            self.stream.write(f"aufs2overlay: {msg}\n")
        self.stream.flush()

    def elapsed(self) -> float:
        """Seconds since this reporter began (or since ``start``)."""
        return time.monotonic() - self.started

    def start(self, layers: int, entries: int, done_layers: int = 0, done_entries: int = 0) -> None:
        """The work ahead: ``layers`` in all (``done_layers`` of them already done), ``entries`` to walk."""
        self.layers, self.entries = layers, entries
        self.done_layers, self.done_entries = done_layers, done_entries
        self.started = self._summarized = time.monotonic()
        self._draw(force=True)

    def start_bytes(self, total: int, layers: int) -> None:
        """A bar in bytes (the content proof): ``total`` bytes over ``layers`` layers."""
        self.byte_total, self.done_bytes, self.layers, self.done_layers = total, 0, layers, 0
        self.started = time.monotonic()
        self._draw(force=True)

    def advance_bytes(self, done: int) -> None:
        interrupts.check()
        self.done_bytes = done
        self._draw()

    def layer_checked(self, what: str) -> None:
        """One more layer checked (``verify``): the bar on a terminal; otherwise ``what: N/M layers`` at most
        every ``SUMMARY_EVERY`` seconds, and once at the end."""
        interrupts.check()
        self.done_layers += 1
        self.current = what
        if self.quiet:
            return
        if self.bar:
            self._draw(force=self.done_layers == self.layers)
            return
        now = time.monotonic()
        if now - self._summarized >= SUMMARY_EVERY or self.done_layers == self.layers:
            self._summarized = now
            self.stream.write(f"aufs2overlay: {what}: {self.done_layers}/{self.layers} layers\n")
            self.stream.flush()

    def layer_done(self, text: str) -> None:
        """One layer's result line, above the bar (and in the log)."""
        self.done_layers += 1
        self(text)

    def step(self, layer_id: str, state: str, entries: Optional[int], seconds: float) -> None:
        """One layer step done (recorded: a safe point to stop at)."""
        interrupts.check()
        detail = f"{entries} entries, {seconds:.2f}s" if entries is not None else f"{seconds:.2f}s"
        self._log(f"layer {layer_id} {state} ({detail})")
        if state == LINKED and entries:
            self.done_entries += entries
        linked = self._layer_entries.pop(layer_id, 0)
        if state == LINKED:
            linked += entries or 0
        if state == COMMITTED:
            self.done_layers += 1
        else:
            self._layer_entries[layer_id] = linked
        self.current = f"{state} {layer_id[:12]}"
        if self.quiet:
            return
        if self.bar:
            self._draw(force=self.done_layers == self.layers)
            if self.done_layers == self.layers:  # the layers are done: end the bar, later events are lines
                self.stream.write("\n")
                self.layers = 0
                self._drawn = 0.0
        elif state == COMMITTED:
            self.stream.write(f"aufs2overlay: layer {layer_id} committed ({self.done_layers}/{self.layers}, "
                              f"{linked} entries)\n")
            now = time.monotonic()
            if now - self._summarized >= SUMMARY_EVERY and self.done_layers < self.layers:
                self._summarized = now
                self.stream.write(f"aufs2overlay: converting: {self._summary(now)}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar and self._drawn:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0.0
        if self.log is not None:
            self.log.close()
            self.log = None

    def _draw(self, force: bool = False) -> None:
        if not self.bar or not self.layers:
            return
        now = time.monotonic()
        if not force and now - self._drawn < REDRAW_EVERY:
            return
        self._drawn = now
        if self.byte_total:
            self._draw_bytes(now)
            return
        filled = BAR_WIDTH * self.done_layers // max(1, self.layers)
        self._write_bar(f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {self._summary(now)}  {self.current}")

    def _summary(self, now: float) -> str:
        """``N/M layers  R files/s  ETA m:ss``: the bar's text, and the plain summary line's."""
        elapsed = max(now - self.started, 1e-6)
        rate = self.done_entries / elapsed
        if self.entries and rate > 0:
            seconds: Optional[float] = max(0, self.entries - self.done_entries) / rate
        elif not self.entries and self.done_layers:  # entries not counted beforehand: by layers
            seconds = elapsed / self.done_layers * (self.layers - self.done_layers)
        else:
            seconds = None
        eta = "ETA -:--" if seconds is None else f"ETA {int(seconds) // 60}:{int(seconds) % 60:02d}"
        return f"{self.done_layers}/{self.layers} layers  {rate:,.0f} files/s  {eta}"

    def _write_bar(self, text: str) -> None:
        """Redraw the bar in place, cut to the terminal's width: a wrapped bar leaves a stale line per redraw."""
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 0
        self.stream.write(f"\r\033[K{text[:width - 1] if width > 1 else text}")  # 0: the size is unknown
        self.stream.flush()

    def _draw_bytes(self, now: float) -> None:
        filled = BAR_WIDTH * min(self.done_bytes, self.byte_total) // max(1, self.byte_total)
        rate = self.done_bytes / max(now - self.started, 1e-6)
        seconds = max(0, self.byte_total - self.done_bytes) / rate if rate > 0 else None
        eta = "ETA -:--" if seconds is None else f"ETA {int(seconds) // 60}:{int(seconds) % 60:02d}"
        self._write_bar(f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {self.done_bytes / MIB:,.1f}/"
                        f"{self.byte_total / MIB:,.1f} MiB  {rate / MIB:,.0f} MiB/s  {eta}  "
                        f"{self.done_layers}/{self.layers} layers")

    def _log(self, msg: str) -> None:
        if self.log is not None:
            stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
            self.log.write(f"{stamp} {msg}\n")
