"""Training: the loop (EMA, lr schedules, checkpoints, fingerprints), distillation, the teacher stage, students and their s pathway, warm starts, distances."""
