"""Student initialisation stages: what the student is before distillation starts (`train.init`)."""
