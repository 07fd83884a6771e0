"""Tokenizing batches of examples in worker processes, results in submission order.

Rendering (Jinja, pure Python) and encoding (Rust) both cost CPU per token; one process per
core keeps every core busy while the exporter reads the database and writes shards. Results
are deterministic functions of their batches, so the number of processes never changes a
byte of the output. With one process, batches are tokenized inline.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from app.exports.tokenize import (
    ChatTokenizer,
    Example,
    TokenizeConfig,
    Tokenized,
    load_chat_tokenizer,
    tokenize_examples,
)

_state: dict[str, Any] = {}


def _init(name: str, revision: str | None, config: TokenizeConfig) -> None:
    # One process per core already: the tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _state["chat"] = load_chat_tokenizer(name, revision)
    _state["config"] = config


def _run(batch: Sequence[Example]) -> list[Tokenized]:
    return tokenize_examples(_state["chat"], batch, _state["config"])


class TokenizePool:
    def __init__(
        self,
        chat: ChatTokenizer,
        name: str,
        revision: str | None,
        config: TokenizeConfig,
        processes: int,
    ) -> None:
        self.chat = chat
        self.config = config
        self.processes = processes if processes > 0 else (os.cpu_count() or 1)
        self._executor: ProcessPoolExecutor | None = None
        if self.processes > 1:
            # spawn, not fork: the caller is often a threaded worker (fork would copy its
            # locks mid-use).
            self._executor = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init,
                initargs=(name, revision, config),
            )

    def map(self, batches: Iterable[Sequence[Example]]) -> Iterator[list[Tokenized]]:
        """Tokenize each batch; yields in order, with a bounded number in flight (so memory
        stays flat however many trajectories there are)."""
        if self._executor is None:
            for batch in batches:
                yield tokenize_examples(self.chat, batch, self.config)
            return
        in_flight: deque[Future[list[Tokenized]]] = deque()
        limit = 2 * self.processes
        for batch in batches:
            in_flight.append(self._executor.submit(_run, list(batch)))
            if len(in_flight) >= limit:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
