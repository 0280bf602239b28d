"""KD-LoRA: a LoRA teacher (`Teacher`, also FFT) distilled into a smaller LoRA student (`KDLoRAStudent`)."""

from kdlora.kd.student import KDLoRAStudent
from kdlora.kd.teacher import Teacher

__all__ = ["KDLoRAStudent", "Teacher"]
