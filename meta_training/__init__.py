"""Meta-training Celo with persistent evolution strategies on small tasks (see meta_training/README)."""
