"""Elastic building blocks: modules that run as the leading slice of themselves.

Every block has `set_sub_network(...)` (the sizes the next forwards use) and `reset_super_network()`
(the full sizes), as whittle's elastic modules do. The slicing operator Π takes LEADING rows/columns:
a Linear reads `W[:out, :in]` plus the matching LoRA slices (A: leading input columns, B: leading
output rows), a norm normalises over the leading `width` features, attention keeps the leading heads
(head size fixed), an FFN the leading neurons. Blocks also own what follows from their slicing: the
merged weight, the used-parameter count, the slices an export copies, and the permutations
(heads, neurons, hidden features) that importance reordering applies.

The leaf blocks (`ElasticLinear`, `ElasticLayerNorm`, `ElasticRMSNorm`, `ElasticEmbedding`) are
views: they read the weights of a module they do not register (`base`), and a Linear the adapters
of a `LoraStages` it does not register either. The Hugging Face model and the encoder's adapter dict
stay the only owners, so state_dict keys (the names in checkpoints) do not depend on the blocks.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Axes = list[tuple[torch.Tensor, int]]  # (tensor, axis) pairs that index one dimension together

# Projections of one layer by family-neutral role name, and where `TransformerLayer` keeps each.
ROLE_PATHS = {"query": ("attention", "query"), "key": ("attention", "key"), "value": ("attention", "value"),
              "attention_output": ("attention", "output"), "intermediate": ("ffn", "intermediate"),
              "output": ("ffn", "output")}
ROLES = tuple(ROLE_PATHS)


def _view(module: nn.Module, name: str, target: Optional[nn.Module]) -> None:
    """Reference `target` from `module` without registering it (see the module docstring)."""
    module.__dict__[name] = target


@torch.no_grad()
def permute_axes(axes: Axes, index: torch.Tensor) -> None:
    """Make entry index[j] of every listed axis its new entry j (in place)."""
    for t, axis in axes:
        t.copy_(t.index_select(axis, index.to(t.device)))


def leaves(module: nn.Module) -> list[tuple[str, "Sliced"]]:
    """The leaf blocks under `module` (each once), by name."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, Sliced)]


def parameter_count(blocks: list[nn.Module], trainable_only: bool = False) -> int:
    """Parameters the leaf blocks under `blocks` read at their current sizes (a shared leaf counts once)."""
    unique = {id(m): m for b in blocks for _, m in leaves(b)}
    return sum(m.parameter_count(trainable_only) for m in unique.values())


class ConvView:
    """A Hugging Face `Conv1D` (weight [in, out], GPT-2) read as an `nn.Linear` (weight [out, in]), or
    part `part` of `parts` equal output blocks of it (GPT-2's fused c_attn: query, key, value).

    `weight` and `bias` are views built on each read (so they follow device moves and in-place
    updates): slicing, merging, export and permutation read and write the Conv1D's own tensors.
    """

    def __init__(self, conv: nn.Module, part: int = 0, parts: int = 1) -> None:
        if conv.weight.shape[1] % parts:
            raise ValueError(f"cannot split a Conv1D of {conv.weight.shape[1]} outputs into {parts} equal parts")
        self.conv, self.part, self.parts = conv, part, parts
        self.in_features, self.out_features = conv.weight.shape[0], conv.weight.shape[1] // parts

    def _columns(self) -> slice:
        return slice(self.part * self.out_features, (self.part + 1) * self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight[:, self._columns()].t()

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.conv.bias[self._columns()] if self.conv.bias is not None else None


class LoraStages(nn.Module):
    """The adapters of one projection: one (A_s, B_s) pair per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()


class Sliced(nn.Module):
    """A leaf block: reads the leading slices of the tensors of `base`."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        _view(self, "base", base)

    def slices(self) -> dict[str, tuple[int, ...]]:
        """Leading sizes read of each tensor of `base`, by attribute name."""
        raise NotImplementedError

    def sliced_state(self) -> dict[str, torch.Tensor]:
        """The slices read, by attribute name of `base` (what an export copies)."""
        return {n: getattr(self.base, n)[tuple(slice(0, s) for s in shape)] for n, shape in self.slices().items()}

    def parameter_count(self, trainable_only: bool = False) -> int:
        """Entries of `base` read (trainable_only: only of tensors that require grad)."""
        return sum(math.prod(shape) for n, shape in self.slices().items()
                   if not trainable_only or getattr(self.base, n).requires_grad)


class ElasticLinear(Sliced):
    """y = x W[:out, :in]ᵀ + b[:out] + Σ_s scale · (dropout(x) A_s[:, :in]ᵀ) B_s[:out]ᵀ.

    LoRA is hand-written rather than peft because adapters are sliced per sub-network and added
    in stages (MLFS): W_sup = W + Σ_s scale·B_s A_s, and adding a stage freezes the earlier ones.
    """

    def __init__(self, base: nn.Linear, lora: Optional[LoraStages] = None, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__(base)
        _view(self, "lora", lora)
        self.scale, self.dropout = scale, dropout
        self.reset_super_network()

    def set_sub_network(self, in_features: int, out_features: int) -> None:
        self.sub_in, self.sub_out = in_features, out_features

    def reset_super_network(self) -> None:
        self.set_sub_network(self.base.in_features, self.base.out_features)

    def adapters(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The (A_s, B_s) pairs, oldest stage first ([] without LoRA)."""
        return list(zip(self.lora.A, self.lora.B)) if self.lora is not None else []

    def add_stage(self, rank: int) -> None:
        """Freeze the existing stages and add (A, B) with B = 0, so the function is unchanged."""
        for p in list(self.lora.A) + list(self.lora.B):
            p.requires_grad_(False)
        w = self.base.weight
        A = torch.empty(rank, self.base.in_features, dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as peft / nn.Linear
        self.lora.A.append(nn.Parameter(A))
        self.lora.B.append(nn.Parameter(torch.zeros(self.base.out_features, rank, dtype=w.dtype, device=w.device)))

    def slices(self) -> dict[str, tuple[int, ...]]:
        shapes = {"weight": (self.sub_out, self.sub_in)}
        if self.base.bias is not None:
            shapes["bias"] = (self.sub_out,)
        return shapes

    def merged_weight(self, out_features: Optional[int] = None, in_features: Optional[int] = None
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Leading [out, in] slice (default: the current sizes) of W + Σ_s scale·B_s A_s, and the bias slice.

        Slice-then-merge: equal to slicing the merged weight, without forming the full one.
        """
        o = self.sub_out if out_features is None else out_features
        i = self.sub_in if in_features is None else in_features
        weight = self.base.weight[:o, :i]
        for A, B in self.adapters():
            weight = weight + self.scale * (B[:o] @ A[:, :i])
        return weight, (self.base.bias[:o] if self.base.bias is not None else None)

    def sliced_state(self) -> dict[str, torch.Tensor]:
        weight, bias = self.merged_weight()
        return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}

    def parameter_count(self, trainable_only: bool = False) -> int:
        """Deployed size (adapters merged) or, trainable_only, the trainable slices read, adapters included."""
        count = super().parameter_count(trainable_only)
        if trainable_only:
            for A, B in self.adapters():
                count += A.shape[0] * self.sub_in * A.requires_grad + self.sub_out * B.shape[1] * B.requires_grad
        return count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, i = self.sub_out, self.sub_in
        bias = self.base.bias[:o] if self.base.bias is not None else None
        y = F.linear(x, self.base.weight[:o, :i], bias)
        adapters = self.adapters()
        if adapters:
            xd = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
            for A, B in adapters:
                y = y + self.scale * F.linear(F.linear(xd, A[:, :i]), B[:o])
        return y

    def input_axes(self, adapters: bool = True) -> Axes:
        """Axes indexing the input features: weight columns (and A columns)."""
        return [(self.base.weight, 1)] + ([(A, 1) for A, _ in self.adapters()] if adapters else [])

    def output_axes(self, adapters: bool = True) -> Axes:
        """Axes indexing the output features: weight rows, bias (and B rows)."""
        axes = [(self.base.weight, 0)] + ([(self.base.bias, 0)] if self.base.bias is not None else [])
        return axes + ([(B, 0) for _, B in self.adapters()] if adapters else [])

    def permute_inputs(self, index: torch.Tensor) -> None:
        permute_axes(self.input_axes(), index)

    def permute_outputs(self, index: torch.Tensor) -> None:
        permute_axes(self.output_axes(), index)


class TiedLinear(ElasticLinear):
    """A projection whose weight is another leaf's table (a tied LM head reads the word embeddings):
    it reads no tensor of its own, so counts, exports and permutes nothing (the embedding does)."""

    def slices(self) -> dict[str, tuple[int, ...]]:
        return {}

    def sliced_state(self) -> dict[str, torch.Tensor]:
        return {}

    def input_axes(self, adapters: bool = True) -> Axes:
        return []

    def output_axes(self, adapters: bool = True) -> Axes:
        return []


class WidthSliced(Sliced):
    """A leaf whose tensors are cut along one feature axis to `width`: norms and embedding tables."""

    axis = 0  # the axis of `base.weight` that `width` cuts (its last axis, as for every tensor in `slices`)

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.reset_super_network()

    def set_sub_network(self, width: int) -> None:
        self.width = width

    def reset_super_network(self) -> None:
        self.set_sub_network(self.base.weight.shape[self.axis])

    def hidden_axes(self, adapters: bool = True) -> Axes:
        return [(getattr(self.base, n), len(shape) - 1) for n, shape in self.slices().items()]


class ElasticLayerNorm(WidthSliced):
    """LayerNorm over the leading `width` features (statistics of the slice, not of the full width)."""

    def slices(self) -> dict[str, tuple[int, ...]]:
        return {n: (self.width,) for n in ("weight", "bias") if getattr(self.base, n, None) is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.width
        return F.layer_norm(x, (w,), self.base.weight[:w], self.base.bias[:w], self.base.eps)


class ElasticRMSNorm(ElasticLayerNorm):
    """RMSNorm over the leading `width` features, computed as Hugging Face's Llama RMSNorm (in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = getattr(self.base, "variance_epsilon", None) or self.base.eps
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return self.base.weight[: self.width] * h.to(x.dtype)


class ElasticEmbedding(WidthSliced):
    """An embedding table read through its leading `width` columns (all rows)."""

    axis = 1

    def slices(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.base.weight.shape[0], self.width)}

    @property
    def table(self) -> torch.Tensor:
        return self.base.weight[:, : self.width]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table)


def _split_heads(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[B, T, heads·d] -> [B, heads, T, d]."""
    return t.view(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)


class AdditiveMask:
    """The padding (and, for decoders, causal) mask as an additive attention bias, plus an optional
    per-head bias [1, heads, T, T].

    Built once per forward and cached per dtype: autocast may run q/k/v in a lower precision, and
    the mask must follow (its -inf stand-in is the dtype's minimum).
    """

    def __init__(self, attention_mask: torch.Tensor, head_bias: Optional[torch.Tensor] = None, causal: bool = False) -> None:
        self.padded = attention_mask[:, None, None, :] == 0
        if causal:  # decoders: no position sees a later one
            seq = attention_mask.shape[1]
            self.padded = self.padded | torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).triu(1)
        self.head_bias = head_bias
        self._masks: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, dtype: torch.dtype, heads: int) -> torch.Tensor:
        if dtype not in self._masks:
            self._masks[dtype] = torch.zeros(self.padded.shape, dtype=dtype, device=self.padded.device).masked_fill(
                self.padded, torch.finfo(dtype).min)
        mask = self._masks[dtype]
        return mask if self.head_bias is None else mask + self.head_bias[:, :heads].to(dtype)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of [B, heads, T, d] by cos/sin [B, T, d] (rotate-half form, as Llama)."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos[:, None] + rotated * sin[:, None]


class ElasticAttention(nn.Module):
    """Multi-head attention on the leading heads, with grouped-query attention's shared key/value heads.

    Head size is fixed, so `heads` query heads read `heads·d` query rows and write `heads·d` output
    columns. The group size (query heads per key/value head) is the maxnet's, read from the
    projection widths (1 for encoders): query head j reads key/value head j // group, so a subnet
    keeps the leading ceil(heads / group) key/value heads.
    """

    def __init__(self, query: ElasticLinear, key: ElasticLinear, value: ElasticLinear, output: ElasticLinear,
                 head_dim: int, dropout: float = 0.0, output_dropout: float = 0.0) -> None:
        super().__init__()
        self.query, self.key, self.value, self.output = query, key, value, output
        self.head_dim, self.dropout, self.output_dropout = head_dim, dropout, output_dropout
        self.group = query.base.out_features // key.base.out_features
        self.reset_super_network()

    def set_sub_network(self, hidden_size: int, num_heads: int) -> None:
        d = self.head_dim
        self.num_heads, self.num_kv_heads = num_heads, -(-num_heads // self.group)
        self.query.set_sub_network(hidden_size, num_heads * d)
        for linear in (self.key, self.value):
            linear.set_sub_network(hidden_size, self.num_kv_heads * d)
        self.output.set_sub_network(num_heads * d, hidden_size)

    def reset_super_network(self) -> None:
        self.set_sub_network(self.output.base.out_features, self.query.base.out_features // self.head_dim)

    def forward(self, x: torch.Tensor, mask: AdditiveMask, rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> torch.Tensor:
        heads, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = _split_heads(self.query(x), heads, d)
        k = _split_heads(self.key(x), kv, d)
        v = _split_heads(self.value(x), kv, d)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.group > 1:
            k, v = (t.repeat_interleave(self.group, dim=1)[:, :heads] for t in (k, v))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask(q.dtype, heads),
                                                 dropout_p=self.dropout if self.training else 0.0, scale=d ** -0.5)
        context = context.transpose(1, 2).reshape(x.shape[0], x.shape[1], heads * d)
        return F.dropout(self.output(context), self.output_dropout, self.training)

    def head_rows(self) -> list[ElasticLinear]:
        """The projections whose output rows come in per-head blocks."""
        return [self.query, self.key, self.value]

    def permute_heads(self, order: torch.Tensor) -> None:
        """Make head order[j] the new head j: its rows of every per-head projection, its output columns.

        With grouped-query attention a query head must stay with the key/value head it reads, so `order`
        must move whole groups: new heads j·group … (j+1)·group − 1 all come from one old group, which
        becomes key/value head j (query heads may be reordered within it). Anything else: a ValueError.
        """
        d, g = self.head_dim, self.group
        order = torch.as_tensor(order, device=self.query.base.weight.device)
        heads = self.query.base.out_features // d
        if sorted(order.tolist()) != list(range(heads)):
            raise ValueError(f"a head order must be a permutation of the {heads} heads, got {order.tolist()}")
        groups = order.view(-1, g) // g
        if not bool((groups == groups[:, :1]).all()):
            raise ValueError(f"grouped-query attention ({g} query heads per key/value head) can only move whole "
                             f"groups of heads; order {order.tolist()} splits a group")

        def rows(head_order: torch.Tensor) -> torch.Tensor:
            return (head_order[:, None] * d + torch.arange(d, device=head_order.device)[None, :]).reshape(-1)

        self.query.permute_outputs(rows(order))
        self.output.permute_inputs(rows(order))
        for linear in (self.key, self.value):
            linear.permute_outputs(rows(groups[:, 0]))

    def hidden_axes(self, adapters: bool = True) -> Axes:
        axes = [a for linear in self.head_rows() for a in linear.input_axes(adapters)]
        return axes + self.output.output_axes(adapters)


class ElasticFFN(nn.Module):
    """output(act(intermediate(x))) on the leading neurons; with `gate`, SwiGLU-style output(act(gate(x)) · intermediate(x))."""

    def __init__(self, intermediate: ElasticLinear, output: ElasticLinear, activation: Callable[[torch.Tensor], torch.Tensor],
                 dropout: float = 0.0, gate: Optional[ElasticLinear] = None) -> None:
        super().__init__()
        self.intermediate, self.output, self.gate = intermediate, output, gate
        self.activation, self.dropout = activation, dropout
        self.reset_super_network()

    def inputs(self) -> list[ElasticLinear]:
        return [self.intermediate] + ([self.gate] if self.gate is not None else [])

    def set_sub_network(self, hidden_size: int, width: int) -> None:
        for linear in self.inputs():
            linear.set_sub_network(hidden_size, width)
        self.output.set_sub_network(width, hidden_size)

    def reset_super_network(self) -> None:
        self.set_sub_network(self.output.base.out_features, self.output.base.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            inner = self.activation(self.intermediate(x))
        else:
            inner = self.activation(self.gate(x)) * self.intermediate(x)
        return F.dropout(self.output(inner), self.dropout, self.training)

    def permute_neurons(self, order: torch.Tensor) -> None:
        """Make neuron order[j] the new neuron j (input-projection rows, output columns, adapters)."""
        for linear in self.inputs():
            linear.permute_outputs(order)
        self.output.permute_inputs(order)

    def hidden_axes(self, adapters: bool = True) -> Axes:
        return [a for linear in self.inputs() for a in linear.input_axes(adapters)] + self.output.output_axes(adapters)


class TransformerLayer(nn.Module):
    """A post-LN encoder layer: x = norm(attention(x) + x), then x = norm(ffn(x) + x)."""

    def __init__(self, attention: ElasticAttention, attention_norm: ElasticLayerNorm, ffn: ElasticFFN,
                 output_norm: ElasticLayerNorm) -> None:
        super().__init__()
        self.attention, self.attention_norm, self.ffn, self.output_norm = attention, attention_norm, ffn, output_norm

    def linear(self, role: str) -> ElasticLinear:
        """The projection of `role` (one of ROLES)."""
        block, name = ROLE_PATHS[role]
        return getattr(getattr(self, block), name)

    def set_sub_network(self, hidden_size: int, num_heads: int, intermediate_size: int) -> None:
        self.attention.set_sub_network(hidden_size, num_heads)
        self.attention_norm.set_sub_network(hidden_size)
        self.ffn.set_sub_network(hidden_size, intermediate_size)
        self.output_norm.set_sub_network(hidden_size)

    def reset_super_network(self) -> None:
        for block in (self.attention, self.attention_norm, self.ffn, self.output_norm):
            block.reset_super_network()

    def forward(self, x: torch.Tensor, attention_inputs: dict) -> torch.Tensor:
        x = self.attention_norm(self.attention(x, **attention_inputs) + x)
        return self.output_norm(self.ffn(x) + x)

    def hidden_axes(self, adapters: bool = True) -> Axes:
        return [a for block in (self.attention, self.attention_norm, self.ffn, self.output_norm)
                for a in block.hidden_axes(adapters)]


class PreNormLayer(TransformerLayer):
    """A pre-norm decoder layer (Llama, GPT-2): x = x + attention(norm(x)), then x = x + ffn(norm(x))."""

    def forward(self, x: torch.Tensor, attention_inputs: dict) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), **attention_inputs)
        return x + self.ffn(self.output_norm(x))


class DisentangledAttention(ElasticAttention):
    """DeBERTa-v2/v3 attention (as DisentangledSelfAttention): content-to-content plus content-to-position
    (c2p) and position-to-content (p2c) scores against shared relative embeddings.

    Position keys/queries come from their own projections, or (`share_att_key`) from this layer's
    key/query projections, LoRA included.
    """

    def __init__(self, query: ElasticLinear, key: ElasticLinear, value: ElasticLinear, output: ElasticLinear,
                 head_dim: int, *, pos_key: Optional[ElasticLinear], pos_query: Optional[ElasticLinear],
                 share_att_key: bool, c2p: bool, p2c: bool, dropout: float, output_dropout: float,
                 position_dropout: float) -> None:
        super().__init__(query, key, value, output, head_dim, dropout, output_dropout)
        self.pos_key, self.pos_query = pos_key, pos_query
        self.share_att_key, self.c2p, self.p2c, self.position_dropout = share_att_key, c2p, p2c, position_dropout
        self.reset_super_network()  # the position projections too, now that they are registered

    def position_projections(self) -> list[ElasticLinear]:
        return [m for n, m in self.named_children() if n in ("pos_key", "pos_query")]

    def set_sub_network(self, hidden_size: int, num_heads: int) -> None:
        super().set_sub_network(hidden_size, num_heads)
        for linear in self.position_projections():
            linear.set_sub_network(hidden_size, num_heads * self.head_dim)

    def head_rows(self) -> list[ElasticLinear]:
        return super().head_rows() + self.position_projections()

    def forward(self, x: torch.Tensor, keep: torch.Tensor, rel: torch.Tensor, c2p_index: torch.Tensor,
                p2c_index: torch.Tensor) -> torch.Tensor:
        heads, d, train = self.num_heads, self.head_dim, self.training
        batch, seq = x.shape[:2]
        rel = F.dropout(rel, self.position_dropout, train)
        q = _split_heads(self.query(x), heads, d)
        k = _split_heads(self.key(x), heads, d)
        v = _split_heads(self.value(x), heads, d)
        scale = math.sqrt(d * (1 + int(self.c2p) + int(self.p2c)))
        scores = q @ (k.transpose(-1, -2) / scale)
        if self.c2p:
            pos_key = _split_heads((self.key if self.share_att_key else self.pos_key)(rel[None]), heads, d)
            c2p = torch.gather(q @ pos_key.transpose(-1, -2), -1, c2p_index.expand(batch, heads, seq, seq))
            scores = scores + c2p / scale
        if self.p2c:
            pos_query = _split_heads((self.query if self.share_att_key else self.pos_query)(rel[None]), heads, d)
            p2c = torch.gather(k @ pos_query.transpose(-1, -2), -1, p2c_index.expand(batch, heads, seq, seq))
            scores = scores + p2c.transpose(-1, -2) / scale
        scores = scores.masked_fill(~keep, torch.finfo(q.dtype).min)
        probs = F.dropout(torch.softmax(scores, dim=-1), self.dropout, train)
        context = (probs @ v).transpose(1, 2).reshape(batch, seq, heads * d)
        return F.dropout(self.output(context), self.output_dropout, train)


class PaddingMask(nn.Module):
    """What every layer's attention reads besides x: here only the padding mask (absolute positions
    are embedded). Subclasses add relative positions."""

    shares_heads = False  # whether a table indexed by head is shared by all layers (one head order for all)

    def set_sub_network(self, hidden_size: int, num_heads: int) -> None:
        """`num_heads`: the most heads any kept layer has."""

    def reset_super_network(self) -> None:
        """Nothing is sliced."""

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"mask": AdditiveMask(attention_mask)}

    def hidden_axes(self, adapters: bool = True) -> Axes:
        return []


class RelativePositionBias(PaddingMask):
    """A learned bias per (relative-position bucket, head), shared by all layers (MPNet), added to the
    padding mask; layer heads read its leading columns."""

    shares_heads = True

    def __init__(self, table: ElasticEmbedding, buckets: Callable[[int, torch.device], torch.Tensor]) -> None:
        super().__init__()
        self.table, self.buckets = table, buckets

    def set_sub_network(self, hidden_size: int, num_heads: int) -> None:
        self.table.set_sub_network(num_heads)

    def reset_super_network(self) -> None:
        self.table.reset_super_network()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        bias = self.table(self.buckets(x.shape[1], x.device)).permute(2, 0, 1)[None]  # [1, heads, T, T]
        return {"mask": AdditiveMask(attention_mask, bias)}

    def permute_heads(self, order: torch.Tensor) -> None:
        permute_axes([(self.table.base.weight, 1)], order)


class CausalMask(PaddingMask):
    """Decoders with embedded positions (GPT-2): the padding mask plus the causal mask."""

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return {"mask": AdditiveMask(attention_mask, causal=True)}


class RotaryPositions(PaddingMask):
    """Decoders: a causal mask and the rotary cos/sin of each position, from the model's own rotary
    module (a view: it has no parameters, and rope scaling stays Hugging Face's). Head size is
    fixed, so slicing never changes the rotation."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        _view(self, "rotary", rotary)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        position_ids = torch.arange(x.shape[1], device=x.device)[None, :]
        return {"mask": AdditiveMask(attention_mask, causal=True), "rotary": self.rotary(x, position_ids)}


class DisentangledPositions(nn.Module):
    """DeBERTa-v2/v3 relative positions: the (normed) relative embeddings and the c2p/p2c gather indices."""

    shares_heads = False

    def __init__(self, embeddings: ElasticEmbedding, norm: Optional[ElasticLayerNorm], *, span: int,
                 position_buckets: int, max_relative_positions: int) -> None:
        super().__init__()
        self.embeddings, self.norm = embeddings, norm
        self.span, self.position_buckets, self.max_relative_positions = span, position_buckets, max_relative_positions

    def _norms(self) -> list[ElasticLayerNorm]:
        return [self.norm] if self.norm is not None else []

    def set_sub_network(self, hidden_size: int, num_heads: int) -> None:
        for block in [self.embeddings] + self._norms():
            block.set_sub_network(hidden_size)

    def reset_super_network(self) -> None:
        for block in [self.embeddings] + self._norms():
            block.reset_super_network()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

        keep = (attention_mask[:, None, :, None] * attention_mask[:, None, None, :]).bool()  # [B, 1, T, T]
        relative_pos = build_relative_position(x, x, self.position_buckets, self.max_relative_positions)[0]  # [T, T]
        rel = self.embeddings.table[: 2 * self.span]
        for norm in self._norms():
            rel = norm(rel)
        span = self.span
        return {"keep": keep, "rel": rel, "c2p_index": torch.clamp(relative_pos + span, 0, 2 * span - 1),
                "p2c_index": torch.clamp(-relative_pos + span, 0, 2 * span - 1)}

    def hidden_axes(self, adapters: bool = True) -> Axes:
        return self.embeddings.hidden_axes() + [a for norm in self._norms() for a in norm.hidden_axes()]


class Embeddings(nn.Module):
    """Word (+ position, + token type) embeddings, summed in the family's order, normed (encoders), dropped out."""

    def __init__(self, word: ElasticEmbedding, position: Optional[ElasticEmbedding], token_type: Optional[ElasticEmbedding],
                 norm: Optional[ElasticLayerNorm], *, dropout: float, position_padding_idx: Optional[int],
                 positions_first: bool, mask_padding: bool) -> None:
        super().__init__()
        self.word, self.position, self.token_type, self.norm = word, position, token_type, norm
        self.dropout, self.position_padding_idx = dropout, position_padding_idx
        self.positions_first, self.mask_padding = positions_first, mask_padding

    def blocks(self) -> list[Sliced]:
        return [b for b in (self.word, self.position, self.token_type, self.norm) if b is not None]

    def set_sub_network(self, hidden_size: int) -> None:
        for block in self.blocks():
            block.set_sub_network(hidden_size)

    def reset_super_network(self) -> None:
        for block in self.blocks():
            block.reset_super_network()

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor],
                attention_mask: torch.Tensor) -> torch.Tensor:
        if self.position_padding_idx is not None:  # RoBERTa/MPNet: pads keep padding_idx, positions count on from it
            keep = input_ids.ne(self.position_padding_idx).int()
            position_ids = (torch.cumsum(keep, dim=1).type_as(keep) * keep).long() + self.position_padding_idx
        else:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        summands = [(self.token_type, types), (self.position, position_ids)]  # the order HF sums in: rounding matches
        x = self.word(input_ids)
        for table, ids in (summands[::-1] if self.positions_first else summands):
            if table is not None:
                x = x + table(ids)
        if self.norm is not None:
            x = self.norm(x)
        if self.mask_padding:
            x = x * attention_mask[:, :, None].to(x.dtype)
        return F.dropout(x, self.dropout, self.training)

    def hidden_axes(self, adapters: bool = True) -> Axes:
        return [a for block in self.blocks() for a in block.hidden_axes()]


