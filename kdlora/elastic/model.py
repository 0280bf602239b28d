"""ElasticTransformer: one Hugging Face sequence classifier run as any sub-network Φ, with staged LoRA.

The encoder is built from elastic blocks (`kdlora.elastic.blocks`) over the weights of the model's
family layout (`kdlora.elastic.families`): embeddings, every LayerNorm (normalising over the sliced
width), Q/K/V and attention output, FFN in/out, pooler and classifier head are read through their
leading rows/columns, and the LoRA matrices through the matching slices. Head size stays the
maxnet's, so `num_heads` selects the leading heads. transformers v5 has no head masking or pruning,
so the blocks reproduce the Hugging Face math of each family with functional ops on the sliced
weights (post-LN encoders: BERT, RoBERTa/XLM-R, MPNet, DistilBERT, and DeBERTa-v2/v3 with
disentangled attention, except the ConvLayer / embed_proj / z_steps variants; and the pre-norm
decoders, logits at every position: Llama (RMSNorm, rotary positions, grouped-query attention,
SwiGLU) and GPT-2 (Conv1D projections with a fused q/k/v, learned positions, LayerNorm, gelu_new,
an LM head tied to the word embeddings: the sliced head is the sliced table, and exports stay tied).

Storage mode: the encoder holds one base model plus the adapters (the only owners of parameters,
so checkpoints name them `model.…` and `lora.layer<i>_<role>.{A,B}.<stage>`); `materialize(Φ)`
slices and merges on demand into a plain, smaller Hugging Face model (cached), which `export_hf` writes.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from kdlora.elastic.blocks import (ROLES, Axes, ClassifierHead, DisentangledAttention, DisentangledPositions,
                                   ElasticAttention, ElasticEmbedding, ElasticFFN, ElasticLayerNorm, ElasticLinear,
                                   ElasticRMSNorm, Embeddings, LMHead, LoraStages, PaddingMask, PreNormLayer, RelativePositionBias,
                                   RotaryPositions, TiedLinear, TransformerLayer, CausalMask, leaves, parameter_count)
from kdlora.elastic.config import SubnetConfig, maxnet_config
from kdlora.elastic.families import SUPPORTED_FAMILIES, Layout, elastic_family, lora_roles

__all__ = ["ROLES", "SUPPORTED_FAMILIES", "ElasticTransformer", "ElasticOutput"]


@dataclass
class ElasticOutput:
    logits: torch.Tensor  # [B, num_labels]; decoders: [B, T, vocab]
    hidden_states: Optional[list[torch.Tensor]] = None  # output of each kept layer, [B, T, h_sub]


class ElasticTransformer(nn.Module):
    """A frozen HF `*ForSequenceClassification` plus staged LoRA, runnable as any sub-network.

    Args:
        model: the maxnet (BERT, RoBERTa/XLM-R, MPNet, DistilBERT or DeBERTa-v2/v3 sequence classifier, or a
            Llama or GPT-2 causal LM). Its weights are used in place (not copied) and frozen.
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
        self._family = elastic_family(model)  # validates the family first
        self._layout: Layout = self._family.layout(model)
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.lora_r, self.lora_alpha, self.lora_dropout = int(lora_r), lora_alpha, float(lora_dropout)
        self.lora_scale = lora_alpha / lora_r
        self.lora_targets = lora_roles(lora_targets)
        self.lora = nn.ModuleDict({
            self._lora_key(i, role): LoraStages() for i in range(len(self._layout.layers)) for role in self.lora_targets
        })
        self._max = maxnet_config(model.config)
        if self._layout.layers[0].query.out_features != self._max.hidden_size:
            raise ValueError(f"elastic slicing needs attention width = hidden size ({self._max.hidden_size}); this "
                             f"{self.family} model has {self._layout.layers[0].query.out_features}")
        self._head_dim = self._max.head_dim
        self._build_blocks()
        self._current = self._max
        self._materialized: OrderedDict = OrderedDict()
        self.set_trainable_head(train_head)
        for _ in range(lora_stages):
            self.add_lora_stage()

    def _build_blocks(self) -> None:
        """Blocks over the layout's modules: embeddings, attention inputs, layers, head."""
        lay, d = self._layout, self._head_dim
        optional = lambda m, block: block(m) if m is not None else None  # noqa: E731
        norm = lambda m: ElasticLayerNorm(m) if isinstance(m, nn.LayerNorm) else ElasticRMSNorm(m)  # noqa: E731
        self.embeddings = Embeddings(
            ElasticEmbedding(lay.word), optional(lay.position, ElasticEmbedding), optional(lay.token_type, ElasticEmbedding),
            optional(lay.embedding_norm, norm),
            dropout=lay.hidden_dropout if lay.embedding_dropout is None else lay.embedding_dropout, position_padding_idx=lay.position_padding_idx,
            positions_first=lay.positions_first, mask_padding=lay.mask_embeddings)
        ext = lay.disentangled
        if ext is not None:
            self.attention_inputs = DisentangledPositions(
                ElasticEmbedding(ext.rel_embeddings), optional(ext.rel_norm, ElasticLayerNorm), span=ext.span,
                position_buckets=ext.position_buckets, max_relative_positions=ext.max_relative_positions)
        elif lay.relative_bias is not None:
            self.attention_inputs = RelativePositionBias(ElasticEmbedding(lay.relative_bias), lay.relative_buckets)
        elif lay.rotary is not None:
            self.attention_inputs = RotaryPositions(lay.rotary)
        elif lay.causal:
            self.attention_inputs = CausalMask()
        else:
            self.attention_inputs = PaddingMask()
        layers = []
        for i, parts in enumerate(lay.layers):
            linear = {role: self._linear(i, role, getattr(parts, role)) for role in ROLES}
            qkvo = (linear["query"], linear["key"], linear["value"], linear["attention_output"], d)
            output_dropout = lay.hidden_dropout if lay.attention_output_dropout else 0.0
            if ext is not None:
                attention = DisentangledAttention(
                    *qkvo, pos_key=optional(parts.pos_key_proj, ElasticLinear),
                    pos_query=optional(parts.pos_query_proj, ElasticLinear), share_att_key=ext.share_att_key, c2p=ext.c2p,
                    p2c=ext.p2c, dropout=lay.attention_dropout, output_dropout=output_dropout,
                    position_dropout=lay.hidden_dropout)
            else:
                attention = ElasticAttention(*qkvo, dropout=lay.attention_dropout, output_dropout=output_dropout)
            ffn = ElasticFFN(linear["intermediate"], linear["output"], lay.activation, dropout=lay.hidden_dropout,
                             gate=optional(parts.gate, ElasticLinear))
            layer = PreNormLayer if lay.pre_norm else TransformerLayer
            layers.append(layer(attention, norm(parts.attention_norm), ffn, norm(parts.output_norm)))
        self.layers = nn.ModuleList(layers)
        if lay.head_dense is None:
            tied = lay.classifier.weight is lay.word.weight  # GPT-2: the LM head is the word embedding table
            self.head = LMHead(norm(lay.final_norm), (TiedLinear if tied else ElasticLinear)(lay.classifier))
        else:
            self.head = ClassifierHead(ElasticLinear(lay.head_dense), ElasticLinear(lay.classifier), lay.head_activation,
                                       dropout=lay.classifier_dropout, input_dropout=lay.head_input_dropout)

    def _linear(self, layer: int, role: str, base: nn.Linear) -> ElasticLinear:
        key = self._lora_key(layer, role)
        lora = self.lora[key] if key in self.lora else None
        return ElasticLinear(base, lora, self.lora_scale, self.lora_dropout)

    # ---- configuration ----
    @staticmethod
    def _lora_key(layer: int, role: str) -> str:
        return f"layer{layer}_{role}"

    @property
    def family(self) -> str:
        return self._layout.family

    @property
    def is_causal_lm(self) -> bool:
        """Whether the model is a decoder with an LM head (logits [B, T, vocab]), not a sequence classifier."""
        return isinstance(self.head, LMHead)

    @property
    def max_config(self) -> SubnetConfig:
        return self._max

    @property
    def head_dim(self) -> int:
        return self._head_dim

    @property
    def sub_network(self) -> SubnetConfig:
        return self._current

    def _configure(self, cfg: SubnetConfig) -> None:
        """Push the sizes of `cfg` into the blocks it uses (layers it drops keep theirs, unread)."""
        h = cfg.hidden_size
        self.embeddings.set_sub_network(h)
        self.attention_inputs.set_sub_network(h, max(cfg.heads_per_layer()))
        for g, heads, ffn in zip(cfg.layers, cfg.heads_per_layer(), cfg.ffn_per_layer()):
            self.layers[g].set_sub_network(h, heads, ffn)
        self.head.set_sub_network(h)

    def set_sub_network(self, cfg: SubnetConfig) -> None:
        """Run later forwards as `cfg` (validated against the maxnet; ValueError if it is not a subnet)."""
        if not isinstance(cfg, SubnetConfig):
            raise TypeError(f"expected a SubnetConfig, got {type(cfg).__name__}")
        cfg.validate(self._max)
        self._configure(cfg)
        self._current = cfg

    def reset_super_network(self) -> None:
        self.set_sub_network(self._max)

    @contextmanager
    def _sized_as(self, cfg: SubnetConfig) -> Iterator[list[nn.Module]]:
        """The blocks `cfg` reads, sized as `cfg` (validated) while inside; the current subnet's sizes after."""
        cfg.validate(self._max)
        self._configure(cfg)
        try:
            yield [self.embeddings, self.attention_inputs, *(self.layers[g] for g in cfg.layers), self.head]
        finally:
            self._configure(self._current)

    def head_modules(self) -> list[nn.Linear]:
        return [m for m in (self._layout.head_dense, self._layout.classifier) if m is not None]

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
        for layer in self.layers:
            for role in self.lora_targets:
                layer.linear(role).add_stage(self.lora_r)
        return self.num_stages - 1

    def linear(self, layer: int, role: str) -> ElasticLinear:
        """The elastic projection of `role` in maxnet layer `layer`."""
        return self.layers[layer].linear(role)

    def adapters(self, layer: int, role: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The (A_s, B_s) pairs of one projection, oldest stage first ([] if not a LoRA target)."""
        return self.linear(layer, role).adapters()

    def linear_module(self, layer: int, role: str) -> nn.Linear:
        return self.linear(layer, role).base

    def merged_weight(self, layer: int, role: str, out_features: Optional[int] = None,
                      in_features: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Leading [out, in] slice (default: all) of W + Σ_s scale·B_s A_s (slice-then-merge) and the bias slice."""
        linear = self.linear(layer, role)
        return linear.merged_weight(linear.base.out_features if out_features is None else out_features,
                                    linear.base.in_features if in_features is None else in_features)

    def hidden_axes(self, adapters: bool = True) -> Axes:
        """(tensor, axis) for every axis that indexes the hidden (residual-stream) dimension."""
        blocks = [self.embeddings, self.attention_inputs, *self.layers, self.head]
        return [a for block in blocks for a in block.hidden_axes(adapters)]

    # ---- forward ----
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
    ) -> ElasticOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, attention_mask)
        attention_inputs = self.attention_inputs(x, attention_mask)
        hidden_states = [] if output_hidden_states else None
        for g in self._current.layers:
            x = self.layers[g](x, attention_inputs)
            if hidden_states is not None:
                hidden_states.append(x)
        return ElasticOutput(self.head(x), hidden_states)

    # ---- sizes ----
    def parameter_count(self, cfg: Optional[SubnetConfig] = None, trainable_only: bool = False) -> int:
        """Parameters subnet `cfg` (default: current) uses, counting sliced sizes.

        trainable_only=False counts the deployed model (LoRA merged into the base weights, so
        adapters add nothing): it equals the exported model's size when every layer's attention
        width heads × head size equals the hidden size and FFN widths are uniform (else the export
        zero-pads to those shapes). trainable_only=True counts trainable tensors actually read:
        the slices of trainable adapters (and of the head if it is trainable).
        """
        with self._sized_as(self._current if cfg is None else cfg) as blocks:
            return parameter_count(blocks, trainable_only)

    # ---- materialisation and export ----
    def _fingerprint(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict, reordering) bump a tensor's _version.
        return tuple((id(p), p._version) for p in self.parameters())

    def export_config(self, cfg: SubnetConfig, padded: bool = False):
        """The Hugging Face config of the plain model that `cfg` exports to; padded=True: with hidden/head-size
        heads, as every BERT-style export has (a Llama export keeps the subnet's own heads)."""
        cfg.validate(self._max)
        return self._family.subnet_config(self.model.config, cfg, self._head_dim, padded=padded)

    @torch.no_grad()
    def materialize(self, cfg: SubnetConfig) -> PreTrainedModel:
        """The plain HF model of `cfg`: weights physically sliced, all LoRA stages merged, eval mode.

        Cached per config until any parameter changes; treat the result as read-only (deepcopy it
        to modify). Layers with fewer heads/FFN neurons than the widest kept layer are zero-padded
        (exact: padded heads and neurons contribute nothing). BERT-style exports also pad every layer
        to hidden/head-size heads (their attention width must be the hidden size); Llama exports keep
        the subnet's own heads (their config carries the head size).
        """
        key = (cfg, self._fingerprint())
        if key in self._materialized:
            self._materialized.move_to_end(key)
            return self._materialized[key]
        new_config = self.export_config(cfg, padded=True)
        weight = self.model.get_input_embeddings().weight
        plain = type(self.model)(new_config).to(device=weight.device, dtype=weight.dtype)
        target = ElasticTransformer(plain, lora_targets=self.lora_targets)  # the same blocks over the plain model
        assigned: set[int] = set()  # storages written (a GPT-2 leaf writes a view of a Conv1D weight)

        def put(param: torch.Tensor, value: torch.Tensor) -> None:
            if any(v > p for v, p in zip(value.shape, param.shape)) or value.ndim != param.ndim:
                raise RuntimeError(f"cannot place a {tuple(value.shape)} slice into {tuple(param.shape)}")
            param.zero_()
            param[tuple(slice(0, s) for s in value.shape)].copy_(value)
            assigned.add(param.untyped_storage().data_ptr())

        with self._sized_as(cfg):
            # Written with hidden/head-size heads in every layer (padded ones included), each with its bias column;
            # a family whose config carries the head size then drops the padded heads (with_head_count).
            self.attention_inputs.set_sub_network(cfg.hidden_size, new_config.num_attention_heads)
            pairs = [(self.embeddings, target.embeddings), (self.attention_inputs, target.attention_inputs),
                     (self.head, target.head)]
            pairs += [(self.layers[g], target.layers[i]) for i, g in enumerate(cfg.layers)]
            for src, dst in pairs:
                for (name, leaf), (dst_name, dst_leaf) in zip(leaves(src), leaves(dst), strict=True):
                    assert name == dst_name, (name, dst_name)
                    for attr, value in leaf.sliced_state().items():
                        put(getattr(dst_leaf.base, attr), value)
        missing = [n for n, p in plain.named_parameters() if p.untyped_storage().data_ptr() not in assigned]
        if missing:
            raise RuntimeError(f"materialize left parameters of the {self.family} export unset: {missing[:5]}")
        compact_config = self.export_config(cfg)
        if compact_config.num_attention_heads != new_config.num_attention_heads:
            plain = with_head_count(plain, compact_config)
        if self.is_causal_lm:  # generate() as the maxnet would: its generation settings, padding with eos if it has no pad
            plain.generation_config = copy.deepcopy(self.model.generation_config)
            gen = plain.generation_config
            if gen.pad_token_id is None and gen.eos_token_id is not None:
                eos = gen.eos_token_id
                gen.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        plain.eval()
        for p in plain.parameters():
            p.requires_grad_(False)
        self._materialized[key] = plain
        while len(self._materialized) > 4:
            self._materialized.popitem(last=False)
        return plain

    def export_hf(self, cfg: SubnetConfig, out_dir: str | Path, tokenizer=None) -> Path:
        """Write subnet `cfg` as a standalone HF directory (plus ``subnet.json``), atomically, never
        over a directory that is not a previous kdlora export (`kdlora.io.write_export`)."""
        from kdlora.io import write_export

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


@torch.no_grad()
def with_head_count(plain: PreTrainedModel, config) -> PreTrainedModel:
    """`plain` rebuilt with `config`'s attention heads (fewer or more): every weight holds `plain`'s weight in
    its leading block, zeros elsewhere. Exact both ways: added heads are zero, and dropping heads is refused
    unless what is dropped is zero padding."""
    weight = plain.get_input_embeddings().weight
    resized = type(plain)(config).to(device=weight.device, dtype=weight.dtype)
    source = plain.state_dict()
    for name, param in resized.state_dict().items():
        value = source[name]
        if value.ndim != param.ndim:
            raise RuntimeError(f"{name} has {value.ndim} dimensions in the model, {param.ndim} with {config.num_attention_heads} heads")
        block = tuple(slice(0, min(a, b)) for a, b in zip(value.shape, param.shape))
        dropped = value.clone()
        dropped[block] = 0
        if dropped.any():
            raise RuntimeError(f"resizing to {config.num_attention_heads} heads would drop non-zero weights of {name} "
                               f"({tuple(value.shape)} -> {tuple(param.shape)})")
        param.zero_()
        param[block].copy_(value[block])
    return resized
