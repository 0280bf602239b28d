"""Fine-tuning shared by every method: the LightningModule base, loading, LoRA, heads, callbacks and checkpoints."""
