"""What every training process runs: the step and the evaluation, precision, processes, schedule,
signals, reporting, memory estimate and the run's files."""
