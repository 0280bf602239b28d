"""ElasticEncoder: one Hugging Face sequence classifier run as any sub-network Φ, with staged LoRA.

The slicing operator Π takes the LEADING rows/columns of every weight a sub-network touches
(embeddings, every LayerNorm — normalising over the sliced width —, Q/K/V and attention output,
FFN in/out, pooler, classifier head) and the matching slices of the LoRA matrices (A: leading
input columns, B: leading output rows). Head size stays the maxnet's, so `num_heads` selects the
leading heads. transformers v5 has no head masking or pruning, so the forward is written here with
functional ops on the sliced weights, reproducing the Hugging Face math of each family (post-LN
encoders: BERT, RoBERTa/XLM-R, MPNet, DistilBERT, and DeBERTa-v2/v3 with disentangled attention, except
the ConvLayer / embed_proj / z_steps variants).

LoRA is hand-written rather than peft because adapters are sliced per sub-network and added in
stages (MLFS): W_sup = W_pretrain + Σ_s (alpha/r)·B_s A_s; adding a stage freezes earlier ones.
Storage mode: the encoder holds one base model plus the adapters; `materialize(Φ)` slices and
merges on demand into a plain, smaller Hugging Face model (cached), which `export_hf` writes.
"""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from kdlora.elastic.config import SubnetConfig, maxnet_config

SUPPORTED_FAMILIES = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta-v2")

# Projections of one encoder layer, by family-neutral role name.
ROLES = ("query", "key", "value", "attention_output", "intermediate", "output")
# Family-native module names accepted as LoRA targets, mapped to roles.
ROLE_ALIASES = {
    "q": "query", "k": "key", "v": "value", "o": "attention_output",
    "q_lin": "query", "k_lin": "key", "v_lin": "value", "out_lin": "attention_output",
    "lin1": "intermediate", "lin2": "output", "attention.output": "attention_output",
    "query_proj": "query", "key_proj": "key", "value_proj": "value",
}


def lora_roles(targets: Sequence[str]) -> tuple[str, ...]:
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


@dataclass
class ElasticOutput:
    logits: torch.Tensor  # [B, num_labels]
    hidden_states: Optional[list[torch.Tensor]] = None  # output of each kept layer, [B, T, h_sub]


@dataclass
class _Layer:
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_output: nn.Linear
    attention_norm: nn.LayerNorm
    intermediate: nn.Linear
    output: nn.Linear
    output_norm: nn.LayerNorm


@dataclass
class _Deberta:
    """DeBERTa-v2/v3 disentangled attention: shared relative embeddings and per-layer position projections."""

    rel_embeddings: nn.Embedding  # [2·span, hidden], columns sliced
    rel_norm: Optional[nn.LayerNorm]
    share_att_key: bool  # position projections reuse the (LoRA-adapted) query/key projections
    pos_key_proj: list[Optional[nn.Linear]]
    pos_query_proj: list[Optional[nn.Linear]]
    c2p: bool
    p2c: bool
    span: int
    position_buckets: int
    max_relative_positions: int
    pooler_activation: Callable[[torch.Tensor], torch.Tensor]
    pooler_dropout: float


@dataclass
class _Layout:
    """Where a family keeps its weights, and the constants of its forward."""

    family: str
    word: nn.Embedding
    position: nn.Embedding
    token_type: Optional[nn.Embedding]
    embedding_norm: nn.LayerNorm
    layers: list[_Layer]
    activation: Callable[[torch.Tensor], torch.Tensor]
    position_padding_idx: Optional[int]  # RoBERTa/MPNet: positions count from padding_idx + 1
    relative_bias: Optional[nn.Embedding]  # MPNet: shared relative position bias [buckets, heads]
    head_style: str  # "bert" (pooler), "roberta" (dense-tanh), "distilbert" (pre_classifier-relu)
    head_dense: Optional[nn.Linear]  # BERT pooler / RoBERTa head dense / DistilBERT pre_classifier
    classifier: nn.Linear
    hidden_dropout: float
    attention_dropout: float
    classifier_dropout: float
    attention_output_dropout: bool  # DistilBERT has no dropout on the attention output
    deberta: Optional[_Deberta] = None


