"""The hindsight oracle: the upper bound that learned policies are compared with, and the source of their labels."""

from __future__ import annotations

from cache_core.actions import actions_from_start, oracle_start_layer, start_from_actions
from cache_core.cache import RefreshPlan
from cache_core.features import StepFeatures
from cache_core.policy import ReusePolicy, StepContext
from cache_core.registry import register_policy


@register_policy
class OraclePolicy(ReusePolicy):
    """Refresh exactly the blocks (in depth mode: from the layer below the first drifting one) whose cached K/V have
    drifted from a full recompute by more than epsilon (relative L2, max of keys and values).

    It pays a full shadow forward per step to know this, which its accounting does not count: it is the bound that
    learned policies are compared with, not a deployable cache. Its decision is `cache_core.actions.oracle_actions`,
    the function the supervised labels and the environment's labels use.
    """

    name = "oracle"
    uses_features = False
    modalities = ("text", "image")
    knob = "epsilon"
    knob_sweep = (0.01, 0.03, 0.1, 0.3)

    def __init__(self, epsilon: float = 0.05, depth: bool = False):
        if not epsilon >= 0:
            raise ValueError(f"oracle epsilon must be >= 0, got {epsilon}")
        self.epsilon = epsilon
        self.depth = depth

    def plan(self, features: StepFeatures | None, ctx: StepContext) -> RefreshPlan:
        start = oracle_start_layer(ctx.shadow().drift, self.epsilon)
        if not self.depth:  # binary: a block that recomputes any layer refreshes all of them
            start = start_from_actions(actions_from_start(start, "binary", ctx.n_layers), "binary", ctx.n_layers)
        return RefreshPlan(start)
