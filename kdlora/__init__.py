"""kdlora: KD-LoRA and MLFS super-transformer fine-tuning of transformer encoders."""

__version__ = "0.1.0"
