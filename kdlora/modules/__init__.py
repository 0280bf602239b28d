"""LightningModules: `Teacher` (FFT or LoRA), `KDLoRAStudent`, `SuperTransformer`, `CausalLMSuperTransformer`."""

from kdlora.modules.base import GLUEModule, KDLoraModule
from kdlora.modules.lm_supernet import CausalLMSuperTransformer
from kdlora.modules.student import KDLoRAStudent
from kdlora.modules.supernet import SuperTransformer
from kdlora.modules.teacher import Teacher

__all__ = ["CausalLMSuperTransformer", "GLUEModule", "KDLoraModule", "KDLoRAStudent", "SuperTransformer", "Teacher"]
