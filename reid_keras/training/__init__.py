"""Training: the runner of one run, the optimizer and schedule factory, callbacks, run folders, strategies."""
