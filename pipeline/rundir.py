"""The run directory: its layout, stage completion records, and directory swaps.

A stage writes its output directory under a temporary name and swaps it into
place, then records its completion in ``stages/NAME.json`` with the fingerprint
of its inputs. A stage whose record matches is up to date and is skipped.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.io import read_json, write_json


def temporary_dir(final: Path) -> Path:
    """A fresh, empty sibling of ``final`` to build it in."""
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``, replacing an older ``final`` whole."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def blocks(self) -> Path:
        return self.root / "blocks"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def stage_record(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def completed(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The stage's record if it finished with these inputs, else None."""
        path = self.stage_record(stage)
        if not path.exists():
            return None
        record = read_json(path)
        return record if record.get("fingerprint") == fingerprint else None

    def mark_complete(self, stage: str, fingerprint: str, seconds: float, **facts: Any) -> None:
        self.stage_record(stage).parent.mkdir(parents=True, exist_ok=True)
        write_json({"stage": stage, "fingerprint": fingerprint, "seconds": seconds, **facts},
                   self.stage_record(stage))