def _bert_style_layers(encoder_layers) -> list[_Layer]:
    return [
        _Layer(l.attention.self.query, l.attention.self.key, l.attention.self.value, l.attention.output.dense,
               l.attention.output.LayerNorm, l.intermediate.dense, l.output.dense, l.output.LayerNorm)
        for l in encoder_layers
    ]


def _layout(model: PreTrainedModel) -> _Layout:
    family = getattr(model.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES or not type(model).__name__.endswith("ForSequenceClassification"):
        raise ValueError(
            f"elastic slicing supports *ForSequenceClassification models of families {', '.join(SUPPORTED_FAMILIES)}; "
            f"got {type(model).__name__} (model_type {family!r})"
        )
    if family == "bert":
        base, emb = model.bert, model.bert.embeddings
        first = base.encoder.layer[0]
        if base.pooler is None:
            raise ValueError("BERT classifier without a pooler is not supported")
        return _Layout(
            family, emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings, emb.LayerNorm,
            _bert_style_layers(base.encoder.layer), first.intermediate.intermediate_act_fn, None, None,
            "bert", base.pooler.dense, model.classifier, emb.dropout.p, model.config.attention_probs_dropout_prob,
            model.dropout.p, True,
        )
    if family in ("roberta", "xlm-roberta"):
        base, emb = model.roberta, model.roberta.embeddings
        first = base.encoder.layer[0]
        return _Layout(
            family, emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings, emb.LayerNorm,
            _bert_style_layers(base.encoder.layer), first.intermediate.intermediate_act_fn, emb.padding_idx, None,
            "roberta", model.classifier.dense, model.classifier.out_proj, emb.dropout.p,
            model.config.attention_probs_dropout_prob, model.classifier.dropout.p, True,
        )
    if family == "mpnet":
        base, emb = model.mpnet, model.mpnet.embeddings
        layers = [
            _Layer(l.attention.attn.q, l.attention.attn.k, l.attention.attn.v, l.attention.attn.o, l.attention.LayerNorm,
                   l.intermediate.dense, l.output.dense, l.output.LayerNorm)
            for l in base.encoder.layer
        ]
        return _Layout(
            family, emb.word_embeddings, emb.position_embeddings, None, emb.LayerNorm, layers,
            base.encoder.layer[0].intermediate.intermediate_act_fn, emb.padding_idx,
            base.encoder.relative_attention_bias, "roberta", model.classifier.dense, model.classifier.out_proj,
            emb.dropout.p, model.config.attention_probs_dropout_prob, model.classifier.dropout.p, True,
        )
    if family == "deberta-v2":
        return _deberta_layout(model)
    # distilbert
    base, emb = model.distilbert, model.distilbert.embeddings
    layers = [
        _Layer(l.attention.q_lin, l.attention.k_lin, l.attention.v_lin, l.attention.out_lin, l.sa_layer_norm,
               l.ffn.lin1, l.ffn.lin2, l.output_layer_norm)
        for l in base.transformer.layer
    ]
    first = base.transformer.layer[0]
    return _Layout(
        family, emb.word_embeddings, emb.position_embeddings, None, emb.LayerNorm, layers, first.ffn.activation,
        None, None, "distilbert", model.pre_classifier, model.classifier, emb.dropout.p,
        first.attention.dropout.p, model.dropout.p, False,
    )


def _deberta_layout(model: PreTrainedModel) -> _Layout:
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
    attentions = [l.attention.self for l in encoder.layer]
    first = attentions[0]
    layers = [
        _Layer(l.attention.self.query_proj, l.attention.self.key_proj, l.attention.self.value_proj,
               l.attention.output.dense, l.attention.output.LayerNorm, l.intermediate.dense, l.output.dense,
               l.output.LayerNorm)
        for l in encoder.layer
    ]
    extras = _Deberta(
        encoder.rel_embeddings, getattr(encoder, "LayerNorm", None) if "layer_norm" in encoder.norm_rel_ebd else None,
        first.share_att_key, [getattr(a, "pos_key_proj", None) for a in attentions],
        [getattr(a, "pos_query_proj", None) for a in attentions], "c2p" in first.pos_att_type,
        "p2c" in first.pos_att_type, first.pos_ebd_size, first.position_buckets, first.max_relative_positions,
        ACT2FN[config.pooler_hidden_act], model.pooler.dropout.p,
    )
    return _Layout(
        "deberta-v2", emb.word_embeddings, emb.position_embeddings if emb.position_biased_input else None,
        emb.token_type_embeddings, emb.LayerNorm, layers, encoder.layer[0].intermediate.intermediate_act_fn, None, None,
        "deberta", model.pooler.dense, model.classifier, emb.dropout.p, config.attention_probs_dropout_prob,
        model.dropout.p, True, extras,
    )


def _roberta_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    # Same as RobertaEmbeddings.create_position_ids_from_input_ids: pads keep padding_idx.
    mask = input_ids.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx


def _mpnet_relative_buckets(seq_len: int, device) -> torch.Tensor:
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    positions = torch.arange(seq_len, dtype=torch.long, device=device)
    # MPNetEncoder.compute_position_bias always uses 32 buckets (its default), whatever the config says.
    return MPNetEncoder.relative_position_bucket(positions[None, :] - positions[:, None], num_buckets=32)


class _LoraStages(nn.Module):
    """The adapters of one projection: one (A_s, B_s) pair per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()


class ElasticEncoder(nn.Module):
    """A frozen HF `*ForSequenceClassification` plus staged LoRA, runnable as any sub-network.

    Args:
        model: the maxnet (BERT, RoBERTa/XLM-R, MPNet, DistilBERT or DeBERTa-v2/v3 sequence classifier). Its
            weights are used in place (not copied) and frozen.
        lora_r, lora_alpha, lora_dropout: adapter rank, scale alpha/r and input dropout.
        lora_targets: projections that get adapters: role names (query, key, value,
            attention_output, intermediate, output) or family-native names (q_lin, lin1, ...).
        train_head: make the pooler/classifier head trainable (newly initialised heads must be).
        lora_stages: number of adapter stages to create up front (to load a saved state dict).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_targets: Sequence[str] = ("query", "key", "value", "intermediate", "output"),
        train_head: bool = False,
        lora_stages: int = 0,
    ) -> None:
        super().__init__()
        if lora_r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {lora_r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.model = model
        self._layout = _layout(model)  # validates the family first
        for p in model.parameters():
            p.requires_grad_(False)
        self.lora_r, self.lora_alpha, self.lora_dropout = int(lora_r), lora_alpha, float(lora_dropout)
        self.lora_scale = lora_alpha / lora_r
        self.lora_targets = lora_roles(lora_targets)
        self.lora = nn.ModuleDict({
            self._lora_key(i, role): _LoraStages() for i in range(len(self._layout.layers)) for role in self.lora_targets
        })
        self._max = maxnet_config(model.config)
        if self._layout.layers[0].query.out_features != self._max.hidden_size:
            raise ValueError(f"elastic slicing needs attention width = hidden size ({self._max.hidden_size}); this "
                             f"{self.family} model has {self._layout.layers[0].query.out_features}")
        self._head_dim = self._max.head_dim
        self._current = self._max
        self._materialized: OrderedDict = OrderedDict()
        self.set_trainable_head(train_head)
        for _ in range(lora_stages):
            self.add_lora_stage()

    # ---- configuration ----
    @staticmethod
    def _lora_key(layer: int, role: str) -> str:
        return f"layer{layer}_{role}"

    @property
    def family(self) -> str:
        return self._layout.family

    @property
    def max_config(self) -> SubnetConfig:
        return self._max

    @property
    def head_dim(self) -> int:
        return self._head_dim

    @property
    def sub_network(self) -> SubnetConfig:
        return self._current

    def set_sub_network(self, cfg: SubnetConfig) -> None:
        """Run later forwards as `cfg` (validated against the maxnet; ValueError if it is not a subnet)."""
        if not isinstance(cfg, SubnetConfig):
            raise TypeError(f"expected a SubnetConfig, got {type(cfg).__name__}")
        cfg.validate(self._max)
        self._current = cfg

    def reset_super_network(self) -> None:
        self._current = self._max

    def head_modules(self) -> list[nn.Linear]:
        lay = self._layout
        return [m for m in (lay.head_dense, lay.classifier) if m is not None]

    def set_trainable_head(self, trainable: bool = True) -> None:
        """(Un)freeze the pooler/classifier head (shared by all subnets, sliced like the rest)."""
        for module in self.head_modules():
            for p in module.parameters():
                p.requires_grad_(trainable)

    # ---- LoRA stages ----
    @property
    def num_stages(self) -> int:
        return len(next(iter(self.lora.values())).A) if len(self.lora) else 0

    def add_lora_stage(self) -> int:
        """Add (A_s, B_s) on every target (B = 0, so the function is unchanged); freeze earlier stages."""
        weight = self.model.get_input_embeddings().weight
        for key, stages in self.lora.items():
            for p in list(stages.A) + list(stages.B):
                p.requires_grad_(False)
            layer, role = key[len("layer"):].split("_", 1)
            linear = getattr(self._layout.layers[int(layer)], role)
            A = torch.empty(self.lora_r, linear.in_features, dtype=weight.dtype, device=weight.device)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as peft / nn.Linear
            stages.A.append(nn.Parameter(A))
            stages.B.append(nn.Parameter(torch.zeros(linear.out_features, self.lora_r, dtype=weight.dtype, device=weight.device)))
        return self.num_stages - 1

    def adapters(self, layer: int, role: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The (A_s, B_s) pairs of one projection, oldest stage first ([] if not a LoRA target)."""
        stages = self.lora[self._lora_key(layer, role)] if role in self.lora_targets else None
        return list(zip(stages.A, stages.B)) if stages is not None else []

    def linear_module(self, layer: int, role: str) -> nn.Linear:
        return getattr(self._layout.layers[layer], role)

    def merged_weight(self, layer: int, role: str, out_features: Optional[int] = None,
                      in_features: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Leading [out, in] slice of W + Σ_s scale·B_s A_s (slice-then-merge) and the bias slice."""
        linear = self.linear_module(layer, role)
        o = linear.out_features if out_features is None else out_features
        i = linear.in_features if in_features is None else in_features
        weight = linear.weight[:o, :i]
        for A, B in self.adapters(layer, role):
            weight = weight + self.lora_scale * (B[:o] @ A[:, :i])
        return weight, (linear.bias[:o] if linear.bias is not None else None)

    # ---- forward ----
    def _project(self, x: torch.Tensor, layer: int, role: str, out_features: int, in_features: int) -> torch.Tensor:
        linear = self.linear_module(layer, role)
        bias = linear.bias[:out_features] if linear.bias is not None else None
        y = F.linear(x, linear.weight[:out_features, :in_features], bias)
        adapters = self.adapters(layer, role)
        if adapters:
            xd = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout > 0 else x
            for A, B in adapters:
                y = y + self.lora_scale * F.linear(F.linear(xd, A[:, :in_features]), B[:out_features])
        return y

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.LayerNorm, width: int) -> torch.Tensor:
        return F.layer_norm(x, (width,), norm.weight[:width], norm.bias[:width], norm.eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
    ) -> ElasticOutput:
        cfg, lay, d = self._current, self._layout, self._head_dim
        h, train = cfg.hidden_size, self.training
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        # Embeddings (sum in the order HF uses, so float rounding matches).
        if lay.position_padding_idx is not None:
            position_ids = _roberta_position_ids(input_ids, lay.position_padding_idx)
        else:
            position_ids = torch.arange(seq, device=input_ids.device)[None, :]
        x = F.embedding(input_ids, lay.word.weight[:, :h])
        if lay.deberta is not None:  # DeBERTa adds positions (if at all) before token types
            if lay.position is not None:
                x = x + F.embedding(position_ids, lay.position.weight[:, :h])
            if lay.token_type is not None:
                x = x + F.embedding(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids),
                                    lay.token_type.weight[:, :h])
            x = self._norm(x, lay.embedding_norm, h) * attention_mask[:, :, None].to(x.dtype)
            return self._deberta_encoder(F.dropout(x, lay.hidden_dropout, train), attention_mask, output_hidden_states)
        if lay.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + F.embedding(token_type_ids, lay.token_type.weight[:, :h])
        x = x + F.embedding(position_ids, lay.position.weight[:, :h])
        x = F.dropout(self._norm(x, lay.embedding_norm, h), lay.hidden_dropout, train)

        padded = attention_mask[:, None, None, :] == 0
        position_bias = None
        if lay.relative_bias is not None:
            buckets = _mpnet_relative_buckets(seq, input_ids.device)
            position_bias = F.embedding(buckets, lay.relative_bias.weight).permute(2, 0, 1)[None]  # [1, heads, T, T]
        masks: dict[torch.dtype, torch.Tensor] = {}  # additive mask in the attention dtype (autocast may lower it)

        def additive_mask(dtype: torch.dtype) -> torch.Tensor:
            if dtype not in masks:
                masks[dtype] = torch.zeros(padded.shape, dtype=dtype, device=padded.device).masked_fill(
                    padded, torch.finfo(dtype).min)
            return masks[dtype]

        hidden_states = [] if output_hidden_states else None
        for g, heads, ffn in zip(cfg.layers, cfg.heads_per_layer(), cfg.ffn_per_layer()):
            layer, width = lay.layers[g], heads * d

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(batch, seq, heads, d).transpose(1, 2)

            q = split(self._project(x, g, "query", width, h))
            k = split(self._project(x, g, "key", width, h))
            v = split(self._project(x, g, "value", width, h))
            mask = additive_mask(q.dtype)
            if position_bias is not None:
                mask = mask + position_bias[:, :heads].to(q.dtype)
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=lay.attention_dropout if train else 0.0, scale=d ** -0.5
            )
            context = context.transpose(1, 2).reshape(batch, seq, width)
            attn = self._project(context, g, "attention_output", h, width)
            if lay.attention_output_dropout:
                attn = F.dropout(attn, lay.hidden_dropout, train)
            x = self._attention_residual_and_ffn(x, attn, layer, g, h, ffn, train)
            if hidden_states is not None:
                hidden_states.append(x)

        return ElasticOutput(self._head(x[:, 0], h), hidden_states)

    def _deberta_encoder(self, x: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool) -> ElasticOutput:
        """DeBERTa-v2 layers (disentangled attention, as DisentangledSelfAttention) on sliced weights."""
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

        cfg, lay, d, train = self._current, self._layout, self._head_dim, self.training
        ext, h = lay.deberta, cfg.hidden_size
        batch, seq = x.shape[:2]
        keep = (attention_mask[:, None, :, None] * attention_mask[:, None, None, :]).bool()  # [B, 1, T, T]
        relative_pos = build_relative_position(x, x, ext.position_buckets, ext.max_relative_positions)[0]  # [T, T]
        rel_embeddings = ext.rel_embeddings.weight[: 2 * ext.span, :h]
        if ext.rel_norm is not None:
            rel_embeddings = self._norm(rel_embeddings, ext.rel_norm, h)
        scale_factor = 1 + int(ext.c2p) + int(ext.p2c)
        c2p_index = torch.clamp(relative_pos + ext.span, 0, 2 * ext.span - 1)
        p2c_index = torch.clamp(-relative_pos + ext.span, 0, 2 * ext.span - 1)
        hidden_states = [] if output_hidden_states else None
        for g, heads, ffn in zip(cfg.layers, cfg.heads_per_layer(), cfg.ffn_per_layer()):
            layer, width = lay.layers[g], heads * d
            rel = F.dropout(rel_embeddings, lay.hidden_dropout, train)  # each layer's pos_dropout

            def split(t: torch.Tensor) -> torch.Tensor:  # [B or 1, T, width] -> [B or 1, heads, T, d]
                return t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

            q = split(self._project(x, g, "query", width, h))
            k = split(self._project(x, g, "key", width, h))
            v = split(self._project(x, g, "value", width, h))
            scale = math.sqrt(d * scale_factor)
            scores = q @ (k.transpose(-1, -2) / scale)
            if ext.c2p:
                pos_key = (split(self._project(rel[None], g, "key", width, h)) if ext.share_att_key else
                           split(F.linear(rel[None], ext.pos_key_proj[g].weight[:width, :h], ext.pos_key_proj[g].bias[:width])))
                c2p = torch.gather(q @ pos_key.transpose(-1, -2), -1, c2p_index.expand(batch, heads, seq, seq))
                scores = scores + c2p / scale
            if ext.p2c:
                pos_query = (split(self._project(rel[None], g, "query", width, h)) if ext.share_att_key else
                             split(F.linear(rel[None], ext.pos_query_proj[g].weight[:width, :h],
                                            ext.pos_query_proj[g].bias[:width])))
                p2c = torch.gather(k @ pos_query.transpose(-1, -2), -1, p2c_index.expand(batch, heads, seq, seq))
                scores = scores + p2c.transpose(-1, -2) / scale
            scores = scores.masked_fill(~keep, torch.finfo(q.dtype).min)
            probs = F.dropout(torch.softmax(scores, dim=-1), lay.attention_dropout, train)
            context = (probs @ v).transpose(1, 2).reshape(batch, seq, width)
            attn = F.dropout(self._project(context, g, "attention_output", h, width), lay.hidden_dropout, train)
            x = self._attention_residual_and_ffn(x, attn, layer, g, h, ffn, train)
            if hidden_states is not None:
                hidden_states.append(x)
        return ElasticOutput(self._head(x[:, 0], h), hidden_states)

    def _attention_residual_and_ffn(self, x: torch.Tensor, attn: torch.Tensor, layer, g: int, h: int, ffn: int,
                                    train: bool) -> torch.Tensor:
        """Post-LN residual after attention, then the (sliced) FFN and its residual: shared by all families."""
        lay = self._layout
        x = self._norm(attn + x, layer.attention_norm, h)
        inner = lay.activation(self._project(x, g, "intermediate", ffn, h))
        out = F.dropout(self._project(inner, g, "output", h, ffn), lay.hidden_dropout, train)
        return self._norm(out + x, layer.output_norm, h)

    def _head(self, cls: torch.Tensor, h: int) -> torch.Tensor:
        lay, train, p = self._layout, self.training, self._layout.classifier_dropout
        dense, classifier = lay.head_dense, lay.classifier
        if lay.head_style == "bert":
            z = F.dropout(torch.tanh(F.linear(cls, dense.weight[:h, :h], dense.bias[:h])), p, train)
        elif lay.head_style == "roberta":
            z = torch.tanh(F.linear(F.dropout(cls, p, train), dense.weight[:h, :h], dense.bias[:h]))
            z = F.dropout(z, p, train)
        elif lay.head_style == "deberta":  # ContextPooler, then dropout + classifier
            ext = lay.deberta
            z = F.linear(F.dropout(cls, ext.pooler_dropout, train), dense.weight[:h, :h], dense.bias[:h])
            z = F.dropout(ext.pooler_activation(z), p, train)
        else:  # distilbert
            z = F.dropout(F.relu(F.linear(cls, dense.weight[:h, :h], dense.bias[:h])), p, train)
        return F.linear(z, classifier.weight[:, :h], classifier.bias)

    # ---- sizes ----
    def _used_tensors(self, cfg: SubnetConfig) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
        """Every base tensor a subnet reads, with the shape of the slice it reads."""
        lay, d, h = self._layout, self._head_dim, cfg.hidden_size
        embeddings = [e for e in (lay.word, lay.position, lay.token_type) if e is not None]
        for e in embeddings:
            yield e.weight, (e.weight.shape[0], h)
        norms = [lay.embedding_norm]
        for g, heads, ffn in zip(cfg.layers, cfg.heads_per_layer(), cfg.ffn_per_layer()):
            layer, width = lay.layers[g], heads * d
            for role, (o, i) in (("query", (width, h)), ("key", (width, h)), ("value", (width, h)),
                                 ("attention_output", (h, width)), ("intermediate", (ffn, h)), ("output", (h, ffn))):
                linear = getattr(layer, role)
                yield linear.weight, (o, i)
                if linear.bias is not None:
                    yield linear.bias, (o,)
            norms += [layer.attention_norm, layer.output_norm]
        for norm in norms:
            yield norm.weight, (h,)
            yield norm.bias, (h,)
        if lay.relative_bias is not None:
            yield lay.relative_bias.weight, (lay.relative_bias.weight.shape[0], max(cfg.heads_per_layer()))
        if lay.deberta is not None:
            ext = lay.deberta
            yield ext.rel_embeddings.weight, (ext.rel_embeddings.weight.shape[0], h)
            if ext.rel_norm is not None:
                yield ext.rel_norm.weight, (h,)
                yield ext.rel_norm.bias, (h,)
            for g, heads in zip(cfg.layers, cfg.heads_per_layer()):
                for proj in (ext.pos_key_proj[g], ext.pos_query_proj[g]):
                    if proj is not None:
                        yield proj.weight, (heads * d, h)
                        yield proj.bias, (heads * d,)
        yield lay.head_dense.weight, (h, h)
        yield lay.head_dense.bias, (h,)
        yield lay.classifier.weight, (lay.classifier.weight.shape[0], h)
        if lay.classifier.bias is not None:
            yield lay.classifier.bias, (lay.classifier.bias.shape[0],)

    def _used_adapters(self, cfg: SubnetConfig) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
        d, h = self._head_dim, cfg.hidden_size
        for g, heads, ffn in zip(cfg.layers, cfg.heads_per_layer(), cfg.ffn_per_layer()):
            shapes = {"query": (heads * d, h), "key": (heads * d, h), "value": (heads * d, h),
                      "attention_output": (h, heads * d), "intermediate": (ffn, h), "output": (h, ffn)}
            for role in self.lora_targets:
                o, i = shapes[role]
                for A, B in self.adapters(g, role):
                    yield A, (A.shape[0], i)
                    yield B, (o, B.shape[1])

    def parameter_count(self, cfg: Optional[SubnetConfig] = None, trainable_only: bool = False) -> int:
        """Parameters subnet `cfg` (default: current) uses, counting sliced sizes.

        trainable_only=False counts the deployed model (LoRA merged into the base weights, so
        adapters add nothing): it equals the exported model's size when every layer's attention
        width heads × head size equals the hidden size and FFN widths are uniform (else the export
        zero-pads to those shapes). trainable_only=True counts trainable tensors actually read:
        the slices of trainable adapters (and of the head if it is trainable).
        """
        cfg = self._current if cfg is None else cfg
        cfg.validate(self._max)
        tensors = list(self._used_tensors(cfg)) + (list(self._used_adapters(cfg)) if trainable_only else [])
        return sum(math.prod(shape) for t, shape in tensors if t.requires_grad or not trainable_only)

    # ---- materialisation and export ----
    def _fingerprint(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict, reordering) bump a tensor's _version.
        return tuple((id(p), p._version) for p in self.parameters())

    def export_config(self, cfg: SubnetConfig):
        """The Hugging Face config of the plain model that `cfg` exports to."""
        cfg.validate(self._max)
        new = copy.deepcopy(self.model.config)
        new.hidden_size = cfg.hidden_size  # attribute_map handles DistilBERT's `dim`
        new.num_attention_heads = cfg.hidden_size // self._head_dim  # head size = maxnet's
        new.num_hidden_layers = len(cfg.layers)
        setattr(new, "hidden_dim" if self.family == "distilbert" else "intermediate_size", max(cfg.ffn_per_layer()))
        if self.family == "deberta-v2":
            new.pooler_hidden_size = cfg.hidden_size
            new.attention_head_size = self._head_dim
        return new

    @torch.no_grad()
    def materialize(self, cfg: SubnetConfig) -> PreTrainedModel:
        """The plain HF model of `cfg`: weights physically sliced, all LoRA stages merged, eval mode.

        Cached per config until any parameter changes; treat the result as read-only (deepcopy it
        to modify). Layers with fewer heads/FFN neurons than the widest kept layer are zero-padded
        (exact: padded heads and neurons contribute nothing).
        """
        key = (cfg, self._fingerprint())
        if key in self._materialized:
            self._materialized.move_to_end(key)
            return self._materialized[key]
        new_config = self.export_config(cfg)
        weight = self.model.get_input_embeddings().weight
        plain = type(self.model)(new_config).to(device=weight.device, dtype=weight.dtype)
        target = _layout(plain)
        assigned: set[int] = set()

        def put(param: torch.Tensor, value: torch.Tensor) -> None:
            if any(v > p for v, p in zip(value.shape, param.shape)) or value.ndim != param.ndim:
                raise RuntimeError(f"cannot place a {tuple(value.shape)} slice into {tuple(param.shape)}")
            param.zero_()
            param[tuple(slice(0, s) for s in value.shape)].copy_(value)
            assigned.add(id(param))

        lay, h, d = self._layout, cfg.hidden_size, self._head_dim
        pairs = [(lay.word, target.word)]
        if lay.position is not None:
            pairs.append((lay.position, target.position))
        if lay.token_type is not None:
            pairs.append((lay.token_type, target.token_type))
        for src, dst in pairs:
            put(dst.weight, src.weight[:, :h])

        def put_norm(src: nn.LayerNorm, dst: nn.LayerNorm) -> None:
            put(dst.weight, src.weight[:h])
            put(dst.bias, src.bias[:h])

        put_norm(lay.embedding_norm, target.embedding_norm)
        for dst_layer, g, heads, ffn in zip(target.layers, cfg.layers, cfg.heads_per_layer(), cfg.ffn_per_layer()):
            width = heads * d
            for role, (o, i) in (("query", (width, h)), ("key", (width, h)), ("value", (width, h)),
                                 ("attention_output", (h, width)), ("intermediate", (ffn, h)), ("output", (h, ffn))):
                w, b = self.merged_weight(g, role, o, i)
                dst = getattr(dst_layer, role)
                put(dst.weight, w)
                if b is not None:
                    put(dst.bias, b)
            put_norm(lay.layers[g].attention_norm, dst_layer.attention_norm)
            put_norm(lay.layers[g].output_norm, dst_layer.output_norm)
        if lay.relative_bias is not None:
            put(target.relative_bias.weight, lay.relative_bias.weight[:, : target.relative_bias.weight.shape[1]])
        if lay.deberta is not None:
            ext, dst = lay.deberta, target.deberta
            put(dst.rel_embeddings.weight, ext.rel_embeddings.weight[:, :h])
            if ext.rel_norm is not None:
                put_norm(ext.rel_norm, dst.rel_norm)
            for i, (g, heads) in enumerate(zip(cfg.layers, cfg.heads_per_layer())):
                for src, out in ((ext.pos_key_proj[g], dst.pos_key_proj[i]), (ext.pos_query_proj[g], dst.pos_query_proj[i])):
                    if src is not None:
                        put(out.weight, src.weight[: heads * d, :h])
                        put(out.bias, src.bias[: heads * d])
        put(target.head_dense.weight, lay.head_dense.weight[:h, :h])
        put(target.head_dense.bias, lay.head_dense.bias[:h])
        put(target.classifier.weight, lay.classifier.weight[:, :h])
        if lay.classifier.bias is not None:
            put(target.classifier.bias, lay.classifier.bias)
        missing = [n for n, p in plain.named_parameters() if id(p) not in assigned]
        if missing:
            raise RuntimeError(f"materialize left parameters of the {self.family} export unset: {missing[:5]}")
        plain.eval()
        for p in plain.parameters():
            p.requires_grad_(False)
        self._materialized[key] = plain
        while len(self._materialized) > 4:
            self._materialized.popitem(last=False)
        return plain

    def export_hf(self, cfg: SubnetConfig, out_dir: str | Path, tokenizer=None) -> Path:
        """Write subnet `cfg` as a standalone HF directory (plus ``subnet.json``), atomically, never
        over a directory that is not a previous kdlora export (`kdlora.models.write_export`)."""
        from kdlora.models import write_export

        plain = self.materialize(cfg)
        info = {"name": cfg.name, "subnet": cfg.to_dict(), "parameters": self.parameter_count(cfg),
                "exported_parameters": sum(p.numel() for p in plain.parameters()),
                "family": self.family, "lora_stages_merged": self.num_stages}

        def write(tmp: Path) -> None:
            plain.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "subnet.json").write_text(json.dumps(info, indent=2) + "\n")

        return write_export(out_dir, write, {"kind": "subnet", "subnet": cfg.name})
