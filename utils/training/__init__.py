"""One training run: its flags, starting weights, memory fit, learner, optimizer, update,
evaluation, saving, files, precision and reporting (docs/architecture.md)."""
