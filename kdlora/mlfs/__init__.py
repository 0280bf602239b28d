"""MLFS: a weight-sharing super-transformer trained once (`SuperTransformer` on GLUE, `CausalLMSuperTransformer`
on text), then searched (`kdlora.mlfs.select`) and exported (`kdlora.mlfs.export`) as plain models."""

from kdlora.mlfs.causal_lm import CausalLMSuperTransformer
from kdlora.mlfs.glue import SuperTransformer

__all__ = ["CausalLMSuperTransformer", "SuperTransformer"]
