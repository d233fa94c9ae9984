"""The networks match the poster's tables, produce what the trainer expects, and the CLI prints them."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from conftest import run_cli

from brats_gan.commands import main as cli_main
from brats_gan.models import (
    PRESETS,
    ModelConfig,
    build_models,
    count_parameters,
    flops_per_image,
    get_config,
    layer_table,
)

# Table I of the poster, row by row: (layer, activation, output shape).
TABLE_I = [
    ("Input noise", "—", (128, 1, 1)),
    ("Fully-connected layer", "—", (16384,)),
    ("Reshape", "—", (1024, 4, 4)),
    ("T. Conv 4 × 4", "Leaky ReLU", (512, 8, 8)),
    ("T. Conv 4 × 4", "Leaky ReLU", (256, 16, 16)),
    ("T. Conv 4 × 4", "Leaky ReLU", (128, 32, 32)),
    ("T. Conv 4 × 4", "Leaky ReLU", (64, 64, 64)),
    ("T. Conv 4 × 4", "Leaky ReLU", (32, 128, 128)),
    ("T. Conv 4 × 4", "Leaky ReLU", (3, 256, 256)),
    ("T. Conv 3 × 3", "Tanh", (3, 256, 256)),
]

# Table II of the poster.
TABLE_II = [
    ("Input", "—", (3, 256, 256)),
    ("Conv 4 × 4", "ReLU", (32, 128, 128)),
    ("Conv 4 × 4", "ReLU", (64, 64, 64)),
    ("Conv 4 × 4", "ReLU", (128, 32, 32)),
    ("Conv 4 × 4", "ReLU", (156, 16, 16)),
    ("Conv 3 × 3", "ReLU", (156, 16, 16)),
    ("Conv 4 × 4", "ReLU", (512, 8, 8)),
    ("Conv 3 × 3", "ReLU", (512, 8, 8)),
    ("Conv 4 × 4", "ReLU", (1024, 4, 4)),
    ("Conv 3 × 3", "Sigmoid", (1024, 4, 4)),
    ("Fully-connected layer", "—", (1,)),
]


@pytest.fixture(scope="module")
def paper_models():
    torch.manual_seed(0)
    return build_models("paper")


def rows_of(table, keys=("layer", "activation", "output_shape")):
    return [tuple(row[k] for k in keys) for row in table]


def test_paper_generator_is_table_I(paper_models):
    generator, _ = paper_models
    assert rows_of(layer_table(generator)) == TABLE_I


def test_paper_critic_has_table_II_layers_and_shapes(paper_models):
    _, critic = paper_models
    assert rows_of(layer_table(critic), ("layer", "output_shape")) == [(layer, shape) for layer, _, shape in TABLE_II]


def test_paper_faithful_critic_is_table_II_including_activations():
    _, critic = build_models("paper-faithful")
    assert rows_of(layer_table(critic)) == TABLE_II
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in critic.modules())


def test_table_parameter_column_adds_up_to_the_model(paper_models):
    for net in paper_models:
        assert sum(r["parameters"] for r in layer_table(net)) == count_parameters(net)
        assert net.training, "layer_table must leave the module in the mode it found it"


@pytest.mark.parametrize("preset", ["tiny", "tiny-resize", "tiny-faithful", "paper"])
def test_generator_makes_images_in_tanh_range(preset):
    torch.manual_seed(0)
    generator, _ = build_models(preset)
    size = PRESETS[preset].image_size
    images = generator(torch.randn(4, 128))
    assert images.shape == (4, 3, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0, "a constant image means the network is dead"
    assert not torch.allclose(images[0], images[1]), "different noise must give different images"
    assert generator(torch.randn(4, 128, 1, 1)).shape == images.shape, "the poster's 128 × 1 × 1 noise also works"


@pytest.mark.parametrize("preset", ["tiny", "tiny-faithful", "paper"])
def test_critic_gives_one_score_per_image(preset):
    torch.manual_seed(0)
    generator, critic = build_models(preset)
    images = generator(torch.randn(3, 128)).detach()
    scores = critic(images)
    assert scores.shape == (3,)
    assert torch.isfinite(scores).all()


def test_default_critic_scores_each_image_independently_of_its_batch():
    """Why the default critic has no batch norm: the gradient penalty needs per-sample scores."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    _, critic = build_models("tiny")
    critic.noise_std = 0.0
    assert torch.allclose(critic(images)[:1], critic(images[:1]), atol=1e-6)
    _, faithful = build_models("tiny-faithful")
    faithful.noise_std = 0.0
    assert not torch.allclose(faithful(images)[:1], faithful(images[:1]), atol=1e-6)


def test_instance_noise_only_in_training_and_can_be_annealed():
    torch.manual_seed(0)
    _, critic = build_models("tiny")
    images = torch.zeros(2, 3, 64, 64)
    assert critic.noise_std == PRESETS["tiny"].critic_noise_std > 0
    assert not torch.equal(critic(images), critic(images)), "training-mode scores carry instance noise"
    critic.eval()
    assert torch.equal(critic(images), critic(images))
    critic.train()
    critic.noise_std = 0.0
    assert torch.equal(critic(images), critic(images))


