"""The one place that builds paths inside a run directory (layout in DESIGN.md)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    def stage(self, name: str, round: int = 1) -> Path:
        """`stage1`, `stage2`, `stage3`, `evaluation`; rounds after the first live in `roundN/`."""
        return self.root / name if round <= 1 else self.root / f"round{round}" / name

    @property
    def stage1(self) -> Path:
        return self.stage("stage1")

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"
