"""What one training run is, as plain JSON: the stage writes it, every DeepSpeed rank reads it.

Kept free of torch so the stage (and the CLI) can plan runs without importing the training stack.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class RunInit:
    """Where a run's weights start: ``random`` (seeded), ``weights`` (a skymoe weights folder,
    e.g. an imported Llama) or ``upcycle`` (a dense weights folder copied into every expert)."""

    kind: Literal["random", "weights", "upcycle"]
    uri: str | None = None


@dataclass(frozen=True)
class RunSpec:
    name: str
    run_uri: str
    tokens_uri: str
    model: dict[str, Any]  # ModelArgs fields
    init: RunInit
    phase: dict[str, Any]  # PhaseConfig
    train: dict[str, Any]  # TrainConfig (batching, aux loss, parallelism, intervals)
    storage: dict[str, Any]  # StorageConfig.s3 (endpoint, region; never credentials)
    local_dir: str  # this machine's scratch folder for DeepSpeed's checkpoint files
    # Checkpoints at multiples of this step are never deleted: the evaluate stage reads them after the run.
    protect_every_steps: int | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> "RunSpec":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunSpec":
        """Fields with defaults may be absent: a spec written before they existed still reads."""
        return cls(**{**raw, "init": RunInit(**raw["init"])})
