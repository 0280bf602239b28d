"""The family registry: per `config.model_type`, where a Hugging Face classifier keeps its weights.

A `Family` names its projections (the module names peft and `lora_targets` use) and its default
KD-LoRA targets; an elastic family also has an adapter, a function from the HF model to a `Layout`
(its modules and the constants of its forward, as keyword fields), from which `ElasticTransformer`
builds its blocks. Adding a family is one adapter here plus one test parameter (encoders: the
families of tests/test_elastic.py; decoders: `DECODERS` of tests/test_decoders.py).
`kdlora.training.lora.LORA_TARGETS` is read from this registry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from kdlora.elastic.blocks import ROLES, ConvView
from kdlora.elastic.config import SubnetConfig

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class LayerLayout:
    """One layer's modules (post-LN encoders: the norms follow attention and FFN; pre-norm decoders:
    they precede them). A projection is an `nn.Linear` or anything with its `weight` [out, in],
    `bias`, `in_features` and `out_features` (`ConvView`: GPT-2's Conv1D, or a part of the fused c_attn)."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_output: nn.Linear
    attention_norm: nn.Module  # nn.LayerNorm, or an RMSNorm in decoders
    intermediate: nn.Linear  # decoders: the up projection
    output: nn.Linear
    output_norm: nn.Module
    gate: Optional[nn.Linear] = None  # SwiGLU gate projection (decoders)
    pos_key_proj: Optional[nn.Linear] = None  # DeBERTa position projections (absent with share_att_key)
    pos_query_proj: Optional[nn.Linear] = None


@dataclass(kw_only=True)
class Disentangled:
    """DeBERTa-v2/v3 disentangled attention: shared relative embeddings and its options."""

    rel_embeddings: nn.Embedding  # [2·span, hidden], columns sliced
    rel_norm: Optional[nn.LayerNorm]
    share_att_key: bool  # position projections reuse the (LoRA-adapted) query/key projections
    c2p: bool
    p2c: bool
    span: int
    position_buckets: int
    max_relative_positions: int


@dataclass(kw_only=True)
class Layout:
    """Where a family keeps its weights, and the constants of its forward."""

    family: str
    word: nn.Embedding
    position: Optional[nn.Embedding]  # None: DeBERTa without position_biased_input
    token_type: Optional[nn.Embedding]
    embedding_norm: Optional[nn.LayerNorm]  # None: decoders
    layers: list[LayerLayout]
    activation: Activation
    head_dense: Optional[nn.Linear]  # BERT pooler / RoBERTa head dense / DeBERTa ContextPooler / DistilBERT
    # pre_classifier; None: a decoder's LM head (final_norm, then `classifier` at every position)
    classifier: nn.Linear
    head_activation: Optional[Activation]
    hidden_dropout: float
    attention_dropout: float
    classifier_dropout: float
    head_input_dropout: float = 0.0  # RoBERTa and DeBERTa drop the [CLS] vector before the dense layer
    attention_output_dropout: bool = True  # DistilBERT has no dropout on the attention output
    position_padding_idx: Optional[int] = None  # RoBERTa/MPNet: positions count from padding_idx + 1
    positions_first: bool = False  # DeBERTa adds positions before token types (float rounding follows HF)
    mask_embeddings: bool = False  # DeBERTa zeroes the embeddings of padding tokens
    relative_bias: Optional[nn.Embedding] = None  # MPNet: shared relative position bias [buckets, heads]
    relative_buckets: Optional[Callable[[int, torch.device], torch.Tensor]] = None
    disentangled: Optional[Disentangled] = None
    embedding_dropout: Optional[float] = None  # dropout after the embeddings; None: hidden_dropout (GPT-2: embd_pdrop)
    pre_norm: bool = False  # decoders: pre-norm layers
    causal: bool = False  # decoders: causal attention (no position sees a later one)
    rotary: Optional[nn.Module] = None  # decoders: the model's rotary embedding module
    final_norm: Optional[nn.Module] = None  # decoders: the norm before the LM head


def _bert_style_export(config: PretrainedConfig, cfg: SubnetConfig, head_dim: int, ffn_name: str = "intermediate_size") -> None:
    config.hidden_size = cfg.hidden_size  # attribute_map handles DistilBERT's `dim`
    config.num_attention_heads = cfg.hidden_size // head_dim  # head size = maxnet's
    config.num_hidden_layers = len(cfg.layers)
    setattr(config, ffn_name, max(cfg.ffn_per_layer()))


@dataclass(frozen=True, kw_only=True)
class Family:
    """One `config.model_type`: its projection names and, if elastic, its adapter."""

    model_type: str
    module_names: dict[str, str] = field(default_factory=dict)  # role -> family-native module name
    lora_targets: tuple[str, ...] = ()  # default KD-LoRA targets; () = the query and value modules
    layout: Optional[Callable[[PreTrainedModel], Layout]] = None  # None: peft LoRA only, not elastic
    model_class: str = "ForSequenceClassification"  # how the elastic model's class name ends
    export_config: Callable[[PretrainedConfig, SubnetConfig, int], None] = _bert_style_export
    # Families whose config carries the head size (attention width need not be the hidden size): how the padded
    # export config (hidden/head-size heads) shrinks to the subnet's own heads; None: exports keep padded heads.
    compact_heads: Optional[Callable[[PretrainedConfig, SubnetConfig], None]] = None

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        return self.lora_targets or (self.module_names["query"], self.module_names["value"])

    def subnet_config(self, config: PretrainedConfig, cfg: SubnetConfig, head_dim: int, padded: bool = False) -> PretrainedConfig:
        """The Hugging Face config of the plain model that subnet `cfg` exports to; padded=True: with
        hidden/head-size heads (fewer heads zero-padded), the shape the elastic blocks write into."""
        new = copy.deepcopy(config)
        self.export_config(new, cfg, head_dim)
        if self.compact_heads is not None and not padded:
            self.compact_heads(new, cfg)
        return new


def _bert_style_layers(encoder_layers) -> list[LayerLayout]:
    return [LayerLayout(query=l.attention.self.query, key=l.attention.self.key, value=l.attention.self.value,
                        attention_output=l.attention.output.dense, attention_norm=l.attention.output.LayerNorm,
                        intermediate=l.intermediate.dense, output=l.output.dense, output_norm=l.output.LayerNorm)
            for l in encoder_layers]


def _bert(model: PreTrainedModel) -> Layout:
    base, emb = model.bert, model.bert.embeddings
    if base.pooler is None:
        raise ValueError("BERT classifier without a pooler is not supported")
    return Layout(
        family="bert", word=emb.word_embeddings, position=emb.position_embeddings, token_type=emb.token_type_embeddings,
        embedding_norm=emb.LayerNorm, layers=_bert_style_layers(base.encoder.layer),
        activation=base.encoder.layer[0].intermediate.intermediate_act_fn, head_dense=base.pooler.dense,
        classifier=model.classifier, head_activation=torch.tanh, hidden_dropout=emb.dropout.p,
        attention_dropout=model.config.attention_probs_dropout_prob, classifier_dropout=model.dropout.p,
    )


def _roberta(model: PreTrainedModel) -> Layout:
    base, emb, head = model.roberta, model.roberta.embeddings, model.classifier
    return Layout(
        family=model.config.model_type, word=emb.word_embeddings, position=emb.position_embeddings,
        token_type=emb.token_type_embeddings, embedding_norm=emb.LayerNorm, layers=_bert_style_layers(base.encoder.layer),
        activation=base.encoder.layer[0].intermediate.intermediate_act_fn, head_dense=head.dense, classifier=head.out_proj,
        head_activation=torch.tanh, hidden_dropout=emb.dropout.p, attention_dropout=model.config.attention_probs_dropout_prob,
        classifier_dropout=head.dropout.p, head_input_dropout=head.dropout.p, position_padding_idx=emb.padding_idx,
    )


def _mpnet_relative_buckets(seq_len: int, device: torch.device) -> torch.Tensor:
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    positions = torch.arange(seq_len, dtype=torch.long, device=device)
    # MPNetEncoder.compute_position_bias always uses 32 buckets (its default), whatever the config says.
    return MPNetEncoder.relative_position_bucket(positions[None, :] - positions[:, None], num_buckets=32)


def _mpnet(model: PreTrainedModel) -> Layout:
    base, emb, head = model.mpnet, model.mpnet.embeddings, model.classifier
    layers = [LayerLayout(query=l.attention.attn.q, key=l.attention.attn.k, value=l.attention.attn.v,
                          attention_output=l.attention.attn.o, attention_norm=l.attention.LayerNorm,
                          intermediate=l.intermediate.dense, output=l.output.dense, output_norm=l.output.LayerNorm)
              for l in base.encoder.layer]
    return Layout(
        family="mpnet", word=emb.word_embeddings, position=emb.position_embeddings, token_type=None,
        embedding_norm=emb.LayerNorm, layers=layers, activation=base.encoder.layer[0].intermediate.intermediate_act_fn,
        head_dense=head.dense, classifier=head.out_proj, head_activation=torch.tanh, hidden_dropout=emb.dropout.p,
        attention_dropout=model.config.attention_probs_dropout_prob, classifier_dropout=head.dropout.p,
        head_input_dropout=head.dropout.p, position_padding_idx=emb.padding_idx,
        relative_bias=base.encoder.relative_attention_bias, relative_buckets=_mpnet_relative_buckets,
    )


def _distilbert(model: PreTrainedModel) -> Layout:
    base, emb = model.distilbert, model.distilbert.embeddings
    layers = [LayerLayout(query=l.attention.q_lin, key=l.attention.k_lin, value=l.attention.v_lin,
                          attention_output=l.attention.out_lin, attention_norm=l.sa_layer_norm, intermediate=l.ffn.lin1,
                          output=l.ffn.lin2, output_norm=l.output_layer_norm)
              for l in base.transformer.layer]
    first = base.transformer.layer[0]
    return Layout(
        family="distilbert", word=emb.word_embeddings, position=emb.position_embeddings, token_type=None,
        embedding_norm=emb.LayerNorm, layers=layers, activation=first.ffn.activation, head_dense=model.pre_classifier,
        classifier=model.classifier, head_activation=torch.relu, hidden_dropout=emb.dropout.p,
        attention_dropout=first.attention.dropout.p, classifier_dropout=model.dropout.p, attention_output_dropout=False,
    )


def _deberta_v2(model: PreTrainedModel) -> Layout:
    from transformers.activations import ACT2FN

    config, base, emb = model.config, model.deberta, model.deberta.embeddings
    encoder = base.encoder
    unsupported = []
    if emb.embed_proj is not None:
        unsupported.append("embedding_size != hidden_size")
    if encoder.conv is not None:
        unsupported.append("conv_kernel_size > 0 (DeBERTa-v2-xlarge style ConvLayer)")
    if not encoder.relative_attention:
        unsupported.append("relative_attention=False")
    if getattr(config, "pooler_hidden_size", config.hidden_size) != config.hidden_size:
        unsupported.append("pooler_hidden_size != hidden_size")
    if base.z_steps > 1:
        unsupported.append("z_steps > 1")
    if unsupported:
        raise ValueError(f"elastic DeBERTa-v2 does not support {', '.join(unsupported)}")
    first = encoder.layer[0].attention.self
    layers = [LayerLayout(query=l.attention.self.query_proj, key=l.attention.self.key_proj,
                          value=l.attention.self.value_proj, attention_output=l.attention.output.dense,
                          attention_norm=l.attention.output.LayerNorm, intermediate=l.intermediate.dense,
                          output=l.output.dense, output_norm=l.output.LayerNorm,
                          pos_key_proj=getattr(l.attention.self, "pos_key_proj", None),
                          pos_query_proj=getattr(l.attention.self, "pos_query_proj", None))
              for l in encoder.layer]
    disentangled = Disentangled(
        rel_embeddings=encoder.rel_embeddings,
        rel_norm=getattr(encoder, "LayerNorm", None) if "layer_norm" in encoder.norm_rel_ebd else None,
        share_att_key=first.share_att_key, c2p="c2p" in first.pos_att_type, p2c="p2c" in first.pos_att_type,
        span=first.pos_ebd_size, position_buckets=first.position_buckets, max_relative_positions=first.max_relative_positions,
    )
    return Layout(
        family="deberta-v2", word=emb.word_embeddings, position=emb.position_embeddings if emb.position_biased_input else None,
        token_type=emb.token_type_embeddings, embedding_norm=emb.LayerNorm, layers=layers,
        activation=encoder.layer[0].intermediate.intermediate_act_fn, head_dense=model.pooler.dense,
        classifier=model.classifier, head_activation=ACT2FN[config.pooler_hidden_act], hidden_dropout=emb.dropout.p,
        attention_dropout=config.attention_probs_dropout_prob, classifier_dropout=model.dropout.p,
        head_input_dropout=model.pooler.dropout.p, positions_first=True, mask_embeddings=True, disentangled=disentangled,
    )


def _deberta_v2_export(config: PretrainedConfig, cfg: SubnetConfig, head_dim: int) -> None:
    _bert_style_export(config, cfg, head_dim)
    config.pooler_hidden_size = cfg.hidden_size
    config.attention_head_size = head_dim


def _llama(model: PreTrainedModel) -> Layout:
    from transformers.activations import ACT2FN

    config, base = model.config, model.model
    if config.attention_bias or config.mlp_bias:
        raise ValueError("elastic Llama does not support attention_bias or mlp_bias")
    # Tied (SmolLM2): the LM head is the word embedding table, sliced with it, and the export stays tied.
    if bool(config.tie_word_embeddings) != (model.lm_head.weight is base.embed_tokens.weight):
        raise ValueError(f"elastic Llama: tie_word_embeddings is {config.tie_word_embeddings} but the LM head "
                         f"{'is not' if config.tie_word_embeddings else 'is'} the word embedding table")
    layers = [LayerLayout(query=l.self_attn.q_proj, key=l.self_attn.k_proj, value=l.self_attn.v_proj,
                          attention_output=l.self_attn.o_proj, attention_norm=l.input_layernorm, intermediate=l.mlp.up_proj,
                          output=l.mlp.down_proj, output_norm=l.post_attention_layernorm, gate=l.mlp.gate_proj)
              for l in base.layers]
    return Layout(
        family="llama", word=base.embed_tokens, position=None, token_type=None, embedding_norm=None, layers=layers,
        activation=ACT2FN[config.hidden_act], head_dense=None, classifier=model.lm_head, head_activation=None,
        hidden_dropout=0.0, attention_dropout=config.attention_dropout, classifier_dropout=0.0,
        attention_output_dropout=False, pre_norm=True, causal=True, rotary=base.rotary_emb, final_norm=base.norm,
    )


def _llama_export(config: PretrainedConfig, cfg: SubnetConfig, head_dim: int) -> None:
    group = config.num_attention_heads // config.num_key_value_heads
    _bert_style_export(config, cfg, head_dim)
    if config.num_attention_heads % group:
        raise ValueError(f"subnet {cfg.name}: a Llama export has hidden/head size = {config.num_attention_heads} heads, "
                         f"not a multiple of the maxnet's {group} query heads per key/value head")
    config.num_key_value_heads = config.num_attention_heads // group
    config.head_dim = head_dim


def _llama_compact_heads(config: PretrainedConfig, cfg: SubnetConfig) -> None:
    # o_proj maps heads × head_dim to hidden, so a Llama export needs only its widest layer's heads.
    group = config.num_attention_heads // config.num_key_value_heads
    config.num_attention_heads = max(cfg.heads_per_layer())
    config.num_key_value_heads = config.num_attention_heads // group


def _gpt2(model: PreTrainedModel) -> Layout:
    """GPT-2: Conv1D projections ([in, out] weights, read through `ConvView`), one fused c_attn whose
    query/key/value column blocks are three projections (each with its own LoRA), learned positions,
    pre-norm LayerNorm, gelu_new FFN and an LM head tied to the word embeddings."""
    from transformers.activations import ACT2FN

    config, base = model.config, model.transformer
    unsupported = [name for name, bad in (
        ("scale_attn_weights=False", not config.scale_attn_weights),
        ("scale_attn_by_inverse_layer_idx", config.scale_attn_by_inverse_layer_idx),
        ("add_cross_attention", config.add_cross_attention),
        ("an LM head not tied to the word embeddings", model.lm_head.weight is not base.wte.weight)) if bad]
    if unsupported:
        raise ValueError(f"elastic GPT-2 does not support {', '.join(unsupported)}")
    layers = [LayerLayout(query=ConvView(l.attn.c_attn, 0, 3), key=ConvView(l.attn.c_attn, 1, 3),
                          value=ConvView(l.attn.c_attn, 2, 3), attention_output=ConvView(l.attn.c_proj),
                          attention_norm=l.ln_1, intermediate=ConvView(l.mlp.c_fc), output=ConvView(l.mlp.c_proj),
                          output_norm=l.ln_2)
              for l in base.h]
    return Layout(
        family="gpt2", word=base.wte, position=base.wpe, token_type=None, embedding_norm=None, layers=layers,
        activation=ACT2FN[config.activation_function], head_dense=None, classifier=model.lm_head, head_activation=None,
        hidden_dropout=config.resid_pdrop, attention_dropout=config.attn_pdrop, classifier_dropout=0.0,
        embedding_dropout=config.embd_pdrop, pre_norm=True, causal=True, final_norm=base.ln_f,
    )


_BERT_NAMES = {"query": "query", "key": "key", "value": "value", "attention_output": "attention.output",
               "intermediate": "intermediate", "output": "output"}

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(model_type="bert", module_names=_BERT_NAMES, layout=_bert),
    Family(model_type="roberta", module_names=_BERT_NAMES, layout=_roberta),
    Family(model_type="xlm-roberta", module_names=_BERT_NAMES, layout=_roberta),
    Family(model_type="mpnet", module_names={"query": "q", "key": "k", "value": "v", "attention_output": "o",
                                             "intermediate": "intermediate", "output": "output"}, layout=_mpnet),
    Family(model_type="distilbert", module_names={"query": "q_lin", "key": "k_lin", "value": "v_lin",
                                                  "attention_output": "out_lin", "intermediate": "lin1", "output": "lin2"},
           layout=_distilbert, export_config=partial(_bert_style_export, ffn_name="hidden_dim")),
    Family(model_type="deberta-v2", module_names={**_BERT_NAMES, "query": "query_proj", "key": "key_proj",
                                                  "value": "value_proj"},
           layout=_deberta_v2, export_config=_deberta_v2_export),
    Family(model_type="llama", module_names={"query": "q_proj", "key": "k_proj", "value": "v_proj",
                                             "attention_output": "o_proj", "intermediate": "up_proj", "output": "down_proj"},
           layout=_llama, model_class="ForCausalLM", export_config=_llama_export, compact_heads=_llama_compact_heads),
    # GPT-2's attention and FFN output projections are both `c_proj`: the elastic names say which.
    Family(model_type="gpt2", module_names={"query": "c_attn.query", "key": "c_attn.key", "value": "c_attn.value",
                                            "attention_output": "attn.c_proj", "intermediate": "mlp.c_fc",
                                            "output": "mlp.c_proj"},
           lora_targets=("c_attn",), layout=_gpt2, model_class="LMHeadModel",
           export_config=partial(_bert_style_export, ffn_name="n_inner")),
    Family(model_type="electra", module_names=_BERT_NAMES),
    Family(model_type="deberta", lora_targets=("in_proj",)),  # DeBERTa v1: one fused q/k/v projection
)}

