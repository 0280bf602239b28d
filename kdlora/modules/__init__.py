"""LightningModules: `Teacher` (FFT or LoRA), `KDLoRAStudent`, `SuperTransformer`."""

from kdlora.modules.base import GLUEModule
from kdlora.modules.student import KDLoRAStudent
from kdlora.modules.supernet import SuperTransformer
from kdlora.modules.teacher import Teacher

__all__ = ["GLUEModule", "KDLoRAStudent", "SuperTransformer", "Teacher"]
