"""What differs on a GPU, checked where it can be.

On any machine: every batch the loader hands over is a plain dense tensor that ``pin_memory`` accepts
(the first CUDA batch once died there, on a stride-0 ``expand`` view, while every CPU test passed),
and a single stored channel reaches the networks repeated to three only after the copy to the device.

On a GPU (``python -m pytest -m cuda``): the device path itself, through the real commands: training
steps with pinned, non-blocking batches in fp32 and bf16, a checkpoint and ``--resume``, ``generate``
on the device, and ``evaluate`` of what it wrote. Skipped, with the reason shown, where no GPU is.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from training_runs import REPO, launch, metric_rows, metric_steps, model_states

from brats_gan.data import SliceStream, iterate_batches, to_model

STORED_CHANNELS = {1: ("flair",), 3: ("flair", "t1ce", "t2")}
LOADERS = {"cached": ("memory", 0), "streamed": ("stream", 0), "streamed-workers": ("stream", 2)}


def assert_pinnable(batch: torch.Tensor) -> None:
    """What ``Tensor.pin_memory`` does, on any machine: allocate a buffer with the batch's own strides
    and copy into it, which torch refuses when elements of the batch share memory (then for real on CUDA)."""
    assert type(batch) is torch.Tensor, f"a plain tensor, not {type(batch).__name__}"
    assert all(stride > 0 for size, stride in zip(batch.shape, batch.stride()) if size > 1), \
        f"stride 0 on an axis of the batch: {tuple(batch.shape)} with strides {batch.stride()}"
    torch.empty_strided(batch.shape, batch.stride(), dtype=batch.dtype).copy_(batch)
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert torch.equal(pinned.to("cuda", non_blocking=True).cpu(), batch)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("stored", sorted(STORED_CHANNELS))
@pytest.mark.parametrize("size", [64, 256])
def test_every_batch_can_be_pinned_and_keeps_the_stored_channels(store_factory, loader: str, stored: int,
                                                                 size: int) -> None:
    store = store_factory(subjects=2, slices=16, channels=STORED_CHANNELS[stored])
    cache, workers = LOADERS[loader]
    stream = SliceStream(str(store), batch_size=4, image_size=size, seed=1, cache=cache, window_batches=2)
    assert stream.cached == (cache == "memory")
    batches = list(itertools.islice(iterate_batches(stream, num_workers=workers), 9))  # crosses an epoch
    for _, batch in batches:
        # the loader moves what is stored: one channel stays one (repeated on the device), three stay three
        assert batch.shape == (4, stored, size, size)
        assert_pinnable(batch)
    for _, batch in batches[:2]:
        model_input = to_model(batch, "cpu", torch.float32)
        assert model_input.shape == (4, 3, size, size) and model_input.is_contiguous()
        assert torch.equal(model_input, batch.float().expand(-1, 3, -1, -1))


def test_a_batch_of_other_channels_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="2 channels cannot feed a network of 3"):
        to_model(torch.zeros(1, 2, 8, 8), "cpu", torch.float32)


# ------------------------------------------------------------------------------------------ on a GPU

PAPER = ["--preset", "paper", "--seed", "0", "--checkpoint-every", "2", "--swd-images", "16", "--samples", "16"]
PRECISIONS = {  # fp32 streams through loader workers (pinned from their shared memory), bf16 from the cache
    "fp32": ["--cache", "stream", "--num-workers", "2"],
    "bf16": ["--cache", "memory", "--deepspeed-config", str(REPO / "deepspeed_configs" / "paper_bf16.json")],
    # fp32 weights, bf16 forwards under CUDA's autocast (cuDNN's bf16 convolutions, the penalty's double backward)
    "bf16-autocast": ["--cache", "memory", "--deepspeed-config",
                      str(REPO / "deepspeed_configs" / "paper_bf16_autocast.json")],
}
LIMITED_MEMORY = ("import sys, torch\n"  # a GPU with 1 GiB free: the paper's 35.5 M parameters and Adam fit, a batch of 64 not
                  "torch.cuda.set_per_process_memory_fraction(2**30 / torch.cuda.get_device_properties(0).total_memory)\n"
                  "from brats_gan.commands import main\nsys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def paper_stores(store_factory) -> tuple[Path, Path]:
    """64 one-channel FLAIR-like slices at 256 px (8 micro-batches of 8), and 32 of two held-out subjects."""
    train = store_factory(subjects=4, slices=16)
    heldout = store_factory(subjects=[f"BraTS-HELD-{i:05d}" for i in range(2)], slices=16, seed=1)
    return train, heldout


def _stored(store: Path):
    import zarr

    return zarr.open_group(str(store), mode="r")["image"][:].astype("float32")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_the_paper_preset_trains_resumes_generates_and_evaluates_on_the_gpu(paper_stores, tmp_path: Path,
                                                                           precision: str) -> None:
    import math

    import numpy as np

    train, heldout = paper_stores
    run = tmp_path / "run"
    first = launch("--store", train, "--out", run, *PAPER, *PRECISIONS[precision], "--steps", "2", ranks=1)
    assert first.returncode == 0, first.output
    assert "(cuda:0)" in first.output, "the trainer must run on the GPU"
    resumed = launch("--out", run, "--resume", "--steps", "4", ranks=1)
    assert resumed.returncode == 0, resumed.output
    assert "resumed from step 2" in resumed.output
    assert metric_steps(run) == [1, 2, 3, 4]
    for row in metric_rows(run):
        for key in ("critic_loss", "generator_loss", "wasserstein", "gradient_penalty"):
            assert math.isfinite(float(row[key])), row
    assert all(math.isfinite(float(row["swd"])) for row in metric_rows(run) if int(row["step"]) in (2, 4))
    states = model_states(run, 4)
    weights = states["generator"]["module"]
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {expected}
    averaged = states["generator_ema"]["module"]  # kept in fp32 on the GPU whatever the training dtype
    assert {t.dtype for t in averaged.values() if t.is_floating_point()} == {torch.float32}
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]

    on_gpu, on_cpu = tmp_path / "gpu.zarr", tmp_path / "cpu.zarr"
    made = run_cli("generate", "--checkpoint", run, "--out", on_gpu, "--num", "32", "--grid", tmp_path / "grid.png",
                   ok=True)
    assert "on cuda" in made.stdout and (tmp_path / "grid.png").stat().st_size > 0
    run_cli("generate", "--checkpoint", run, "--out", on_cpu, "--num", "32", env={"CUDA_VISIBLE_DEVICES": ""}, ok=True)
    gpu, cpu = _stored(on_gpu), _stored(on_cpu)
    assert gpu.shape == (32, 1, 256, 256) and np.isfinite(gpu).all()
    difference = np.abs(gpu - cpu)  # the same images on either device, up to TF32 convolutions and float16 storage
    assert difference.mean() < 0.02 and np.corrcoef(gpu.ravel(), cpu.ravel())[0, 1] > 0.99, difference.mean()

    evaluated = run_cli("evaluate", "--real", heldout, "--fake", on_gpu, "--train", train, "--json", ok=True)
    figures = json.loads(evaluated.stdout)
    for key in ("swd", "swd_floor", "checkerboard", "ms_ssim_fake", "memorisation_share"):
        assert figures[key] is not None and math.isfinite(figures[key]), (key, figures[key])


@pytest.mark.cuda
def test_a_micro_batch_too_large_for_the_gpu_is_named_not_a_traceback(paper_stores, tmp_path: Path) -> None:
    import subprocess
    import sys

    train, _ = paper_stores
    config = json.loads((REPO / "deepspeed_configs" / "paper.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 64
    (tmp_path / "big.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-c", LIMITED_MEMORY, "train", "--store", str(train),
                           "--out", str(tmp_path / "run"), "--preset", "paper", "--steps", "2",
                           "--deepspeed-config", str(tmp_path / "big.json"), "--swd-images", "0",
                           "--sample-every", "0"], capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output
    assert "out of memory on cuda" in output and "micro-batch of 64 per rank" in output
    assert "train_micro_batch_size_per_gpu in --deepspeed-config (e.g. 32)" in output
    assert "Traceback" not in output


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tiny_default_generator_draws_its_flat_background_and_trains_on_the_gpu(dtype: torch.dtype) -> None:
    """Issue 19's hardtanh output on CUDA, in fp32 and bf16: an exactly -1 background, finite gradients."""
    from brats_gan.models import build_models
    from brats_gan.recipes import model_config

    config = model_config("tiny")
    assert config.generator_output == "hardtanh"
    generator, critic = (net.to("cuda", dtype) for net in build_models(config))
    with torch.no_grad():
        generator.out.conv.bias.fill_(-5.0)
    images = generator(torch.randn(8, config.latent_dim, device="cuda", dtype=dtype))
    assert images.dtype == dtype and (images == -1).float().mean().item() > 0.9
    critic(images).mean().backward()
    grads = torch.cat([p.grad.float().flatten() for p in generator.parameters() if p.grad is not None])
    assert grads.numel() > 0 and torch.isfinite(grads).all().item()
