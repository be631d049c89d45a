"""Meta-training Celo with persistent evolution strategies on small tasks, and judging the result.

* :mod:`.tasks` / :mod:`.data`: the meta-training task families and the data they are built from;
* :mod:`.inner`, :mod:`.pes`, :mod:`.train`: the inner problems, the PES estimator, the two-phase
  trainer (``python -m meta_training.train``);
* :mod:`.evaluate` (with :mod:`.eval_tasks`, :mod:`.eval_metrics`): the held-out CPU suite against
  tuned AdamW (``python -m meta_training.evaluate``).
"""
