"""How an RL run samples its rollouts: one static batch, or continuous batching (`rl.rollout`).

    engine = RolloutEngine(policy, s, sampling)
    gen = engine.generate(params, prompt_tokens (B, P), prompt_lengths (B,), key[, sampling]) -> Generation (B, N)

"static" prefills the whole batch and decodes until its longest answer ends (generate.py). "continuous" decodes
`rl.rollout_slots` rows at a time (0: the whole batch) and gives a row's slot to the next waiting prompt as soon
as it stops (continuous_batching.py), so a batch of answers of mixed lengths does not wait for its longest;
its samples depend on (key, row, token) only, so they do not depend on the slots.
"""
from __future__ import annotations

from llm_jax.continuous_batching import generate_continuous
from llm_jax.generate import SamplingConfig, generate


class RolloutEngine:
    def __init__(self, policy, s, sampling: SamplingConfig):
        self.policy, self.rollout, self.sampling = policy, s.rollout, sampling
        self.slots = s.rollout_slots

    def generate(self, params, prompt_tokens, prompt_lengths, key, sampling: SamplingConfig | None = None):
        sampling = sampling or self.sampling
        if self.rollout == "continuous":
            return generate_continuous(self.policy, params, prompt_tokens, prompt_lengths, key, sampling,
                                       slots=self.slots or len(prompt_lengths))
        return generate(self.policy, params, prompt_tokens, prompt_lengths, key, sampling)
