"""Sub-network configurations Φ of an elastic encoder and their validation.

A `SubnetConfig` names which leading slice of the maxnet a sub-network uses: hidden width h, the
first `num_heads` attention heads (head size fixed to the maxnet's), the first `intermediate_size`
FFN neurons, and which maxnet layers it keeps (the layer map g). Heads and FFN width may differ per
kept layer. Configs are plain frozen dataclasses: hashable (usable as cache keys) and convertible
to/from dicts and short names for logging and the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

IntOrTuple = Union[int, tuple[int, ...]]


def _as_int_or_tuple(value: Any) -> IntOrTuple:
    if isinstance(value, (list, tuple)):
        values = tuple(int(v) for v in value)
        return values[0] if values and all(v == values[0] for v in values) else values
    return int(value)


@dataclass(frozen=True)
class SubnetConfig:
    """Φ = (hidden size, heads, FFN width, kept layers); heads/FFN as one int or one value per kept layer."""

    hidden_size: int
    num_heads: IntOrTuple
    intermediate_size: IntOrTuple
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        # Normalise so equal configs compare (and hash) equal: (8, 8, 8) == 8, lists become tuples.
        object.__setattr__(self, "hidden_size", int(self.hidden_size))
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "num_heads", _as_int_or_tuple(self.num_heads))
        object.__setattr__(self, "intermediate_size", _as_int_or_tuple(self.intermediate_size))

    @property
    def depth(self) -> int:
        return len(self.layers)

    def heads_per_layer(self) -> tuple[int, ...]:
        """Number of heads of each kept layer (in subnet order)."""
        return self._per_layer(self.num_heads, "num_heads")

    def ffn_per_layer(self) -> tuple[int, ...]:
        """FFN intermediate size of each kept layer (in subnet order)."""
        return self._per_layer(self.intermediate_size, "intermediate_size")

    def _per_layer(self, value: IntOrTuple, what: str) -> tuple[int, ...]:
        if isinstance(value, int):
            return (value,) * len(self.layers)
        if len(value) != len(self.layers):
            raise ValueError(f"{what} has {len(value)} values but the subnet keeps {len(self.layers)} layers: {self}")
        return value

    @property
    def name(self) -> str:
        """Short stable id, e.g. ``h256-a4-f1024-l4`` (layers 0..3) or ``h256-a4.2-f512-l1.3``.

        Dotted lists are per-layer values (heads, FFN) or explicit maxnet layer indices; ``l<n>``
        means the first n layers and ``l.<k>`` the single layer k. `SubnetConfig.from_name` inverts it.
        """
        def fmt(v: IntOrTuple) -> str:
            return str(v) if isinstance(v, int) else ".".join(map(str, v))

        if self.layers == tuple(range(len(self.layers))):
            layers = str(len(self.layers))
        elif len(self.layers) == 1:  # "l3" would read as "the first 3 layers": mark it explicit
            layers = f".{self.layers[0]}"
        else:
            layers = fmt(self.layers)
        return f"h{self.hidden_size}-a{fmt(self.num_heads)}-f{fmt(self.intermediate_size)}-l{layers}"

    @classmethod
    def from_name(cls, name: str) -> "SubnetConfig":
        fields: dict[str, str] = {}
        for part in name.strip().split("-"):
            if len(part) < 2 or part[0] not in "hafl" or part[0] in fields:
                raise ValueError(f"bad subnet name {name!r}: expected e.g. 'h256-a4-f1024-l4' or 'h256-a4.2-f512-l1.3'")
            fields[part[0]] = part[1:]
        if set(fields) != set("hafl"):
            raise ValueError(f"bad subnet name {name!r}: needs h<hidden>-a<heads>-f<ffn>-l<layers>")
        explicit_single_layer = fields["l"].startswith(".")
        fields["l"] = fields["l"].lstrip(".")
        try:
            values = {k: tuple(int(x) for x in v.split(".")) for k, v in fields.items()}
        except ValueError:
            raise ValueError(f"bad subnet name {name!r}: values must be integers (dotted for per-layer lists)") from None
        layers = values["l"]
        if len(layers) == 1 and not explicit_single_layer:
            layers = tuple(range(layers[0]))
        return cls(values["h"][0], values["a"], values["f"], layers)

    def to_dict(self) -> dict[str, Any]:
        def plain(v: IntOrTuple):
            return v if isinstance(v, int) else list(v)

        return {"hidden_size": self.hidden_size, "num_heads": plain(self.num_heads),
                "intermediate_size": plain(self.intermediate_size), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubnetConfig":
        missing = {"hidden_size", "num_heads", "intermediate_size", "layers"} - set(d)
        if missing:
            raise ValueError(f"subnet config lacks {', '.join(sorted(missing))}: {d}")
        extra = set(d) - {"hidden_size", "num_heads", "intermediate_size", "layers", "name"}
        if extra:
            raise ValueError(f"unknown subnet config keys {', '.join(sorted(extra))}: {d}")
        return cls(d["hidden_size"], d["num_heads"], d["intermediate_size"], tuple(d["layers"]))

    @property
    def head_dim(self) -> int:
        """Head size, meaningful for a maxnet config (hidden / heads)."""
        return self.hidden_size // self.heads_per_layer()[0]

    def validate(self, max_config: "SubnetConfig") -> None:
        """Raise a ValueError naming the problem if this is not a sub-network of `max_config`.

        Besides the bounds, the attention width (heads × head size) must fit in the hidden width
        and the hidden width must be a whole number of heads: Hugging Face BERT-style models tie
        head size to hidden/heads, and every subnet must export as a plain model.
        """
        H, d, L = max_config.hidden_size, max_config.head_dim, len(max_config.layers)
        max_heads, max_ffn = max(max_config.heads_per_layer()), max(max_config.ffn_per_layer())
        prefix = f"subnet {self.name}:"
        if not self.layers:
            raise ValueError(f"{prefix} keeps no layers")
        bad = [i for i in self.layers if not 0 <= i < L]
        if bad:
            raise ValueError(f"{prefix} layer indices {bad} out of range for a {L}-layer maxnet")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"{prefix} layers {self.layers} must be strictly increasing maxnet indices")
        if not 0 < self.hidden_size <= H:
            raise ValueError(f"{prefix} hidden_size {self.hidden_size} not in 1..{H} (maxnet)")
        if self.hidden_size % d:
            raise ValueError(f"{prefix} hidden_size {self.hidden_size} is not a multiple of the head size {d}")
        heads, ffn = self.heads_per_layer(), self.ffn_per_layer()
        for a in heads:
            if not 0 < a <= max_heads:
                raise ValueError(f"{prefix} num_heads {a} not in 1..{max_heads} (maxnet)")
            if a * d > self.hidden_size:
                raise ValueError(
                    f"{prefix} {a} heads × head size {d} = {a * d} exceeds hidden_size {self.hidden_size}; "
                    f"at most {self.hidden_size // d} heads fit (plain HF models use head size = hidden/heads)"
                )
        for f in ffn:
            if not 0 < f <= max_ffn:
                raise ValueError(f"{prefix} intermediate_size {f} not in 1..{max_ffn} (maxnet)")


def evenly_spread_layers(num_max_layers: int, depth: int) -> tuple[int, ...]:
    """Default layer map g: `depth` maxnet layers spread evenly, always keeping the first and last.

    The last layer is kept because the classifier head was trained on its output; the first
    because it is the one closest to the embeddings. depth == num_max_layers keeps every layer,
    depth == 1 keeps only the last.
    """
    if not 0 < depth <= num_max_layers:
        raise ValueError(f"depth {depth} not in 1..{num_max_layers}")
    if depth == 1:
        return (num_max_layers - 1,)
    # round(i * (L-1) / (depth-1)) with halves rounded up, in exact integer arithmetic
    return tuple((2 * i * (num_max_layers - 1) + depth - 1) // (2 * (depth - 1)) for i in range(depth))


def maxnet_config(hf_config) -> SubnetConfig:
    """The full-size SubnetConfig of a Hugging Face config (BERT-style, DistilBERT or GPT-2 names)."""
    hidden = getattr(hf_config, "hidden_size", None) or hf_config.dim
    heads = getattr(hf_config, "num_attention_heads", None) or hf_config.n_heads
    ffn = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "hidden_dim", None)
    if ffn is None and getattr(hf_config, "model_type", None) == "gpt2":
        ffn = hf_config.n_inner or 4 * hidden  # GPT-2: n_inner, None meaning 4 × n_embd
    layers = getattr(hf_config, "num_hidden_layers", None) or hf_config.n_layers
    return SubnetConfig(int(hidden), int(heads), int(ffn), tuple(range(int(layers))))
