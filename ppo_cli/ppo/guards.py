"""PPO's runtime guards: the signs that a run is going wrong, said in the console with the knob to turn.

PPO fails quietly. The policy can learn to exploit the reward (never stop, repeat a phrase the reward model
likes) while `objective/scores` keeps rising, or generation and scoring can disagree so that every number
is biased. Each guard below watches one such sign in the step's metrics and the batch's samples. A guard
speaks once when its sign appears and again only after it has cleared, so the console is not flooded.
A sign that one batch shows by chance needs more evidence: the EOS collapse compares the first EOS_WINDOW
steps with the last EOS_WINDOW (a fall by half, beyond chance), so a barely trained policy whose second
batch happens to stop less often is not called a reward hacker.

The statistics are pure functions (`distinct_n`, `kl_t_statistic`, `eos_fall_z`); `PPOGuards.check` turns them into
warnings and returns them, so tests need no trainer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# A ratio outside this band means an update moved the policy far from where the rollout sampled it.
RATIO_BAND = (0.5, 2.0)
# Negative KL: the batch mean must be this many standard errors below 0 ...
KL_T_ALARM = -3.0
# ... for this many steps in a row (k1 is noisy around 0 at a small learning rate).
KL_NEGATIVE_STEPS = 3
# EOS collapse: the share of responses that end with EOS, over the last EOS_WINDOW steps, fell below this
# fraction of the share over the first EOS_WINDOW steps ...
EOS_COLLAPSE_FRACTION = 0.5
# ... the windows not overlapping: one batch of an untrained or barely trained policy stops (or not) by
# chance, and a small batch's share jumps by a whole response ...
EOS_WINDOW = 3
# ... and the fall is this many binomial standard errors below the first window's share: chance alone
# rarely goes that far.
EOS_Z_ALARM = -3.0
# Responses pinned at the cap: at least this share ends exactly at max_new_tokens ...
PINNED_SHARE = 0.9
# Degeneration: distinct-2 of the batch fell below this fraction of the first batch's ...
DISTINCT_COLLAPSE_FRACTION = 0.6
# ... while the (normalised) score rose by at least this much since the first batch.
SCORE_RISE = 0.5


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n of a batch: unique word n-grams / all word n-grams (1.0 when there are none).

    Repetitive text (the usual form of reward hacking on small models: "good good good") drives it down.
    """
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 1.0


def kl_t_statistic(kl_per_sequence: Sequence[float]) -> float:
    """The batch-mean KL in standard errors: mean / (std / sqrt(n)); 0 for fewer than two sequences.

    k1 = log pi - log pi_ref is an unbiased but noisy estimate of a KL that cannot be negative: a mean a few
    standard errors below 0 is a real disagreement between generation and scoring, not noise.
    """
    values = [float(v) for v in kl_per_sequence]
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    if var == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / math.sqrt(var / n)


def eos_fall_z(first: tuple[int, int], recent: tuple[int, int]) -> float:
    """How far the recent share of responses that end with EOS fell below the first one, in binomial
    standard errors of the recent window: (ended - n p0) / sqrt(n p0 (1 - p0)), with (ended, n) the
    recent window's counts and p0 the first window's share. -inf for any fall from p0 = 1."""
    ended, n = recent
    p0 = first[0] / first[1] if first[1] else 0.0
    expected = n * p0
    if ended >= expected:
        return 0.0
    spread = math.sqrt(n * p0 * (1 - p0))
    return -math.inf if spread == 0 else (ended - expected) / spread


def eos_knob(missing_eos_penalty: float | None, missing_eos_score: float | None) -> str:
    """The setting that makes a response that never ends cost more, under the active rule."""
    if missing_eos_penalty is not None:
        return "raise ppo.missing_eos_penalty"
    if missing_eos_score is not None:
        return "lower ppo.missing_eos_score"
    return "set ppo.missing_eos_score, e.g. -1"


@dataclass
class BatchSigns:
    """What the guards read from one step, beyond its metrics."""

    kl_per_sequence: Sequence[float]
    completions: Sequence[str]
    eos_share: float  # share of responses that ended with EOS
    capped_share: float  # share of responses exactly max_new_tokens long