class ClassifierHead(nn.Module):
    """classifier(dropout(activation(dense(input_dropout(x[:, 0]))))): the BERT pooler, RoBERTa's
    dense-tanh head, DeBERTa's ContextPooler and DistilBERT's pre_classifier, by their dropouts and activation."""

    def __init__(self, dense: ElasticLinear, classifier: ElasticLinear, activation: Callable[[torch.Tensor], torch.Tensor],
                 *, dropout: float, input_dropout: float = 0.0) -> None:
        super().__init__()
        self.dense, self.classifier = dense, classifier
        self.activation, self.dropout, self.input_dropout = activation, dropout, input_dropout

    def set_sub_network(self, hidden_size: int) -> None:
        self.dense.set_sub_network(hidden_size, hidden_size)
        self.classifier.set_sub_network(hidden_size, self.classifier.base.out_features)

    def reset_super_network(self) -> None:
        self.set_sub_network(self.dense.base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.activation(self.dense(F.dropout(x[:, 0], self.input_dropout, self.training)))
        return self.classifier(F.dropout(z, self.dropout, self.training))

    def hidden_axes(self, adapters: bool = True) -> Axes:
        """The dense output is pooled hidden features: it shares the permutation with the classifier's input."""
        return self.dense.output_axes() + self.dense.input_axes() + self.classifier.input_axes()


class LMHead(nn.Module):
    """Decoders: the final norm, then the vocabulary projection at every position."""

    def __init__(self, norm: ElasticLayerNorm, projection: ElasticLinear) -> None:
        super().__init__()
        self.norm, self.projection = norm, projection

    def set_sub_network(self, hidden_size: int) -> None:
        self.norm.set_sub_network(hidden_size)
        self.projection.set_sub_network(hidden_size, self.projection.base.out_features)

    def reset_super_network(self) -> None:
        self.set_sub_network(self.projection.base.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.norm(x))

    def hidden_axes(self, adapters: bool = True) -> Axes:
        return self.norm.hidden_axes() + self.projection.input_axes()
