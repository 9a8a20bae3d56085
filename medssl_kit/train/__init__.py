"""Training: the pre-training loop, fine-tuning and probing, checkpoints."""
