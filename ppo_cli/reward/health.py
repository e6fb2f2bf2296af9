"""Is the reward model any good? Held-out pair accuracy with its uncertainty, said plainly.

A reward model near chance is the usual start of reward hacking: PPO then optimises noise plus whatever
shallow feature the RM picked up (length, never stopping). Accuracy on a few held-out pairs is itself noisy
(on 10 pairs anything from 0.3 to 0.9 is chance-compatible), so the report carries a 95% interval and the
verdict reads the interval, not the point estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959964  # two-sided 95% normal quantile
# The training loss "has not moved" when its late mean is within this of log 2 (a constant score pair).
LOSS_AT_CHANCE_TOLERANCE = 0.01


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (well behaved at small n and near 0 or 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class RMHealth:
    accuracy: float | None  # held-out pair accuracy (ties count half); None without held-out pairs
    pairs: int  # held-out pairs it was measured on
    late_train_loss: float | None = None  # mean training loss over the last part of the run

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.accuracy is None:
            return None
        return wilson_interval(self.accuracy * self.pairs, self.pairs)

    @property
    def at_chance(self) -> bool:
        """The 95% interval of the held-out accuracy includes 0.5 (or the loss never left log 2)."""
        interval = self.interval
        if interval is not None and interval[0] <= 0.5:
            return True
        return self.loss_did_not_move

    @property
    def loss_did_not_move(self) -> bool:
        return (
            self.late_train_loss is not None
            and abs(self.late_train_loss - math.log(2)) < LOSS_AT_CHANCE_TOLERANCE
        )

    def describe(self) -> str:
        if self.accuracy is None:
            return "no held-out pairs (set data.eval or data.eval_fraction to measure accuracy)"
        low, high = self.interval
        return f"held-out accuracy {self.accuracy:.3f} (95% CI {low:.2f}-{high:.2f}, {self.pairs} pairs)"

    def warnings(self) -> list[str]:
        said = []
        if self.loss_did_not_move:
            said.append(
                f"the training loss stayed at log 2 = 0.693 (late mean {self.late_train_loss:.4f}): the reward "
                "model learned nothing; raise train.lr or train.max_steps, or check that chosen and rejected "
                "differ."
            )
        interval = self.interval
        if interval is not None and interval[0] <= 0.5:
            if self.pairs < 100:
                said.append(
                    f"{self.describe()}: too few pairs to tell it from chance; pass more held-out pairs "
                    "(data.eval, or a larger data.eval_fraction)."
                )
            else:
                said.append(
                    f"{self.describe()}: not distinguishable from chance. PPO against this reward model "
                    "would optimise noise (and learn to exploit it); train longer or on more pairs first."
                )
        return said

    def as_info(self) -> dict:
        """The fields stored in final/ppo_cli.json."""
        interval = self.interval
        return {
            "eval_accuracy": self.accuracy,
            "eval_accuracy_ci95": list(interval) if interval else None,
            "eval_pairs": self.pairs,
            "late_train_loss": self.late_train_loss,
        }

    @classmethod
    def from_info(cls, info: dict) -> RMHealth | None:
        """The health stored by train-rm in final/ppo_cli.json (None for RMs from elsewhere)."""
        if "eval_pairs" not in info:
            return None
        return cls(info.get("eval_accuracy"), int(info["eval_pairs"]), info.get("late_train_loss"))
