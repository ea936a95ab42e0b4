"""Progress bars for the client's stages (tqdm on stderr)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "kernel") -> Any:
    """A tqdm bar named ``desc`` from ``initial`` of ``total`` tiles (disabled: a no-op bar)."""
    # tqdm.auto picks a notebook widget in Jupyter (and warns there when ipywidgets is
    # missing, even for a disabled bar): only import it when a bar is wanted.
    if enabled:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="tile",
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )
