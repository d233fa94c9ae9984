"""The evaluation metrics on cases whose answer is known (no stores, no mocks)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from store_factory import phantoms

from brats_gan import metrics as M
from brats_gan.models import build_models

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# SWD


def test_swd_is_near_zero_against_itself_large_against_noise_and_grows_with_a_shift() -> None:
    x = phantoms(16)
    noise = np.random.default_rng(1).uniform(-1, 1, x.shape).astype(np.float32)
    itself = M.swd_distance(x, x)["mean"]
    against_noise = M.swd_distance(x, noise)["mean"]
    assert itself < 0.05 * against_noise
    shifted = [itself] + [M.swd_distance(x, x + d)["mean"] for d in (0.1, 0.2, 0.4)]
    assert all(a < b for a, b in itertools.pairwise(shifted)), shifted
    assert shifted[-1] > 5 * itself


def test_sliced_wasserstein_of_identical_patch_sets_is_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(500, 49)).astype(np.float32)
    assert M.sliced_wasserstein([patches, patches.copy()], [(0, 1)], rng) == [0.0]
    with pytest.raises(ValueError, match="equally many"):
        M.sliced_wasserstein([patches, patches[:10]], [(0, 1)], rng)


def test_laplacian_pyramid_levels_add_back_to_the_image() -> None:
    x = torch.from_numpy(phantoms(2))
    pyramid = M.laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyramid] == M.swd_resolutions(64) == [64, 32, 16]
    rebuilt = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        rebuilt = band + M._pyr_up(rebuilt, band.shape[-2:])
    assert torch.allclose(rebuilt, x, atol=1e-5)


def _data(real: np.ndarray, fake: np.ndarray, **kwargs) -> M.EvalData:
    def image_set(x: np.ndarray, name: str) -> M.ImageSet:
        n = len(x)
        return M.ImageSet(path=name, images=x, indices=np.arange(n), subjects=np.array([f"{name}-{i}" for i in range(n)]),
                          slice_index=np.arange(n), channels=("flair",) * x.shape[1])

    return M.EvalData(real=image_set(real, "real"), fake=image_set(fake, "fake"), **kwargs)


def test_swd_metric_sits_at_its_floor_for_the_same_distribution_and_far_above_it_for_noise() -> None:
    real = phantoms(32, seed=0)
    same = M.calc_metric("swd", _data(real, phantoms(16, seed=1)))["results"]
    assert same["swd_images_per_side"] == 16
    assert same["swd"] < 2 * same["swd_floor"]
    noise = np.random.default_rng(2).uniform(-1, 1, (16, 1, 64, 64)).astype(np.float32)
    far = M.calc_metric("swd", _data(real, noise))["results"]
    assert far["swd"] > 10 * far["swd_floor"]
    assert len(far["swd_levels"]) == len(far["swd_resolutions"]) == 3


# --------------------------------------------------------------------------------------------
# Fréchet distance and KID


def gaussian_with_exact_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> torch.Tensor:
    """Samples whose sample mean and (n-1) covariance are exactly ``mean`` and ``cov``."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.cholesky(np.linalg.inv(np.cov(z, rowvar=False)))
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


@pytest.mark.parametrize("commuting", [True, False])
def test_frechet_distance_matches_the_closed_form_for_gaussians(commuting: bool) -> None:
    rng = np.random.default_rng(3)
    d = 5
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    if commuting:
        s1, s2 = np.diag(rng.uniform(0.5, 2, d)), np.diag(rng.uniform(0.5, 2, d))
        closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    else:
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T + np.eye(d), b @ b.T + 0.5 * np.eye(d)
        root1 = psd_sqrt(s1)
        closed = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(root1 @ s2 @ root1))
    f1 = gaussian_with_exact_moments(rng, 400, mu1, s1)
    f2 = gaussian_with_exact_moments(rng, 600, mu2, s2)
    assert M.frechet_distance(f1, f2) == pytest.approx(closed, rel=1e-6)
    assert M.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-6)


def _polynomial_kernel_mmd2(p: tuple[np.ndarray, np.ndarray], q: tuple[np.ndarray, np.ndarray]) -> float:
    """Population MMD^2 of KID's kernel (x.y/d + 1)^3 between Gaussians: sum_k C(3,k) d^-k |M_k(P) - M_k(Q)|^2
    over the raw moment tensors M_1 = mu, M_2 = S + mu mu^T, M_3 = mu^3 + 3 sym(mu S)."""
    def moments(mu: np.ndarray, s: np.ndarray) -> list[np.ndarray]:
        m3 = (np.einsum("i,j,k->ijk", mu, mu, mu) + np.einsum("i,jk->ijk", mu, s)
              + np.einsum("j,ik->ijk", mu, s) + np.einsum("k,ij->ijk", mu, s))
        return [mu, s + np.outer(mu, mu), m3]

    d = len(p[0])
    return sum(c * d ** -k * np.sum((a - b) ** 2)
               for k, c, a, b in zip((1, 2, 3), (3, 3, 1), moments(*p), moments(*q)))


def test_kernel_distance_matches_the_closed_form_for_gaussians_and_vanishes_for_one_distribution() -> None:
    rng = np.random.default_rng(4)
    p = (np.zeros(3), np.eye(3))
    q = (np.full(3, 0.5), np.diag([1.0, 1.5, 0.7]))
    closed = _polynomial_kernel_mmd2(p, q)
    f1, f2, f3 = (torch.from_numpy(rng.multivariate_normal(*g, 3000)) for g in (p, q, p))
    kid, std = M.kernel_distance(f1, f2, subsets=20, subset_size=500)
    assert kid == pytest.approx(closed, rel=0.15)
    assert std > 0
    same, _ = M.kernel_distance(f1, f3, subsets=20, subset_size=500)
    assert abs(same) < 0.03 * closed


