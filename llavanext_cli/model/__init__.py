"""What a checkpoint is: its config, generation config, processor and weights (loaded safely), its prompt format,
its inputs as tensors, its memory, and `init-model`'s random checkpoints. Imports from io only."""
