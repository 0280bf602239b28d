"""Elastic (weight-sharing) encoders: sub-network configs, the slicing forward, importance reordering, export."""

from kdlora.elastic.config import SubnetConfig, evenly_spread_layers, maxnet_config
from kdlora.elastic.model import SUPPORTED_FAMILIES, ElasticEncoder, ElasticOutput

__all__ = ["SUPPORTED_FAMILIES", "ElasticEncoder", "ElasticOutput", "SubnetConfig", "evenly_spread_layers", "maxnet_config"]
