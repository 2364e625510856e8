"""The step protocol of the cleaning stage.

Steps are datatrove ``PipelineStep`` objects: each has a single ``run`` that consumes and yields
documents, so the same objects run under datatrove's executors and inside Apache Beam DoFns.

A rejected document is not dropped on the floor: the step marks it (stage, filter, reason) and
passes it on; later steps let marked documents through untouched, and the shard writer puts them
in the rejects file with their original record. Nothing read is ever silently lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

REJECT = "_reject"
ORIGINAL = "_original"


def reject(doc: Document, step: str, reason: str) -> None:
    doc.metadata[REJECT] = {"step": step, "reason": reason}


def is_rejected(doc: Document) -> bool:
    return REJECT in doc.metadata


class DocFilter(PipelineStep):
    """A filter over kept documents of some languages.

    Subclasses set ``name`` and ``languages`` and implement :meth:`check`, returning ``None`` to
    keep the document or a short reason to reject it. A filter may also edit ``doc.text`` (C4 and
    recurring-text removal cut lines out).
    """

    type = "🧹 skymoe"
    name = "filter"
    languages: tuple[str, ...] = ("en", "zh")

    def check(self, doc: Document) -> str | None:
        raise NotImplementedError

    def run(self, data: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in data:
            if is_rejected(doc) or doc.metadata.get("lang") not in self.languages:
                yield doc
                continue
            with self.track_time():
                reason = self.check(doc)
            if reason is None:
                self.stat_update("kept")
            else:
                reject(doc, self.name, reason)
                self.stat_update(f"dropped_{reason}")
            yield doc