@pytest.mark.parametrize("base", ["paper", "tiny"])
def test_resize_variant_keeps_every_shape_and_drops_transposed_convs(base):
    plain, _ = build_models(base)
    resize, _ = build_models(f"{base}-resize")
    plain_rows, resize_rows = layer_table(plain), layer_table(resize)
    assert [r["output_shape"] for r in resize_rows] == [r["output_shape"] for r in plain_rows]
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in resize.modules())
    assert resize_rows[3]["layer"] == "Upsample × 2 + Conv 3 × 3"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 0),
        ("latent_dim", -1),
        ("generator_widths", ()),
        ("generator_widths", (64, 32, 16, 8, 4, 2, 1)),  # 64 px cannot halve 7 times
        ("generator_dropout", 1.0),
        ("critic_widths", (8, 16, 32, 64, 128, 256, 512)),
        ("critic_refine_last", 9),
        ("critic_norm", "instance"),
        ("critic_activation", "gelu"),
        ("critic_sigmoid", "yes"),
        ("critic_noise_std", -0.1),
        ("upsample", "pixelshuffle"),
        ("resize_mode", "bicubic"),
        ("leaky_slope", 1.5),
    ],
)
def test_config_validation_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        dataclasses.replace(PRESETS["tiny"], **{field: value})


def test_config_round_trips_through_json_as_a_checkpoint_would_store_it():
    config = PRESETS["paper-resize"]
    assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="paper.*tiny"):
        get_config("papr")
    assert get_config(PRESETS["tiny"]) is PRESETS["tiny"]


