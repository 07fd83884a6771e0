"""`python -m tests.exports.slow_parts worker ...`: `srft worker` whose export parts read
their trajectories slowly (SLOW_PART_S before each batch), so that a test can kill it while
it is in the middle of a part. Only the reading is slowed: what it builds is unchanged."""

from __future__ import annotations

import time
from typing import Any

from app.exports import service

SLOW_PART_S = 4.0
_load_sources = service.load_sources


def _slow_load_sources(*args: Any, **kwargs: Any) -> Any:
    time.sleep(SLOW_PART_S)
    return _load_sources(*args, **kwargs)


service.load_sources = _slow_load_sources

if __name__ == "__main__":
    from app.cli import main

    main()
