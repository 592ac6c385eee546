"""Batch workers: RQ SimpleWorkers that take a batch of tasks and call the model once."""
