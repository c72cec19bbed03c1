"""Pieces of on-policy RL for language models (PPO for RLHF): rollout batches, the forward passes over them."""