@dataclass
class PPOGuards:
    max_new_tokens: int
    kl_warn: float | None  # nats per sequence; None = no KL ceiling warning
    # What to turn when responses stop ending (eos_knob of the run's ppo.missing_eos_* settings).
    eos_knob: str = "lower ppo.missing_eos_score"
    first: dict[str, float] = field(default_factory=dict)  # the first batch's eos share, distinct-2, score
    negative_kl_streak: int = 0
    # (responses that ended with EOS, responses) of each of the first EOS_WINDOW steps, and of the last.
    eos_first: list[tuple[int, int]] = field(default_factory=list)
    eos_recent: list[tuple[int, int]] = field(default_factory=list)
    active: set[str] = field(default_factory=set)

    def check(self, step: int, metrics: dict[str, float], signs: BatchSigns) -> list[str]:
        distinct = distinct_n(signs.completions, 2)
        score = metrics.get("objective/scores_normalized", metrics.get("objective/scores", 0.0))
        if not self.first:
            self.first = {"eos_share": signs.eos_share, "distinct_2": distinct, "score": score}
        self._count_eos(signs)
        t = kl_t_statistic(signs.kl_per_sequence)
        self.negative_kl_streak = self.negative_kl_streak + 1 if t < KL_T_ALARM else 0
        kl = metrics.get("objective/kl", 0.0)
        ratio = metrics.get("val/ratio", 1.0)
        conditions = {
            "ratio": (
                not RATIO_BAND[0] <= ratio <= RATIO_BAND[1],
                f"step {step}: val/ratio={ratio:.3f} left [{RATIO_BAND[0]}, {RATIO_BAND[1]}]: updates are too "
                "large (lower train.lr or ppo.epochs, or raise ppo.num_minibatches).",
            ),
            "negative_kl": (
                self.negative_kl_streak >= KL_NEGATIVE_STEPS,
                f"step {step}: objective/kl={kl:.3f} has been significantly negative for "
                f"{self.negative_kl_streak} steps: generation and scoring disagree (check "
                "generation.temperature and the model's padding; see docs/ppo-details.md, detail 19).",
            ),
            "kl_ceiling": (
                self.kl_warn is not None and kl > self.kl_warn,
                f"step {step}: objective/kl={kl:.1f} nats exceeds {self.kl_warn:g}: the policy has drifted far "
                "from the SFT policy, where reward models stop being reliable (raise ppo.kl_coef, use "
                "ppo.kl_controller=adaptive with a lower ppo.kl_target, or lower train.lr).",
            )
            if self.kl_warn is not None
            else (False, ""),
            "eos_collapse": self._eos_collapse(step),
            "pinned": (
                signs.capped_share >= PINNED_SHARE and self.first["eos_share"] > 1 - PINNED_SHARE,
                f"step {step}: {signs.capped_share:.0%} of responses are cut at generation.max_new_tokens="
                f"{self.max_new_tokens} (raise it if answers need the room, else {self.eos_knob}).",
            ),
            "degenerate": (
                distinct < DISTINCT_COLLAPSE_FRACTION * self.first["distinct_2"]
                and score - self.first["score"] >= SCORE_RISE,
                f"step {step}: scores rise while the samples repeat themselves (distinct-2 {distinct:.2f}, "
                f"first batch {self.first['distinct_2']:.2f}): the policy may be exploiting the reward "
                "(raise ppo.kl_coef or lower train.lr; look at the samples table).",
            ),
        }
        warnings = []
        for name, (firing, message) in conditions.items():
            if firing and name not in self.active:
                warnings.append(message)
            (self.active.add if firing else self.active.discard)(name)
        return warnings

    def _count_eos(self, signs: BatchSigns) -> None:
        n = len(signs.completions)
        counts = (round(signs.eos_share * n), n)
        if len(self.eos_first) < EOS_WINDOW:
            self.eos_first.append(counts)
        self.eos_recent = [*self.eos_recent, counts][-EOS_WINDOW:]

    def _eos_collapse(self, step: int) -> tuple[bool, str]:
        """Fewer responses end with EOS over the last EOS_WINDOW steps than over the first EOS_WINDOW
        (the two windows apart): by half and by more than chance explains (EOS_Z_ALARM)."""
        if step < 2 * EOS_WINDOW or len(self.eos_first) < EOS_WINDOW:
            return False, ""
        first = tuple(map(sum, zip(*self.eos_first)))
        recent = tuple(map(sum, zip(*self.eos_recent)))
        share_first, share_recent = first[0] / max(first[1], 1), recent[0] / max(recent[1], 1)
        firing = (
            share_recent < EOS_COLLAPSE_FRACTION * share_first and eos_fall_z(first, recent) < EOS_Z_ALARM
        )
        return firing, (
            f"step {step}: only {share_recent:.0%} of responses end with EOS over the last {EOS_WINDOW} "
            f"steps (first {EOS_WINDOW} steps: {share_first:.0%}): the policy is learning not to stop, a "
            f"common reward hack ({self.eos_knob}, or raise ppo.kl_coef)."
        )

    def state_dict(self) -> dict:
        return {
            "first": dict(self.first),
            "negative_kl_streak": self.negative_kl_streak,
            "eos_first": [list(c) for c in self.eos_first],
            "eos_recent": [list(c) for c in self.eos_recent],
        }

    def load_state_dict(self, state: dict) -> None:
        self.first = dict(state.get("first", {}))
        self.negative_kl_streak = int(state.get("negative_kl_streak", 0))
        # Checkpoints from before the windows have none: they fill again from the resumed step.
        self.eos_first = [tuple(c) for c in state.get("eos_first", [])]
        self.eos_recent = [tuple(c) for c in state.get("eos_recent", [])]
