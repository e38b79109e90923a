"""A small model zoo described as data, so that untrusted callers can name a model to train.

A spec is a plain dict (it arrives from the wire), e.g.

    {"kind": "mlp", "sizes": [64, 128, 10], "activation": "relu"}
    {"kind": "cnn", "in_channels": 1, "image_size": 8, "channels": [16, 32], "classes": 10}
    {"kind": "autoencoder", "input_dim": 64, "hidden": [128, 64, 32], "bottleneck": 8}
    {"kind": "transformer", "vocab": 64, "context": 32, "width": 64, "layers": 2, "heads": 4}

`build_model(spec)` checks every field (unknown fields are rejected, sizes are bounded so a
spec cannot ask for a model that does not fit a worker) and raises ValueError naming the
field at fault. Every model is built from nn.Linear / nn.Conv2d so that K-FAC covers it.

Trusted callers may instead send their own module, as base64 text in the spec (the wire spec is
a protobuf Struct, which has no bytes type):

    {"kind": "torch_export", "program": "<base64 of torch.export.save(program)>"}
    {"kind": "pickle", "module": "<base64 of torch.save(module)>"}

Loading either runs the caller's code (torch.save is a pickle; a torch.export archive holds
pickled parts), so `build_model(spec, trusted=True)` is the only way in and anything short of
`trusted is True` is refused with UntrustedCodeError before the bytes are read: the same rule
as the objectives' (workers/objectives/_trusted.py). An exported program trains through
`program.module()`, a GraphModule holding the program's parameters under the original
module's names (so the weights load back into that module). What it cannot do: its graph is
fixed as exported (dropout and batch norm keep the mode they were exported in; train()/eval()
only set the flag), it holds no nn.Linear / nn.Conv2d modules (so no K-FAC, LoRA or
activation checkpointing: `check_code_model_plan` refuses them), and its batch dimension must
have been exported dynamic (`dynamic_shapes={"x": {0: torch.export.Dim("batch")}}`).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

# Bounds on what a caller may ask for: a spec is untrusted input.
MAX_WIDTH = 8192
MAX_DEPTH = 64
MAX_PARAMETERS = 50_000_000

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "identity": nn.Identity,
}


# ---------------------------------------------------------------- field checks


def _positive_int(owner: str, name: str, value: Any, *, upper: int = MAX_WIDTH) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an integer, got {value!r}")
    if not 1 <= value <= upper:
        raise ValueError(f"{owner}.{name} must be between 1 and {upper}, got {value}")
    return value


def _int_list(owner: str, name: str, value: Any, *, min_len: int) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{owner}.{name} must be a list of integers, got {value!r}")
    if not min_len <= len(value) <= MAX_DEPTH:
        raise ValueError(
            f"{owner}.{name} must have between {min_len} and {MAX_DEPTH} entries, "
            f"got {len(value)}"
        )
    return tuple(_positive_int(owner, f"{name}[{i}]", v) for i, v in enumerate(value))


def _activation(owner: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in ACTIVATIONS:
        raise ValueError(f"{owner}.{name} must be one of {sorted(ACTIVATIONS)}, got {value!r}")
    return value.lower()


def _probability(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}.{name} must be in [0, 1), got {value}")
    return float(value)


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class MLPSpec:
    """Fully connected net: sizes[0] inputs, sizes[-1] outputs, activation between layers."""

    sizes: tuple[int, ...]
    activation: str = "relu"

    @classmethod
    def parse(cls, raw: dict) -> MLPSpec:
        return cls(
            sizes=_int_list("mlp", "sizes", raw["sizes"], min_len=2),
            activation=_activation("mlp", "activation", raw.get("activation", "relu")),
        )


@dataclass(frozen=True)
class CNNSpec:
    """Small conv net for small images (8x8 digits): 3x3 convs, 2x2 max-pool after each
    conv while the image is larger than 2 pixels, then a linear classifier."""

    in_channels: int
    image_size: int
    channels: tuple[int, ...]
    classes: int
    activation: str = "relu"

    @classmethod
    def parse(cls, raw: dict) -> CNNSpec:
        return cls(
            in_channels=_positive_int("cnn", "in_channels", raw.get("in_channels", 1), upper=64),
            image_size=_positive_int("cnn", "image_size", raw["image_size"], upper=512),
            channels=_int_list("cnn", "channels", raw.get("channels", [16, 32]), min_len=1),
            classes=_positive_int("cnn", "classes", raw["classes"]),
            activation=_activation("cnn", "activation", raw.get("activation", "relu")),
        )


@dataclass(frozen=True)
class AutoencoderSpec:
    """The deep autoencoder of the K-FAC paper (Hinton & Salakhutdinov's
    784-1000-500-250-30 and mirror), scaled to the data: input_dim-hidden-bottleneck-
    reversed(hidden)-input_dim. The code layer is linear, as in the paper; the output is a
    logit: pair it with the `bce` loss (which applies the sigmoid, as the paper's logistic
    output units), or read it as a linear output with `mse`."""

    input_dim: int
    hidden: tuple[int, ...]
    bottleneck: int
    activation: str = "tanh"

    @classmethod
    def parse(cls, raw: dict) -> AutoencoderSpec:
        return cls(
            input_dim=_positive_int("autoencoder", "input_dim", raw["input_dim"]),
            hidden=_int_list("autoencoder", "hidden", raw.get("hidden", [128, 64, 32]),
                             min_len=0),
            bottleneck=_positive_int("autoencoder", "bottleneck", raw.get("bottleneck", 8)),
            activation=_activation("autoencoder", "activation", raw.get("activation", "tanh")),
        )


@dataclass(frozen=True)
class TransformerSpec:
    """Small GPT-style decoder: token + position embeddings, pre-LayerNorm blocks of causal
    self-attention and a 4x MLP, a linear head to vocab logits. Input (B, T) token ids,
    output (B, T, vocab) logits. Attention projections are nn.Linear so K-FAC sees them."""

    vocab: int
    context: int
    width: int
    layers: int
    heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0

    @classmethod
    def parse(cls, raw: dict) -> TransformerSpec:
        spec = cls(
            vocab=_positive_int("transformer", "vocab", raw["vocab"], upper=100_000),
            context=_positive_int("transformer", "context", raw["context"], upper=4096),
            width=_positive_int("transformer", "width", raw["width"]),
            layers=_positive_int("transformer", "layers", raw["layers"], upper=MAX_DEPTH),
            heads=_positive_int("transformer", "heads", raw["heads"], upper=256),
            mlp_ratio=_positive_int("transformer", "mlp_ratio", raw.get("mlp_ratio", 4),
                                    upper=16),
            dropout=_probability("transformer", "dropout", raw.get("dropout", 0.0)),
        )
        if spec.width % spec.heads:
            raise ValueError(
                f"transformer.heads must divide transformer.width, got width={spec.width} "
                f"heads={spec.heads}"
            )
        return spec


# Kinds whose spec carries the caller's code, and the field holding its base64 bytes.
CODE_KINDS = {"torch_export": "program", "pickle": "module"}


@dataclass(frozen=True)
class CodeModelSpec:
    """A caller's own module: `torch_export` (torch.export.save bytes of an ExportedProgram
    taking one batch tensor) or `pickle` (torch.save bytes of an nn.Module). Parsing only
    decodes the base64; loading is build_model(spec, trusted=True)."""

    kind: str
    blob: bytes

    @classmethod
    def parse(cls, raw: dict) -> CodeModelSpec:
        kind = raw["kind"]
        name = CODE_KINDS[kind]
        unknown = sorted(set(raw) - {"kind", name})
        if unknown:
            raise ValueError(f"{kind}: unknown field(s) {unknown}; known fields: "
                             f"{sorted({'kind', name})}")
        if name not in raw:
            raise ValueError(f"{kind}.{name} is required (base64 of the module's bytes)")
        text = raw[name]
        if not isinstance(text, str) or not text:
            raise ValueError(f"{kind}.{name} must be base64 text, got {type(text).__name__}")
        try:
            blob = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{kind}.{name} is not valid base64") from None
        return cls(kind, blob)


_SPECS: dict[str, type] = {
    "mlp": MLPSpec,
    "cnn": CNNSpec,
    "autoencoder": AutoencoderSpec,
    "transformer": TransformerSpec,
}


ModelSpec = MLPSpec | CNNSpec | AutoencoderSpec | TransformerSpec | CodeModelSpec


def parse_model_spec(spec: Any) -> ModelSpec:
    """Checks a model spec dict; raises ValueError naming the field at fault. Loads nothing:
    a code model's bytes are only decoded."""
    if not isinstance(spec, dict):
        raise ValueError(f"model spec must be a dict, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind in CODE_KINDS:
        return CodeModelSpec.parse(spec)
    if kind not in _SPECS:
        raise ValueError(f"model.kind must be one of {sorted(_SPECS)} (or, from trusted "
                         f"callers, {sorted(CODE_KINDS)}), got {kind!r}")
    spec_cls = _SPECS[kind]
    known = {f.name for f in fields(spec_cls)} | {"kind"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{kind}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    try:
        return spec_cls.parse(spec)
    except KeyError as exc:
        raise ValueError(f"{kind}.{exc.args[0]} is required") from exc


# ---------------------------------------------------------------- modules


def _mlp_layers(sizes: tuple[int, ...], activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return layers


def _build_cnn(spec: CNNSpec) -> nn.Module:
    layers: list[nn.Module] = []
    channels, size = spec.in_channels, spec.image_size
    for out_channels in spec.channels:
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1),
                   ACTIVATIONS[spec.activation]()]
        if size > 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = out_channels
    layers += [nn.Flatten(), nn.Linear(channels * size * size, spec.classes)]
    return _ImageInput(nn.Sequential(*layers), spec.in_channels, spec.image_size)


class _ImageInput(nn.Module):
    """Accepts flat rows (N, C*H*W), as digits comes, as well as (N, C, H, W) images."""

    def __init__(self, body: nn.Module, channels: int, size: int) -> None:
        super().__init__()
        self.body, self.channels, self.size = body, channels, size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], self.channels, self.size, self.size)
        return self.body(x)


