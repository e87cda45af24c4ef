"""Ray Train jobs: plain PyTorch loops around the models, with DeepSpeed where it helps."""
