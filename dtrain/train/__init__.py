"""Training: sandwich step, distillation losses, schedules, inner loop, checkpoints."""