def test_same_seed_builds_identical_weights_and_another_seed_does_not():
    def weights(seed):
        torch.manual_seed(seed)
        g, d = build_models("tiny")
        return {**g.state_dict(), **{f"critic.{k}": v for k, v in d.state_dict().items()}}

    a, b, c = weights(1), weights(1), weights(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    conv = a["up.0.conv.weight"]
    assert abs(conv.mean()) < 0.005 and abs(conv.std() - 0.02) < 0.005, "DCGAN init N(0, 0.02)"


def test_flops_match_the_hand_count_of_table_I():
    macs = (
        128 * 16384  # fully connected
        + sum(h * h * c_in * c_out * 16 for h, c_in, c_out in
              [(4, 1024, 512), (8, 512, 256), (16, 256, 128), (32, 128, 64), (64, 64, 32), (128, 32, 3)])
        + 256 * 256 * 3 * 3 * 9  # final 3x3
    )
    flops = flops_per_image("paper")
    assert flops["generator"] == 2 * macs
    assert flops["critic"] > flops["generator"] > 0


def test_tiny_preset_is_fast_enough_for_cpu_tests():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator, critic = build_models("tiny")
        z = torch.randn(8, 128)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            critic(generator(z)).mean().backward()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.5, f"tiny forward+backward of 8 took {best * 1000:.0f} ms"


def test_cli_prints_both_tables_with_totals(capsys, paper_models):
    assert cli_main(["models", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "1024 × 4 × 4" in out and "3 × 256 × 256" in out and "T. Conv 4 × 4" in out
    generator, critic = paper_models
    assert f"{count_parameters(generator):,}" in out and f"{count_parameters(critic):,}" in out


def test_cli_json_has_the_documented_form():
    result = run_cli("models", "--preset", "paper", "--json", timeout=120, ok=True)
    data = json.loads(result.stdout)
    assert set(data) == {"generator", "discriminator"}
    for rows in data.values():
        assert all(set(row) == {"layer", "activation", "output_shape"} for row in rows)
    assert [(r["layer"], r["activation"], tuple(r["output_shape"])) for r in data["generator"]] == TABLE_I
    assert [tuple(r["output_shape"]) for r in data["discriminator"]] == [s for _, _, s in TABLE_II]


def test_cli_unknown_preset_exits_2_with_the_presets():
    result = run_cli("models", "--preset", "huge", timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "'huge'" in message and "paper" in message and "tiny" in message


# --------------------------------------------------------------------------------------------
# upsampling without the grid (issue 19)

GRID_FREE = ("subpixel", "transposed-blur", "resize")


def _untrained_checkerboard(upsample: str, seed: int) -> float:
    import brats_gan.metrics as M

    torch.manual_seed(seed)
    generator, _ = build_models(dataclasses.replace(PRESETS["tiny"], upsample=upsample))
    generator.eval()
    with torch.no_grad():
        images = generator(torch.randn(32, 128, generator=torch.Generator().manual_seed(9)))
    return M.checkerboard_score(images)


@pytest.mark.parametrize("seed", [0, 1])
def test_untrained_grid_free_generators_show_no_grid_where_the_transposed_one_does(seed):
    """What a user would see in the first samples: the poster's transposed convolutions start with a grid
    of 17-21 dB (the real phantoms: 1.2 dB); the other upsamplings start within a few dB of 0."""
    transposed = _untrained_checkerboard("transposed", seed)
    assert transposed > 10.0
    for upsample in GRID_FREE:
        score = _untrained_checkerboard(upsample, seed)
        assert score < 5.0 and score < transposed - 10.0, (upsample, score, transposed)


@pytest.mark.parametrize("upsample", ["subpixel", "transposed-blur"])
@pytest.mark.parametrize("base", ["tiny", "paper"])
def test_grid_free_upsampling_keeps_every_shape_of_table_I(base, upsample):
    poster = dataclasses.replace(PRESETS[base], upsample="transposed")
    plain, _ = build_models(poster)
    other, _ = build_models(dataclasses.replace(poster, upsample=upsample))
    plain_rows, rows = layer_table(plain), layer_table(other)
    assert [r["output_shape"] for r in rows] == [r["output_shape"] for r in plain_rows]
    label = {"subpixel": "Conv 3 × 3 + pixel shuffle × 2", "transposed-blur": "T. Conv 3 × 3 + blur [1,3,3,1]"}
    assert [r["layer"] for r in rows[3:-1]] == [label[upsample]] * len(poster.generator_widths)
    assert sum(r["parameters"] for r in rows) == count_parameters(other)


def test_subpixel_layer_starts_as_nearest_neighbour_upsampling():
    """ICNR (Aitken et al. 2017): at initialisation each 2x2 block of the output is one value, so there is no
    checkerboard to unlearn; the four sub-pixel kernels are separate weights that training can pull apart."""
    torch.manual_seed(0)
    generator, _ = build_models(dataclasses.replace(PRESETS["tiny"], upsample="subpixel"))
    layer = generator.up[0].conv
    with torch.no_grad():
        out = layer(torch.randn(2, 64, 4, 4))
    assert out.shape == (2, 32, 8, 8)
    assert torch.equal(out, torch.nn.functional.interpolate(out[..., ::2, ::2], scale_factor=2, mode="nearest"))
    assert abs(layer.weight.std() - 0.02) < 0.005, "ICNR's sub-kernel draws N(0, init_std)"
    with torch.no_grad():
        layer.weight[1].add_(1.0)
        out = layer(torch.randn(2, 64, 4, 4))
    assert not torch.equal(out, torch.nn.functional.interpolate(out[..., ::2, ::2], scale_factor=2, mode="nearest"))


def test_blurred_transposed_layer_doubles_the_side_centred_and_removes_the_2px_alternation():
    torch.manual_seed(0)
    generator, _ = build_models(dataclasses.replace(PRESETS["tiny"], upsample="transposed-blur"))
    block = generator.up[0]
    with torch.no_grad():
        block.conv.weight.fill_(1.0)
        impulse = torch.zeros(1, 64, 4, 4)
        impulse[..., 1, 2] = 1.0
        out = block.blur(block.conv(impulse))[0, 0]
        assert out.shape == (8, 8)
        ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        centre = (float((out * ys).sum() / out.sum()), float((out * xs).sum() / out.sum()))
        assert centre == pytest.approx((2 * 1 + 0.5, 2 * 2 + 0.5)), "input pixel i covers output pixels 2i, 2i+1"
        # the transposed convolution's 9 x 9 output: an alternation of period 2 goes, a constant stays
        ys, xs = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
        blurred = block.blur(((ys + xs) % 2 * 2 - 1).expand(1, 32, 9, 9))[0, 0]
        assert blurred.shape == (8, 8) and blurred[1:-1, 1:-1].abs().max() < 1e-6
        assert torch.allclose(block.blur(torch.ones(1, 32, 9, 9))[0, 0, 1:-1, 1:-1], torch.ones(6, 6))


def test_cli_shows_the_tiny_default_upsampling_and_the_poster_s_with_its_recipe(capsys):
    assert cli_main(["models", "--preset", "tiny"]) == 0
    default = capsys.readouterr().out
    assert default.count("Upsample × 2 + Conv 3 × 3") == 4 and "T. Conv" not in default
    assert cli_main(["models", "--preset", "tiny", "--recipe", "one-critic"]) == 0
    assert capsys.readouterr().out.count("T. Conv 4 × 4") == 4


def test_hardtanh_generator_draws_an_exactly_flat_background_and_bad_outputs_are_refused():
    """Real slices' background is exactly -1; tanh never reaches it, hardtanh does (issue 19)."""
    torch.manual_seed(0)
    config = dataclasses.replace(get_config("tiny"), generator_output="hardtanh")
    generator, _ = build_models(config)
    with torch.no_grad():
        generator.out.conv.bias.fill_(-5.0)
        images = generator(torch.randn(4, config.latent_dim))
    assert (images == -1).float().mean() > 0.9
    tanh_generator, _ = build_models(dataclasses.replace(config, generator_output="tanh"))
    with torch.no_grad():
        tanh_generator.out.conv.bias.fill_(-5.0)
        assert (tanh_generator(torch.randn(4, config.latent_dim)) == -1).float().mean() < 0.1
    with pytest.raises(ValueError, match="generator_output must be one of"):
        dataclasses.replace(config, generator_output="sigmoid")
    with pytest.raises(ValueError, match="generator_last_width must be an int >= 0"):
        dataclasses.replace(config, generator_last_width=-1)
