"""A run's live view on rank 0: a progress bar or periodic lines, and TensorBoard scalars.

Why: a retrain runs for hours; a user wants to see where it is and how the curves move without
reading logs. On a terminal rank 0 shows a tqdm bar over all training steps; elsewhere (a pod's log,
CI, ``nohup``) a bar would be noise, so the trainer's periodic log lines (every ``train.log_every``
steps) are the progress report. TensorBoard scalars go to ``<run dir>/tb`` (``train.tensorboard``):
losses, samples/s, per-epoch validation AUCs and loss, structure-step seconds, test AUCs. Watch them
with ``tensorboard --logdir <train.run_dir>`` (installed with the profiles).

Only rank 0 writes or draws; other ranks hold a disabled monitor, so callers never branch on rank.
Memory: tqdm's state and TensorBoard's event buffer (flushed every few seconds).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class RunMonitor:
    """Progress bar (when stderr is a terminal) and TensorBoard scalars for one training run."""

    def __init__(
        self, run_dir: Path, *, enabled: bool, total_steps: int, desc: str, tensorboard: bool
    ) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._writer: Any = None
        if not enabled:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tb"))
            logger.info("TensorBoard scalars in %s (tensorboard --logdir %s)", run_dir / "tb", run_dir)

    def advance(self, steps: int = 1, postfix: dict[str, float] | None = None) -> None:
        """Moves the bar by ``steps`` (a no-op without a terminal)."""
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def scalars(self, group: str, values: dict[str, float | None], step: int) -> None:
        """``group/name`` scalars at ``step`` (None values are skipped: e.g. a click-only model's AUC)."""
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(f"{group}/{name}", float(value), step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
