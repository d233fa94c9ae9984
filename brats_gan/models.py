"""The generator and critic of the poster (Tables I and II) as plain ``torch.nn.Module``s.

Nothing here knows about ranks, DeepSpeed or data: the trainer wraps these modules, the
``models`` subcommand prints them, and tests build them on one CPU thread.

Every architectural choice is a field of :class:`ModelConfig`, so a checkpoint that stores
``dataclasses.asdict(config)`` can rebuild its networks with ``ModelConfig(**saved)``.
The ``paper`` preset keeps every shape of the poster; where the poster's critic fights the
WGAN-GP loss (batch norm, ReLU, a final sigmoid) it deviates, and ``paper-faithful`` keeps
the poster's choices for comparison. The README section "The networks" gives the reasons.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

NORMS = ("batch", "layer", "none")
ACTIVATIONS = ("relu", "leaky_relu")
UPSAMPLES = ("transposed", "resize", "subpixel", "transposed-blur")
RESIZE_MODES = ("nearest", "bilinear")
GENERATOR_NORMS = ("batch", "none")
GENERATOR_OUTPUTS: dict[str, tuple[type[nn.Module], str]] = {"tanh": (nn.Tanh, "Tanh"),
                                                              "hardtanh": (nn.Hardtanh, "Hardtanh")}
NO_ACTIVATION = "—"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and layer choices of both networks; validated on construction.

    ``generator_widths[0]`` is the width of the reshaped fully-connected output; each further
    entry is the output width of one stride-2 upsampling layer, and one last upsampling layer
    maps to ``channels``. So the generator has ``len(generator_widths)`` upsampling layers and
    starts from ``image_size / 2**len(generator_widths)`` pixels square.
    ``critic_widths`` are the output widths of the stride-2 convolutions; the last
    ``critic_refine_last`` of them are each followed by a 3x3 stride-1 convolution of the same width.
    """

    image_size: int = 256
    channels: int = 3
    latent_dim: int = 128
    generator_widths: tuple[int, ...] = (1024, 512, 256, 128, 64, 32)
    generator_norm: str = "batch"
    generator_dropout: float = 0.1
    generator_last_width: int = 0  # output width of the last upsampling layer; 0: channels, as Table I
    generator_output: str = "tanh"
    upsample: str = "transposed"
    resize_mode: str = "nearest"
    critic_widths: tuple[int, ...] = (32, 64, 128, 156, 512, 1024)
    critic_refine_last: int = 3
    critic_norm: str = "layer"
    critic_activation: str = "leaky_relu"
    critic_sigmoid: bool = False
    critic_noise_std: float = 0.1
    critic_mbstd_group: int = 0  # minibatch standard deviation (Karras et al. 2018) over groups of N; 0: none
    leaky_slope: float = 0.2
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("generator_widths", "critic_widths"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"ModelConfig.{name} must be a sequence of positive ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))

        def check(name: str, ok: bool, must: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig.{name} must be {must}, got {getattr(self, name)!r}")

        def positive_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        check("image_size", positive_int(self.image_size), "a positive int")
        check("channels", positive_int(self.channels), "a positive int")
        check("latent_dim", positive_int(self.latent_dim), "a positive int")
        check("generator_widths", len(self.generator_widths) > 0 and all(map(positive_int, self.generator_widths)),
              "a non-empty sequence of positive ints")
        check("generator_widths", self.image_size % 2 ** len(self.generator_widths) == 0,
              f"short enough that image_size={self.image_size} halves {len(self.generator_widths)} times exactly")
        check("generator_norm", self.generator_norm in GENERATOR_NORMS, f"one of {GENERATOR_NORMS}")
        check("generator_dropout", isinstance(self.generator_dropout, (int, float))
              and 0.0 <= self.generator_dropout < 1.0, "a float in [0, 1)")
        check("generator_last_width", isinstance(self.generator_last_width, int)
              and not isinstance(self.generator_last_width, bool) and self.generator_last_width >= 0, "an int >= 0")
        check("generator_output", self.generator_output in GENERATOR_OUTPUTS, f"one of {tuple(GENERATOR_OUTPUTS)}")
        check("upsample", self.upsample in UPSAMPLES, f"one of {UPSAMPLES}")
        check("resize_mode", self.resize_mode in RESIZE_MODES, f"one of {RESIZE_MODES}")
        check("critic_widths", len(self.critic_widths) > 0 and all(map(positive_int, self.critic_widths)),
              "a non-empty sequence of positive ints")
        check("critic_widths", self.image_size % 2 ** len(self.critic_widths) == 0,
              f"short enough that image_size={self.image_size} halves {len(self.critic_widths)} times exactly")
        check("critic_refine_last", isinstance(self.critic_refine_last, int)
              and 0 <= self.critic_refine_last <= len(self.critic_widths),
              f"an int in [0, len(critic_widths)={len(self.critic_widths)}]")
        check("critic_norm", self.critic_norm in NORMS, f"one of {NORMS}")
        check("critic_activation", self.critic_activation in ACTIVATIONS, f"one of {ACTIVATIONS}")
        check("critic_sigmoid", isinstance(self.critic_sigmoid, bool), "a bool")
        check("critic_noise_std", isinstance(self.critic_noise_std, (int, float)) and self.critic_noise_std >= 0,
              "a float >= 0")
        check("critic_mbstd_group", isinstance(self.critic_mbstd_group, int) and self.critic_mbstd_group >= 0,
              "an int >= 0")
        check("leaky_slope", isinstance(self.leaky_slope, (int, float)) and 0 <= self.leaky_slope < 1,
              "a float in [0, 1)")
        check("init_std", isinstance(self.init_std, (int, float)) and self.init_std > 0, "a float > 0")

    @property
    def base_size(self) -> int:
        """Side of the generator's reshaped fully-connected output (4 for the poster)."""
        return self.image_size // 2 ** len(self.generator_widths)

    @property
    def critic_final_size(self) -> int:
        """Side of the critic's last feature map, flattened into its fully-connected layer."""
        return self.image_size // 2 ** len(self.critic_widths)


_PAPER = ModelConfig()
_TINY = dataclasses.replace(
    _PAPER, image_size=64, generator_widths=(64, 32, 16, 8), critic_widths=(8, 16, 32, 64)
)
_FAITHFUL_CRITIC = {"critic_norm": "batch", "critic_activation": "relu", "critic_sigmoid": True, "critic_noise_std": 0.2}

PRESETS: dict[str, ModelConfig] = {
    "paper": _PAPER,
    "paper-resize": dataclasses.replace(_PAPER, upsample="resize"),
    "paper-faithful": dataclasses.replace(_PAPER, **_FAITHFUL_CRITIC),
    "tiny": _TINY,
    "tiny-resize": dataclasses.replace(_TINY, upsample="resize"),
    "tiny-faithful": dataclasses.replace(_TINY, **_FAITHFUL_CRITIC),
}


def get_config(name_or_config: str | ModelConfig) -> ModelConfig:
    """A preset by name (or a config passed through), so callers accept either from users."""
    if isinstance(name_or_config, ModelConfig):
        return name_or_config
    try:
        return PRESETS[name_or_config]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model preset {name_or_config!r}; known presets: {', '.join(PRESETS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# building blocks


class Block(nn.Sequential):
    """One row of the poster's tables: its layers run in order, and ``label``/``activation``
    name the row in :func:`layer_table`. Named children keep state-dict keys readable."""

    def __init__(self, label: str, activation: str, **layers: nn.Module | None) -> None:
        super().__init__()
        self.label = label
        self.activation = activation
        for name, layer in layers.items():
            if layer is not None:
                self.add_module(name, layer)


class InstanceNoise(nn.Module):
    """Adds N(0, std²) to its input in training mode only (the poster's "noise samples added as
    input in every layer"; Sønderby et al. 2016). ``std`` may be changed between steps to anneal it."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + self.std * torch.randn_like(x)
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


class MinibatchStd(nn.Module):
    """One more feature map: the standard deviation of the features across a group of images (Karras et al.
    2018, ProGAN/StyleGAN), so the critic can see a batch with too little variety, which pushes the
    generator away from collapse. Groups of ``group`` images (fewer when the batch does not divide)."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = int(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = math.gcd(self.group, b)
        y = x.float().reshape(g, b // g, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean((1, 2, 3))  # (b // g,)
        y = y.to(x.dtype).reshape(1, b // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(b, 1, h, w)
        return torch.cat([x, y], 1)

    def extra_repr(self) -> str:
        return f"group={self.group}"


class SubPixelConv2d(nn.Conv2d):
    """Sub-pixel convolution (Shi et al. 2016): a 3x3 convolution to 4x the channels whose groups of four are
    rearranged into 2x2 pixel blocks (``PixelShuffle(2)``), so the layer doubles the side with no kernel
    overlap to leave uneven. :meth:`icnr_` (Aitken et al. 2017) initialises the four outputs of each channel
    alike, so that at initialisation the layer is a 3x3 convolution followed by nearest-neighbour upsampling:
    no checkerboard to unlearn."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, 4 * out_channels, 3, stride=1, padding=1, bias=bias)

    def icnr_(self, std: float) -> None:
        """ICNR: one N(0, std) sub-kernel per output channel, repeated for its four sub-pixel positions."""
        with torch.no_grad():
            sub = torch.empty(self.out_channels // 4, *self.weight.shape[1:], device=self.weight.device,
                              dtype=self.weight.dtype).normal_(0.0, std)
            self.weight.copy_(sub.repeat_interleave(4, dim=0))
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(super().forward(x), 2)


class Blur(nn.Module):
    """StyleGAN2's fixed low-pass FIR filter (Karras et al. 2020): the separable [1, 3, 3, 1] kernel, normalised
    to sum 1, applied to each channel alone. It has a zero at the 2-pixel period, so after a stride-2
    transposed convolution it removes the alternation that the kernel's uneven overlap leaves."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = torch.outer(taps, taps) / taps.sum() ** 2
        self.register_buffer("kernel", kernel.expand(channels, 1, 4, 4).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=x.shape[1])

    def extra_repr(self) -> str:
        return f"channels={self.kernel.shape[0]}, taps=[1, 3, 3, 1]"


def _upsampler(c: ModelConfig, w_in: int, w_out: int, bias: bool) -> tuple[str, dict[str, nn.Module | None]]:
    """One stride-2 upsampling layer of ``c.upsample``: its row label and its layers before the norm."""
    if c.upsample == "transposed":
        return _conv_label("T. Conv", 4), {"conv": nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1, bias=bias)}
    if c.upsample == "transposed-blur":  # StyleGAN2's: side 2n + 1, which the 4-tap filter brings to 2n, centred
        return (f"{_conv_label('T. Conv', 3)} + blur [1,3,3,1]",
                {"conv": nn.ConvTranspose2d(w_in, w_out, 3, stride=2, padding=0, bias=bias), "blur": Blur(w_out)})
    if c.upsample == "subpixel":
        return f"{_conv_label('Conv', 3)} + pixel shuffle × 2", {"conv": SubPixelConv2d(w_in, w_out, bias=bias)}
    return (f"Upsample × 2 + {_conv_label('Conv', 3)}",
            {"resize": nn.Upsample(scale_factor=2, mode=c.resize_mode),
             "conv": nn.Conv2d(w_in, w_out, 3, stride=1, padding=1, bias=bias)})


def _conv_label(kind: str, k: int) -> str:
    return f"{kind} {k} × {k}"


def _activation(name: str, slope: float) -> tuple[nn.Module, str]:
    if name == "leaky_relu":
        return nn.LeakyReLU(slope), "Leaky ReLU"
    return nn.ReLU(), "ReLU"


def _critic_norm(kind: str, channels: int) -> nn.Module | None:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return None


# --------------------------------------------------------------------------------------------
# the networks


class Generator(nn.Module):
    """Table I: z -> FC -> reshape -> stride-2 upsampling layers -> 3x3 layer + Tanh, in [-1, 1].

    Batch norm follows the FC and every upsampling layer (the poster's "initial seven layers");
    dropout follows each of those too, but not the output layer, where it would blank pixels
    the critic sees directly.
    """

    input_label = "Input noise"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.input_shape = (c.latent_dim, 1, 1)
        batch_norm = c.generator_norm == "batch"

        def dropout() -> nn.Module | None:
            return nn.Dropout(c.generator_dropout) if c.generator_dropout > 0 else None

        fc_features = c.generator_widths[0] * c.base_size**2
        self.fc = Block(
            "Fully-connected layer", NO_ACTIVATION,
            linear=nn.Linear(c.latent_dim, fc_features, bias=not batch_norm),
            norm=nn.BatchNorm1d(fc_features) if batch_norm else None,
            drop=dropout(),
        )
        self.reshape = Block(
            "Reshape", NO_ACTIVATION, unflatten=nn.Unflatten(1, (c.generator_widths[0], c.base_size, c.base_size))
        )
        last = c.generator_last_width or c.channels
        widths = (*c.generator_widths, last)
        self.up = nn.ModuleList()
        for w_in, w_out in itertools.pairwise(widths):
            label, layers = _upsampler(c, w_in, w_out, bias=not batch_norm)
            self.up.append(Block(
                label, "Leaky ReLU",
                **layers,
                norm=nn.BatchNorm2d(w_out) if batch_norm else None,
                act=nn.LeakyReLU(c.leaky_slope),
                drop=dropout(),
            ))
        # A stride-1 transposed conv is a conv with a flipped kernel, so the other upsamplings use a plain conv.
        transposed = c.upsample.startswith("transposed")
        out_conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(last, c.channels, 3, 1, 1)
        output, output_label = GENERATOR_OUTPUTS[c.generator_output]
        self.out = Block(_conv_label("T. Conv" if transposed else "Conv", 3), output_label, conv=out_conv, act=output())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` of shape (B, latent_dim) or (B, latent_dim, 1, 1) -> images (B, channels, S, S) in [-1, 1]."""
        h = self.reshape(self.fc(z.flatten(1)))
        for block in self.up:
            h = block(h)
        return self.out(h)


class Critic(nn.Module):
    """Table II: image -> stride-2 convs (with 3x3 stride-1 refinements at the end) -> FC -> one
    unbounded score per image, shape (B,). Instance noise is added to every layer's input in training."""

    input_label = "Input"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.input_shape = (c.channels, c.image_size, c.image_size)
        has_norm = c.critic_norm != "none"
        n = len(c.critic_widths)
        specs: list[tuple[int, int, int, int]] = []  # (in, out, kernel, stride)
        w_in = c.channels
        for i, w in enumerate(c.critic_widths):
            specs.append((w_in, w, 4, 2))
            if i >= n - c.critic_refine_last:
                specs.append((w, w, 3, 1))
            w_in = w
        self.convs = nn.ModuleList()
        for i, (w_in, w_out, k, s) in enumerate(specs):
            if c.critic_sigmoid and i == len(specs) - 1:
                act, act_name = nn.Sigmoid(), "Sigmoid"
            else:
                act, act_name = _activation(c.critic_activation, c.leaky_slope)
            self.convs.append(Block(
                _conv_label("Conv", k), act_name,
                noise=InstanceNoise(c.critic_noise_std),
                conv=nn.Conv2d(w_in, w_out, k, stride=s, padding=1, bias=not has_norm),
                norm=_critic_norm(c.critic_norm, w_out),
                act=act,
            ))
        mbstd = MinibatchStd(c.critic_mbstd_group) if c.critic_mbstd_group else None
        self.fc = Block(
            "Fully-connected layer" if mbstd is None else "Minibatch std + fully-connected layer", NO_ACTIVATION,
            noise=InstanceNoise(c.critic_noise_std),
            mbstd=mbstd,
            flatten=nn.Flatten(),
            linear=nn.Linear((c.critic_widths[-1] + (mbstd is not None)) * c.critic_final_size**2, 1),
        )

    @property
    def noise_std(self) -> float:
        """Instance-noise std of every layer; set it to anneal the noise during training."""
        return self._noises()[0].std

    @noise_std.setter
    def noise_std(self, std: float) -> None:
        if std < 0:
            raise ValueError(f"noise_std must be >= 0, got {std}")
        for m in self._noises():
            m.std = float(std)

    def _noises(self) -> list[InstanceNoise]:
        return [m for m in self.modules() if isinstance(m, InstanceNoise)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, channels, S, S) -> scores (B,)."""
        for block in self.convs:
            x = block(x)
        return self.fc(x).squeeze(1)


# --------------------------------------------------------------------------------------------
# construction and inspection


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """DCGAN initialisation (Radford et al. 2016): conv/linear weights ~ N(0, std), norm scales ~ N(1, std),
    biases 0. The poster's Chainer lineage uses the same Normal(0.02). Sub-pixel convolutions take ICNR's
    N(0, std) instead (:meth:`SubPixelConv2d.icnr_`)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
        if isinstance(m, SubPixelConv2d):
            m.icnr_(std)


def build_models(config: str | ModelConfig = "paper") -> tuple[Generator, Critic]:
    """Both networks of a preset or config, DCGAN-initialised from torch's global RNG, so the same
    ``torch.manual_seed`` gives the same weights on every rank."""
    c = get_config(config)
    generator, critic = Generator(c), Critic(c)
    init_weights(generator, c.init_std)
    init_weights(critic, c.init_std)
    return generator, critic


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def layer_table(module: nn.Module, input_shape: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The module as the poster's table: one row for the input and one per :class:`Block`, each
    ``{"layer", "activation", "output_shape", "parameters"}`` with shapes from a real forward pass
    (batch of one, eval mode, restored afterwards) so the table cannot drift from the code."""
    shape = tuple(input_shape if input_shape is not None else module.input_shape)
    rows: list[dict[str, Any]] = [
        {"layer": getattr(module, "input_label", "Input"), "activation": NO_ACTIVATION,
         "output_shape": shape, "parameters": 0}
    ]

    def record(block: Block, _inputs: Any, output: torch.Tensor) -> None:
        rows.append({"layer": block.label, "activation": block.activation,
                     "output_shape": tuple(output.shape[1:]), "parameters": count_parameters(block)})

    hooks = [m.register_forward_hook(record) for m in module.modules() if isinstance(m, Block)]
    was_training = module.training
    param = next(module.parameters(), None)
    kwargs = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    try:
        module.eval()
        module(torch.zeros(1, *shape, **kwargs))
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    return rows


class FlopCount(TorchDispatchMode):
    """Sum of torch's own FLOP formulas (``torch.utils.flop_counter``) over the ops run inside: convolutions,
    their backward and double backward, matrix products. ``FlopCounterMode`` without its module tracker,
    whose hooks refuse ``autograd.grad`` on a leaf, which the gradient penalty needs. The one FLOP counter
    of the project: :func:`flops_per_image` and ``benchmarks/train_step.py``'s MFU both use it."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.total += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def flops_per_image(config: str | ModelConfig = "paper") -> dict[str, int]:
    """Forward FLOPs of one image through each network (:class:`FlopCount` on the meta device, so nothing
    is computed). A training step costs about 3x a forward per pass, and the gradient penalty's double
    backward more; ``benchmarks/train_step.py`` counts the whole iteration with the same counter."""
    c = get_config(config)
    with torch.device("meta"):
        nets = {"generator": Generator(c), "critic": Critic(c)}
    counts: dict[str, int] = {}
    for name, net in nets.items():
        net.eval()
        with torch.no_grad(), FlopCount() as count:
            net(torch.zeros(1, *net.input_shape, device="meta"))
        counts[name] = int(count.total)
    return counts
