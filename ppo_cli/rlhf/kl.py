"""KL coefficient controllers and the adaptive controller's horizon for a run."""

from __future__ import annotations


class FixedKLController:
    """Constant KL coefficient ``beta``.

    ``value`` is the coefficient; ``update`` does nothing. ``state_dict`` is ``{"value": float}``.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        """Plain, JSON-serialisable state: ``{"value": beta}``."""
        return {"value": float(self.value)}

    def load_state_dict(self, d: dict[str, float]) -> None:
        """Restore ``value`` from :meth:`state_dict`."""
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of [Ziegler19] (section 2.2), a proportional controller.

    After each PPO batch with measured KL ``KL`` (sequence-level, summed over tokens, averaged over the
    batch) over ``n_steps`` samples::

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    so ``beta`` grows when the policy drifts further than ``target`` nats from the reference and
    shrinks when it stays closer. The clip bounds how fast ``beta`` can move per step whatever the
    measured KL. ``state_dict`` holds plain floats (``value``, ``target``, ``horizon``).
    """

    def __init__(self, init_kl_coef: float, target: float = 6.0, horizon: float = 10000) -> None:
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` by the factor ``1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, float]:
        """Plain, JSON-serialisable state: ``{"value", "target", "horizon"}``."""
        return {"value": float(self.value), "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict[str, float]) -> None:
        """Restore ``value`` from :meth:`state_dict`; ``target`` and ``horizon`` stay as constructed.

        Why: a resumed run builds its controller from its own config and length, and those are what the
        user asks for now. The horizon is a share of the run's episodes (:func:`run_kl_horizon`), so a
        run resumed with a longer ``train.max_steps`` needs the longer run's horizon, not the saved one;
        the target follows the config for the same reason. The saved pair stays in the state as a record.
        """
        self.value = float(d["value"])


def run_kl_horizon(total_episodes: int, episodes_per_step: int, share: float = 0.1) -> float:
    """The adaptive controller's horizon for a run: ``share`` of its episodes, at least two steps' worth.

    Formula: ``horizon = max(share * total_episodes, 2 * episodes_per_step)`` (a tenth by default).

    Why a share of the run: a KL held on one side of the target moves beta by up to
    ``(1 +- 0.2 n / horizon)^(N / n)``, about ``exp(+-0.2 N / horizon)``, over a run of N episodes.
    [Ziegler19]'s 10,000 episodes suit runs of ~10^5 episodes (beta can move by e^2, and a tenth of 10^5
    is that horizon); in a run of 2,560 they allow a factor of 1.05 at most, so the controller never
    binds. A tenth of the run gives any run the same reach, e^(+-2). Why the floor: the factor
    ``1 + e n / horizon`` must stay positive; two steps' worth keeps each step's change within +-10%.
    """
    if total_episodes <= 0 or episodes_per_step <= 0:
        raise ValueError(f"episodes must be > 0, got {total_episodes} in all, {episodes_per_step} per step")
    return max(share * float(total_episodes), 2.0 * episodes_per_step)
