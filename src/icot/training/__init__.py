"""Training stages, all on :func:`icot.training.loop.train_stage`."""
