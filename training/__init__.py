"""MoE training: the model, sparse upcycling, DeepSpeed expert-parallel training, checkpoints, export."""