SUPPORTED_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.layout is not None)

# Family-native module names accepted as elastic LoRA targets, mapped to roles.
ROLE_ALIASES = {name: role for f in FAMILIES.values() for role, name in f.module_names.items() if name != role}


def elastic_family(model: PreTrainedModel) -> Family:
    """The registry entry of an elastic model (`*ForSequenceClassification`; Llama `*ForCausalLM`, `GPT2LMHeadModel`), else a ValueError."""
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    if family is None or family.layout is None or not type(model).__name__.endswith(family.model_class):
        kinds = {}
        for name in SUPPORTED_FAMILIES:
            kinds.setdefault(FAMILIES[name].model_class, []).append(name)
        supported = " and ".join(f"*{suffix} models of families {', '.join(names)}" for suffix, names in kinds.items())
        raise ValueError(f"elastic slicing supports {supported}; got {type(model).__name__} "
                         f"(model_type {getattr(model.config, 'model_type', None)!r})")
    return family


def lora_roles(targets) -> tuple[str, ...]:
    """Role names of LoRA targets given as roles or family-native module names."""
    roles = []
    for t in targets:
        role = t if t in ROLES else ROLE_ALIASES.get(t)
        if role is None:
            raise ValueError(f"unknown elastic LoRA target {t!r}; use any of {', '.join(ROLES)} "
                             f"(or family names {', '.join(sorted(ROLE_ALIASES))})")
        if role not in roles:
            roles.append(role)
    if not roles:
        raise ValueError("lora_targets is empty")
    return tuple(roles)
