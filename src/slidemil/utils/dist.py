"""Where this process stands under torchrun (RANK, WORLD_SIZE, the run id every rank shares), and the
wait of one rank for files another rank writes. Ranks coordinate through files in the output folder,
so no process group (and no port) is needed for work that splits into independent pieces."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launch_id() -> str:
    """The id torchrun gives all ranks of one launch ("none" outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "none")


def wait_for(paths: list[Path], what: str, poll: float = 2.0, ready=None) -> None:
    """Block until every path exists (and `ready(path)` holds, when given); a rank that dies makes
    torchrun stop the others, so this never waits for a crashed rank."""
    def ok(p: Path) -> bool:
        return p.is_file() and (ready is None or ready(p))

    while not all(ok(p) for p in paths):
        log.info("waiting for %d %s of other ranks", sum(not ok(p) for p in paths), what)
        time.sleep(poll)