def _build_autoencoder(spec: AutoencoderSpec) -> nn.Module:
    encoder_sizes = (spec.input_dim, *spec.hidden, spec.bottleneck)
    decoder_sizes = tuple(reversed(encoder_sizes))
    # The code layer is linear (no activation after the encoder's last Linear), as in the paper.
    return nn.Sequential(
        *_mlp_layers(encoder_sizes, spec.activation),
        *_mlp_layers(decoder_sizes, spec.activation),
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class TransformerBlock(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width)
        self.attention = CausalSelfAttention(spec.width, spec.heads, spec.dropout)
        self.norm2 = nn.LayerNorm(spec.width)
        self.mlp = nn.Sequential(
            nn.Linear(spec.width, spec.mlp_ratio * spec.width),
            nn.GELU(),
            nn.Linear(spec.mlp_ratio * spec.width, spec.width),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.context = spec.context
        self.token_embedding = nn.Embedding(spec.vocab, spec.width)
        self.position_embedding = nn.Embedding(spec.context, spec.width)
        self.blocks = nn.ModuleList(TransformerBlock(spec) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(spec.width)
        self.head = nn.Linear(spec.width, spec.vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context:
            raise ValueError(
                f"transformer input must be (batch, length <= {self.context}) token ids, "
                f"got shape {tuple(tokens.shape)}"
            )
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _parameter_count(spec: Any) -> int:
    """Counted before building, so an oversized spec is refused without allocating it."""
    if isinstance(spec, MLPSpec):
        sizes = spec.sizes
        return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    if isinstance(spec, AutoencoderSpec):
        sizes = (spec.input_dim, *spec.hidden, spec.bottleneck)
        return 2 * sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    if isinstance(spec, CNNSpec):
        chans = (spec.in_channels, *spec.channels)
        conv = sum((9 * a + 1) * b for a, b in zip(chans[:-1], chans[1:], strict=True))
        return conv + spec.channels[-1] * spec.image_size**2 * spec.classes
    w = spec.width
    block = 4 * w * w + 2 * spec.mlp_ratio * w * w
    return spec.layers * block + (spec.vocab + spec.context) * w + w * spec.vocab


def is_code_model(spec: Any) -> bool:
    """Whether a model spec carries the caller's code (torch_export, pickle)."""
    return isinstance(spec, dict) and spec.get("kind") in CODE_KINDS


def build_model(spec: dict, *, trusted: bool = False) -> nn.Module:
    """Builds the model a spec dict describes (see the module docstring for the kinds). A
    code model (torch_export, pickle) loads only with `trusted=True`; otherwise
    UntrustedCodeError (a PermissionError) before its bytes are read."""
    parsed = parse_model_spec(spec)
    if isinstance(parsed, CodeModelSpec):
        return load_code_model(parsed, trusted=trusted)
    count = _parameter_count(parsed)
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{spec['kind']}: about {count:,} parameters, more than the limit of "
            f"{MAX_PARAMETERS:,}"
        )
    if isinstance(parsed, MLPSpec):
        return nn.Sequential(*_mlp_layers(parsed.sizes, parsed.activation))
    if isinstance(parsed, CNNSpec):
        return _build_cnn(parsed)
    if isinstance(parsed, AutoencoderSpec):
        return _build_autoencoder(parsed)
    return GPT(parsed)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- caller code (trusted only)


def load_code_model(spec: CodeModelSpec, *, trusted: bool = False) -> nn.Module:
    """The caller's module, checked: an nn.Module with trainable parameters (at most
    MAX_PARAMETERS). Refuses (UntrustedCodeError) before reading the bytes unless `trusted is
    True` (`is`, not truthiness: a stray non-empty value must not unlock code). ValueError
    naming `<kind>.<field>` for bytes that do not load or a module that cannot train.
    Cost: deserializing the bytes (their size, plus the parameters)."""
    from workers.objectives import UntrustedCodeError

    field = CODE_KINDS[spec.kind]
    if trusted is not True:
        raise UntrustedCodeError(
            f"model.kind {spec.kind!r}: loading the caller's module runs its code; it is "
            "allowed only for trusted callers on a server started to allow it"
        )
    if spec.kind == "torch_export":
        module = _load_exported(spec.blob)
    else:
        try:
            module = torch.load(io.BytesIO(spec.blob), weights_only=False, map_location="cpu")
        except Exception as exc:  # any failure of a foreign pickle is the caller's problem
            raise ValueError(f"pickle.module: not a loadable torch.save payload "
                             f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(module, nn.Module):
            raise ValueError(f"pickle.module: the payload is a {type(module).__name__}, not a "
                             f"torch.nn.Module; torch.save the module itself")
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"{spec.kind}.{field}: the module has no trainable parameters")
    if parameter_count(module) > MAX_PARAMETERS:
        raise ValueError(f"{spec.kind}.{field}: {parameter_count(module):,} parameters, more "
                         f"than the limit of {MAX_PARAMETERS:,}")
    return module


def _load_exported(blob: bytes) -> nn.Module:
    """program.module() of a torch.export archive, made trainable: one tensor input whose
    first (batch) dimension is dynamic; train()/eval() set the flag only (the graph keeps the
    mode it was exported in)."""
    import torch.export

    try:
        program = torch.export.load(io.BytesIO(blob))
    except Exception as exc:
        raise ValueError(f"torch_export.program: not a loadable torch.export archive "
                         f"({type(exc).__name__}: {exc}); save it with torch.export.save("
                         f"torch.export.export(module, (x,), dynamic_shapes=...), buffer)"
                         ) from exc
    inputs = [node for node in program.graph.nodes if node.op == "placeholder"
              and node.name in set(program.graph_signature.user_inputs)]
    if len(inputs) != 1:
        raise ValueError(f"torch_export.program: the program must take one input (a batch of "
                         f"X rows), it takes {len(inputs)}")
    example = inputs[0].meta.get("val")
    if not isinstance(example, Tensor) or example.dim() < 1:
        raise ValueError("torch_export.program: the program's input must be a tensor with a "
                         "batch dimension")
    if isinstance(example.shape[0], int):
        raise ValueError(f"torch_export.program: the batch dimension was exported fixed at "
                         f"{example.shape[0]}; export with dynamic_shapes={{'x': {{0: "
                         f"torch.export.Dim('batch')}}}} (the name of forward's argument)")
    module = program.module()
    # ExportedProgram.module() replaces train()/eval() with methods that raise; nn.Module's
    # own only set the flag here (the graph's ops do not read it), which the loop relies on.
    for name in ("train", "eval"):
        if name in vars(module):
            delattr(module, name)
    return module


def check_code_model_plan(spec: dict, *, optimizer: str, lora: bool,
                          activation_checkpointing: bool, zero_stage: int = 0) -> None:
    """ValueError for what an exported program cannot do: it has no nn.Linear / nn.Conv2d
    modules for K-FAC or LoRA, no layers to checkpoint, and no submodule forwards for ZeRO-3
    (FSDP2 gathers a submodule's parameters when its forward runs; the flat graph reads them
    directly, measured: "got mixed torch.Tensor and DTensor"). A pickled module can, when its
    layers are those modules (loop.check_model_plan checks it once loaded)."""
    if not isinstance(spec, dict) or spec.get("kind") != "torch_export":
        return
    clashes = [(optimizer == "kfac", "optimizer kfac needs nn.Linear / nn.Conv2d modules"),
               (lora, "scaling.lora adapts nn.Linear modules"),
               (activation_checkpointing, "scaling.activation_checkpointing needs the zoo's "
                "layers"),
               (zero_stage == 3, "scaling.zero_stage 3 gathers parameters in submodule "
                "forwards")]
    for clash, message in clashes:
        if clash:
            raise ValueError(f"{message}, which an exported program (a flat graph) does not "
                             f"have; send the module pickled (kind 'pickle') instead")


__all__ = [
    "ACTIVATIONS",
    "CODE_KINDS",
    "GPT",
    "AutoencoderSpec",
    "CNNSpec",
    "CodeModelSpec",
    "MLPSpec",
    "ModelSpec",
    "TransformerSpec",
    "build_model",
    "check_code_model_plan",
    "is_code_model",
    "load_code_model",
    "parameter_count",
    "parse_model_spec",
]
