"""DiffAugment for limited data: each policy does what it says, to every image differently, and the
generator can be trained through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from brats_gan.augment import POLICIES, cutout, diff_augment, parse_policy, translate


def test_policy_names_parse_and_unknown_ones_are_named():
    assert parse_policy("cutout, translation") == ("translation", "cutout")
    assert parse_policy("all") == POLICIES and parse_policy("none") == () and parse_policy(None) == ()
    with pytest.raises(ValueError, match="flip.*translation"):
        parse_policy("translation,flip")


def test_translation_moves_each_image_by_its_own_shift_and_fills_with_background():
    torch.manual_seed(0)
    x = torch.full((64, 1, 32, 32), -1.0)
    x[:, :, 16, 16] = 1.0
    out = translate(x)
    assert out.shape == x.shape and (out == 1).flatten(1).sum(1).eq(1).all()
    where = (out == 1).nonzero()[:, 2:] - 16
    assert where.abs().max() <= 4 and len({tuple(w.tolist()) for w in where}) > 10  # per image, up to 1/8 side
    assert ((out == -1) | (out == 1)).all()


def test_cutout_blanks_a_half_side_square_to_background():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 32, 32)
    out = cutout(x)
    blank = (out == -1).all(1)  # (B, H, W), same square on every channel
    assert 0 < blank.flatten(1).sum(1).min() and blank.flatten(1).sum(1).max() == 16 * 16
    assert torch.equal(out[~blank.unsqueeze(1).expand_as(out)], x[~blank.unsqueeze(1).expand_as(x)])


def test_augmentation_is_differentiable_seeded_and_shape_preserving():
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    torch.manual_seed(1)
    a = diff_augment(x, POLICIES)
    a.sum().backward()
    assert a.shape == x.shape and x.grad is not None and x.grad.abs().sum() > 0
    torch.manual_seed(1)
    assert torch.equal(diff_augment(x.detach(), POLICIES), a.detach())
    assert torch.equal(diff_augment(x.detach(), ()), x.detach())


def test_a_probability_below_one_leaves_some_images_as_they_are():
    x = torch.rand(64, 1, 16, 16, requires_grad=True)
    torch.manual_seed(2)
    out = diff_augment(x, ("cutout",), probability=0.5)
    untouched = (out == x).flatten(1).all(1)
    assert 10 < int(untouched.sum()) < 54, "about half of the images are cut"
    out.sum().backward()
    assert torch.equal(x.grad.flatten(1).all(1), untouched), "gradient flows unchanged through untouched images"


def test_training_with_augment_runs_records_it_and_refuses_unknown_names(store: Path, tmp_path: Path):
    bad = run_cli("train", "--store", store, "--out", tmp_path / "bad", "--augment", "flip")
    assert bad.returncode == 2 and "--augment" in bad.stderr and not (tmp_path / "bad").exists()
    bad = run_cli("train", "--store", store, "--out", tmp_path / "bad", "--augment-p", "1.5")
    assert bad.returncode == 2 and "--augment-p (training.augment_p)" in bad.stderr and not (tmp_path / "bad").exists()
    run = tmp_path / "aug"
    run_cli("train", "--store", store, "--out", run, "--preset", "tiny", "--steps", "2", "--checkpoint-every", "2",
            "--augment", "translation,cutout", "--augment-p", "0.5", "--num-workers", "0",
            env={"OMP_NUM_THREADS": "1"}, ok=True)
    options = json.loads((run / "training_options.json").read_text())
    assert options["training"]["augment"] == ["translation", "cutout"] and options["training"]["augment_p"] == 0.5
    assert (run / "checkpoints" / "latest").read_text().strip() == "2"