# --------------------------------------------------------------------------------------------
# checkerboard


def test_checkerboard_is_high_for_an_imprinted_stride2_pattern_and_low_for_smooth_images() -> None:
    smooth = phantoms(16)
    rng = np.random.default_rng(5)
    pattern = rng.uniform(-1, 1, (2, 2))
    imprinted = smooth + 0.03 * np.tile(pattern, (32, 32))
    period4 = smooth + 0.03 * np.tile(rng.uniform(-1, 1, (4, 4)), (16, 16))
    assert M.checkerboard_score(smooth) < 1.0
    assert M.checkerboard_score(imprinted) > 10.0
    assert M.checkerboard_levels(imprinted)[0] > 10.0
    assert M.checkerboard_levels(period4)[1] > 10.0
    noise = rng.normal(size=(16, 1, 64, 64))
    assert abs(M.checkerboard_score(noise)) < 1.0


def test_checkerboard_points_are_the_lattice_of_each_scale() -> None:
    points = M.checkerboard_points(64)
    assert len(points) == 4
    assert sorted(zip(*np.nonzero(points[0]))) == [(0, 32), (32, 0), (32, 32)]
    assert len(np.nonzero(points[1])[0]) == 4 * 4 - 4
    assert not any(mask[0, 0] for mask in points)


@pytest.mark.parametrize("seed", [0, 1])
def test_untrained_transposed_generator_shows_more_grid_than_the_resize_one(seed: int) -> None:
    """The issue's item 2 at initialisation: same seed, same noise, only the upsampling differs."""
    scores = {}
    for preset in ("tiny", "tiny-resize"):
        torch.manual_seed(seed)
        generator, _ = build_models(preset)
        generator.eval()
        with torch.no_grad():
            images = generator(torch.randn(16, generator.config.latent_dim, generator=torch.Generator().manual_seed(9)))
        scores[preset] = M.checkerboard_score(images)
    assert scores["tiny"] > scores["tiny-resize"] + 3.0, scores
    assert scores["tiny"] > 3.0


# --------------------------------------------------------------------------------------------
# MS-SSIM


def test_ms_ssim_scales_follow_the_image_size() -> None:
    assert [M.ms_ssim_scales(s) for s in (256, 128, 64, 32)] == [5, 4, 3, 2]
    with pytest.raises(M.MetricUnavailable, match="8 px images are smaller than its 11 px window"):
        M.ms_ssim_scales(8)
    assert sum(M.ms_ssim_betas(3)) == pytest.approx(1.0)


def test_ms_ssim_is_one_for_copies_and_lower_for_a_diverse_set() -> None:
    diverse = phantoms(16)
    copies = np.repeat(diverse[:1], 16, axis=0)
    same, scales = M.mean_pairwise_ms_ssim(copies, pairs=16)
    assert scales == 3
    assert same == pytest.approx(1.0, abs=1e-4)
    assert M.mean_pairwise_ms_ssim(diverse, pairs=32)[0] < 0.95


# --------------------------------------------------------------------------------------------
# memorisation


def test_memorisation_flags_exact_copies_of_training_slices_and_not_held_out_like_ones() -> None:
    """Held-out-like slices fall below the closest of n held-out slices with probability 1 / (n + 1) each, so
    n = 200 against 8 of them."""
    train = torch.from_numpy(phantoms(40, seed=10))
    heldout = torch.from_numpy(phantoms(200, seed=11))
    copies = train[[3, 7, 19, 30]]
    novel = torch.from_numpy(phantoms(8, seed=12))
    d, index = M.nearest_distances(copies, train)
    assert d.tolist() == [0.0] * 4
    assert index.tolist() == [3, 7, 19, 30]
    out = M.memorisation_figures(torch.cat([copies, novel]), train, heldout)
    flagged = out["nearest_train_fake"] < out["memorisation_threshold"]
    assert flagged[:4].all() and not flagged[4:].any()
    assert out["memorisation_share"] == pytest.approx(4 / 12)
    assert M.memorisation_figures(novel, train, heldout)["memorisation_share"] == 0.0


# --------------------------------------------------------------------------------------------
# registry and report lines


def test_registry_runs_metrics_by_name_and_appends_one_json_line_per_report(tmp_path) -> None:
    assert set(M.list_metrics()) == {"swd", "checkerboard", "ms_ssim", "memorisation", "inception"}
    data = _data(phantoms(16), phantoms(16, seed=1))
    result = M.calc_metric("checkerboard", data)
    assert result["metric"] == "checkerboard" and set(result["results"]) >= {"checkerboard", "checkerboard_real"}
    for _ in range(2):
        M.report_metric(result, tmp_path, fake="fake.zarr")
    lines = (tmp_path / "metric-checkerboard.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["results"]["checkerboard"] == result["results"]["checkerboard"]
    with pytest.raises(M.MetricUnavailable, match="--train"):
        M.calc_metric("memorisation", data)
    with pytest.raises(M.MetricUnavailable, match="--inception-weights"):
        M.calc_metric("inception", data)


def test_real_halves_keep_each_subject_on_one_side() -> None:
    subjects = np.repeat([f"s{i}" for i in range(7)], 6)
    a, b, by_subject = M.real_halves(subjects, seed=0)
    assert by_subject and not set(subjects[a]) & set(subjects[b])
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(42)) and abs(len(a) - len(b)) == 6
    a, b, by_subject = M.real_halves(np.array(["one"] * 10), seed=0)
    assert not by_subject and len(a) == len(b) == 5 and not set(a) & set(b)
