"""Progress of the client's stages on stderr: tqdm bars on a terminal (or in a notebook), one
line per stage elsewhere (a log file, a batch job's output, a pipe), where a bar would write a
line per update."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["StageLine", "progress_bar", "wants_bars"]


def wants_bars(stream: Any = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) shows bars: a terminal, or a Jupyter
    kernel's output (not a TTY, but tqdm.auto draws a widget there)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and hasattr(ip, "kernel")


class StageLine:
    """Counts like a tqdm bar, and on :meth:`close` writes one line: what this run did, e.g.
    ``kernel: 45 tiles in 12.3 s (10 already done, 55 in all)``."""

    def __init__(self, total: int, initial: int, desc: str, unit: str, stream: Any):
        self.total, self.initial, self.n = total, initial, initial
        self.desc, self.unit, self.stream = desc, unit, stream
        self.start = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        done = self.n - self.initial
        text = f"{self.desc}: {done} {self.unit}{'' if done == 1 else 's'} in "
        text += f"{time.perf_counter() - self.start:.1f} s"
        if self.initial:
            text += f" ({self.initial} already done, {self.total} in all)"
        elif self.n < self.total:
            text += f" ({self.total} in all)"
        print(text, file=self.stream, flush=True)


def progress_bar(
    total: int, initial: int, enabled: bool, desc: str = "kernel", unit: str = "tile"
) -> Any:
    """Progress of ``desc`` from ``initial`` of ``total`` ``unit``s: a tqdm bar where stderr
    shows bars (:func:`wants_bars`), else a :class:`StageLine`; a no-op bar when not
    ``enabled``."""
    if enabled and not wants_bars():
        return StageLine(total, initial, desc, unit, sys.stderr)
    # tqdm.auto picks a notebook widget in Jupyter (and warns there when ipywidgets is
    # missing, even for a disabled bar): only import it when a bar is wanted.
    if enabled:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit=unit,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )
