"""What training records as it goes: a row of ``metrics.jsonl`` per epoch, and the loop's state that a
checkpoint's ``state.json`` keeps so that a resumed run goes on exactly where it stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class EpochReport:
    """One epoch: its training RMSE (as the pass met it), validation RMSE, step size and wall time."""

    epoch: int
    train_rmse: float
    val_rmse: float | None
    lr: float
    seconds: float
    ratings_per_second: float

    def row(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_rmse": self.train_rmse, "val_rmse": self.val_rmse, "lr": self.lr,
                "seconds": round(self.seconds, 4), "ratings_per_second": round(self.ratings_per_second, 1)}


@dataclass(frozen=True)
class LoopState:
    """The epoch loop after epoch ``epoch``: the next step size (and the ``train.lr`` it came from), the
    rollbacks so far, the training RMSE that counts as divergence, every epoch's report, and the best epoch
    by validation RMSE."""

    epoch: int
    lr: float
    train_lr: float
    rollbacks: int
    exploded_at: float
    history: tuple[EpochReport, ...]
    best_epoch: int | None = None
    best_val: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "history": [asdict(report) for report in self.history]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        """The state as ``state.json`` holds it; ``KeyError`` or ``TypeError`` when a field is missing or
        unknown."""
        return cls(**{**data, "history": tuple(EpochReport(**report) for report in data["history"])})
