"""Elastic (weight-sharing) encoders: sub-network configs, the slicing forward, importance reordering, export.

Families: BERT, RoBERTa (and XLM-R, same code), MPNet, DistilBERT, DeBERTa-v2/v3 (not the ConvLayer,
embed_proj or z_steps variants), and the Llama decoder (`LlamaForCausalLM`, LM logits). A subnet keeps the maxnet's head size, so its attention width
(heads × head size) must fit its hidden width, which must be a multiple of the head size: plain
Hugging Face models tie head size to hidden/heads, and every subnet exports as a plain model.
"""

from kdlora.elastic.config import SubnetConfig, evenly_spread_layers, maxnet_config
from kdlora.elastic.model import SUPPORTED_FAMILIES, ElasticTransformer, ElasticOutput

__all__ = ["SUPPORTED_FAMILIES", "ElasticTransformer", "ElasticOutput", "SubnetConfig", "evenly_spread_layers", "maxnet_config"]
