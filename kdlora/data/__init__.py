"""Data modules: GLUE (`GLUEDataModule`) and causal-LM text (`CausalLMDataModule`), with the GLUE task registry."""

from kdlora.data.causal_lm import CausalLMDataModule
from kdlora.data.glue import GLUEDataModule
from kdlora.data.tasks import TaskSpec, get_task

__all__ = ["CausalLMDataModule", "GLUEDataModule", "TaskSpec", "get_task"]
