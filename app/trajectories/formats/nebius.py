"""Placeholder importer, replaced by the real one."""

from __future__ import annotations

from app.trajectories.formats.base import Document, Trajectory


class _Importer:
    name = "nebius"

    def sniff(self, doc: Document) -> str | None:
        return "not implemented"

    def parse(self, doc: Document) -> list[Trajectory]:
        raise NotImplementedError


IMPORTER = _Importer()
