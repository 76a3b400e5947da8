"""Training: the loop, parameter groups, schedule, polarity, checkpoints."""
