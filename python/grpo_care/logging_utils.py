"""Metrics to metrics.jsonl (always) and TensorBoard (when installed), completions to completions.jsonl.

Metric names follow TRL's GRPOTrainer: `reward`, `reward_std`, `rewards/<func>/mean`, `rewards/<func>/std`,
`rewards/bonus_rewards`, `clip_ratio`, `kl`, `entropy`, `completions/mean_length`, `frac_reward_zero_std`,
`loss`, `grad_norm`, `learning_rate`; CARE adds `care/bonus_rate` and `care/ref_likelihood`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


class MetricsLogger:
    """One JSON object a line per logged step, mirrored to TensorBoard when `tensorboard` is in report_to."""

    def __init__(self, output_dir: str | Path, report_to: list[str], start_step: int = 0):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.completions_path = self.dir / "completions.jsonl"
        _truncate_after(self.metrics_path, start_step)
        _truncate_after(self.completions_path, start_step)
        self.writer = None
        if "tensorboard" in [r.lower() for r in report_to]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed: metrics go to metrics.jsonl only "
                    "(pip install tensorboard)",
                    stacklevel=2,
                )

    def log(self, step: int, metrics: dict) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_completions(self, step: int, records: list[dict]) -> None:
        with self.completions_path.open("a") as f:
            for record in records:
                f.write(json.dumps({"step": step, **record}) + "\n")
        if self.writer is not None and records:
            text = "\n\n".join(
                f"**reward {r.get('reward')}**: {r.get('completion', '')}" for r in records[:4]
            )
            self.writer.add_text("completions", text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint's step (they will be logged again)."""
    if not path.is_file():
        return
    if step <= 0:
        path.unlink()
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))
