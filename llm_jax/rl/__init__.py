"""Reinforcement learning from a reward model: PPO's losses and loop, rejection sampling."""
