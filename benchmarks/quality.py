"""Image quality of training variants on the tiny presets: recipes and generators compared on several seeds.

On the demo's phantoms (no download), on the CPU: every variant is trained from each seed for the same
wall time (``--seconds``: stopped by SIGTERM, which checkpoints the step it reached) or the same number
of steps (``--steps``); 256 slices are generated from its last checkpoint (the averaged generator, as
`generate` does by default) and `brats-gan evaluate` compares them with held-out phantom subjects.
Per variant it prints the median over seeds of SWD / real-vs-real floor, checkerboard / the real
slices' level (in dB, so a difference: synthetic minus real), MS-SSIM fake minus real (diversity: 0 is
the real set's), the memorisation share, the steps reached and the median milliseconds per step (from the
run's metrics.csv: at equal steps, what a variant costs in wall time), then every run.

Baseline: ``poster`` (the tiny preset with the poster's recipe; ``--baseline`` names another). A variant is a
name and the `train` flags that make it (``VARIANTS``; ``--variants`` picks them; ``ADAM_VARIANTS`` also
change Adam's parameters, through a DeepSpeed config written beside the runs). Runs go ``--parallel`` at a
time (default 2: the 2-core machine), one thread each; ``--json`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = "poster"
VARIANTS: dict[str, list[str]] = {
    "poster": ["--preset", "tiny", "--recipe", "poster"],
    "poster-no-ema": ["--preset", "tiny", "--recipe", "poster", "--ema-images", "0"],
    "poster-no-augment": ["--preset", "tiny", "--recipe", "poster", "--augment", "none"],
    "poster-resize": ["--preset", "tiny-resize", "--recipe", "poster"],
    "wgan-gp": ["--preset", "tiny", "--recipe", "wgan-gp"],
    "wgan-gp-ncritic2": ["--preset", "tiny", "--recipe", "wgan-gp", "--n-critic", "2"],
    "wgan-gp-mbstd": ["--preset", "tiny", "--recipe", "wgan-gp", "--critic-mbstd", "4"],
    "wgan-gp-augment-p0.5": ["--preset", "tiny", "--recipe", "wgan-gp", "--augment-p", "0.5"],
    "wgan-gp-lambda1": ["--preset", "tiny", "--recipe", "wgan-gp", "--gp-lambda", "1"],
    "poster-ncritic2": ["--preset", "tiny", "--recipe", "poster", "--n-critic", "2"],
    "poster-ncritic1": ["--preset", "tiny", "--recipe", "poster", "--n-critic", "1"],
    "poster-ncritic2-nodropout": ["--preset", "tiny", "--recipe", "poster", "--n-critic", "2",
                                  "--generator-dropout", "0"],
    "poster-ncritic2-ema0.3": ["--preset", "tiny", "--recipe", "poster", "--n-critic", "2", "--ema-rampup", "0.3"],
    "poster-ncritic2-resize": ["--preset", "tiny-resize", "--recipe", "poster", "--n-critic", "2"],
    "poster-ncritic2-noaug": ["--preset", "tiny", "--recipe", "poster", "--n-critic", "2", "--augment", "none"],
    "poster-ncritic1-nodropout": ["--preset", "tiny", "--recipe", "poster", "--n-critic", "1",
                                  "--generator-dropout", "0"],
    "poster-ncritic1-nodropout-noaug": ["--preset", "tiny", "--recipe", "poster", "--n-critic", "1",
                                        "--generator-dropout", "0", "--augment", "none"],
    "one-critic": ["--preset", "tiny", "--recipe", "one-critic"],
    "one-critic-ncritic2": ["--preset", "tiny", "--recipe", "one-critic", "--n-critic", "2"],
    "one-critic-subpixel": ["--preset", "tiny", "--recipe", "one-critic", "--upsample", "subpixel"],
    "one-critic-blur": ["--preset", "tiny", "--recipe", "one-critic", "--upsample", "transposed-blur"],
    "one-critic-resize": ["--preset", "tiny", "--recipe", "one-critic", "--upsample", "resize"],
    "one-critic-resize-bilinear": ["--preset", "tiny", "--recipe", "one-critic", "--upsample", "resize",
                                   "--resize-mode", "bilinear"],
    "one-critic-noise": ["--preset", "tiny", "--recipe", "one-critic-noise"],
    "one-critic-noise-resize": ["--preset", "tiny", "--recipe", "one-critic-noise", "--upsample", "resize"],
    "one-critic-noise-subpixel": ["--preset", "tiny", "--recipe", "one-critic-noise", "--upsample", "subpixel"],
    "one-critic-noise-ema0.02": ["--preset", "tiny", "--recipe", "one-critic-noise", "--ema-rampup", "0.02"],
    "one-critic-noise-resize-ema0.02": ["--preset", "tiny", "--recipe", "one-critic-noise", "--upsample", "resize",
                                        "--ema-rampup", "0.02"],
    "one-critic-noise-resize-gp4": ["--preset", "tiny", "--recipe", "one-critic-noise-resize", "--gp-every", "4"],
    "one-critic-noise-resize-gp8": ["--preset", "tiny", "--recipe", "one-critic-noise-resize", "--gp-every", "8"],
    "one-critic-noise-resize-hardtanh": ["--preset", "tiny", "--recipe", "one-critic-noise-resize-hardtanh"],
    # at 256 px (a GPU's): Tables I and II with the poster's recipe, against the tiny default's recipe
    "paper": ["--preset", "paper", "--recipe", "poster"],
    "paper-one-critic-noise-resize": ["--preset", "paper", "--recipe", "one-critic-noise-resize"],
}
# Variants that change Adam's parameters (one set for both networks): trained with a DeepSpeed config written
# beside the runs, their recipe's with these parameters changed. name: (recipe, Adam parameters)
ADAM_VARIANTS: dict[str, tuple[str, dict]] = {
    "one-critic-lr1e-4": ("one-critic", {"lr": 0.0001}),
    "one-critic-lr4e-4": ("one-critic", {"lr": 0.0004}),
    "one-critic-noise-lr1e-4": ("one-critic-noise", {"lr": 0.0001}),
    "one-critic-noise-lr4e-4": ("one-critic-noise", {"lr": 0.0004}),
    # the poster's L2 weight decay (1e-3, coupled: Adam sees it as gradient) off
    "one-critic-noise-resize-nodecay": ("one-critic-noise-resize", {"weight_decay": 0.0}),
    # StyleGAN2-ADA's Adam (betas (0, 0.99), no decay) at the poster's lr
    "one-critic-noise-resize-beta0": ("one-critic-noise-resize", {"betas": [0.0, 0.99], "weight_decay": 0.0}),
}
VARIANTS.update({name: ["--preset", "tiny", "--recipe", recipe] for name, (recipe, _) in ADAM_VARIANTS.items()})
METRICS = ("swd", "swd_floor", "checkerboard", "checkerboard_real", "ms_ssim_fake", "ms_ssim_real",
           "memorisation_share")


def brats_gan(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "brats_gan", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, allowed: tuple[int, ...] = (0,)) -> str:
    out, _ = proc.communicate()
    if proc.returncode not in allowed:
        raise SystemExit(f"{' '.join(map(str, proc.args))} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def make_stores(root: Path, train_subjects: int, heldout_subjects: int) -> tuple[Path, Path]:
    from brats_gan.phantoms import write_phantom_dataset

    data = root / "MICCAI_BraTS2020_TrainingData"
    write_phantom_dataset(data, n_subjects=train_subjects + heldout_subjects, layout="2020", seed=0)
    train, heldout = root / "train.zarr", root / "heldout.zarr"
    if train.exists() and heldout.exists():  # --keep of an earlier run: the same phantoms
        return train, heldout
    common = ["--workers", "2", "--no-progress", "--dashboard-port", "0"]
    finish(brats_gan("preprocess", str(data), "--out", str(train), "--subjects", f"1-{train_subjects}", *common))
    finish(brats_gan("preprocess", str(data), "--out", str(heldout), "--subjects",
                     f"{train_subjects + 1}-{train_subjects + heldout_subjects}", *common))
    return train, heldout


def variant_flags(variant: str, root: Path) -> list[str]:
    """The `train` flags of ``variant``; an Adam variant's DeepSpeed config is written into ``root``."""
    if variant not in ADAM_VARIANTS:
        return VARIANTS[variant]
    from brats_gan.train_config import default_deepspeed

    recipe, adam = ADAM_VARIANTS[variant]
    config = default_deepspeed("tiny", recipe)
    config["optimizer"]["params"].update(adam)
    path = root / f"{variant}.deepspeed.json"
    path.write_text(json.dumps(config, indent=2))
    return [*VARIANTS[variant], "--deepspeed-config", str(path)]


def train_all(jobs: list[tuple[str, int, Path]], train: Path, args: argparse.Namespace, env: dict[str, str]) -> None:
    """Each (variant, seed, run folder), ``--parallel`` at a time, for ``--seconds`` each or ``--steps``."""
    jobs = [job for job in jobs if not (job[2] / "checkpoints" / "latest").exists()]  # --keep: measured as they are
    for first in range(0, len(jobs), args.parallel):
        procs = []
        for variant, seed, run in jobs[first:first + args.parallel]:
            length = (["--steps", "100000000", "--checkpoint-every", "100000000", "--checkpoint-on-signal"]
                      if args.seconds else ["--steps", str(args.steps), "--checkpoint-every", str(args.steps)])
            procs.append(brats_gan("train", "--store", str(train), "--out", str(run),
                                   *variant_flags(variant, run.parent),
                                   "--seed", str(seed), *length, "--sample-every", "0", "--swd-images", "0",
                                   "--num-workers", "0", env=env))
        if args.seconds:
            time.sleep(args.seconds)
            for proc in procs:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            finish(proc, allowed=(0, 128 + signal.SIGTERM) if args.seconds else (0,))


def measure(run: Path, train: Path, heldout: Path, images: int, seed: int, env: dict[str, str]) -> dict:
    fake, grid = run.parent / f"{run.name}.zarr", run.parent / f"{run.name}.png"
    finish(brats_gan("generate", "--checkpoint", str(run), "--out", str(fake), "--num", str(images), "--overwrite",
                     "--seed", str(seed), "--grid", str(grid), env=env))
    report = json.loads(finish(brats_gan("evaluate", "--real", str(heldout), "--fake", str(fake), "--train",
                                         str(train), "--json", "--seed", str(seed),
                                         "--metrics", "swd,checkerboard,ms_ssim,memorisation", env=env)
                               ).strip().splitlines()[-1])
    step = int((run / "checkpoints" / "latest").read_text())
    figures = {k: report[k] for k in METRICS}
    return {**figures, "steps": step, "step_ms": step_ms(run), "swd_ratio": figures["swd"] / figures["swd_floor"],
            "checkerboard_excess": figures["checkerboard"] - figures["checkerboard_real"],
            "ms_ssim_gap": figures["ms_ssim_fake"] - figures["ms_ssim_real"]}


def step_ms(run: Path) -> float:
    """Median milliseconds per generator step in the run's ``metrics.csv``, the first 10 steps (warm-up) left out:
    what an equal-steps comparison needs to say what a variant costs in wall time. On a shared machine it counts
    the contention too, so compare variants run together."""
    import csv

    with (run / "metrics.csv").open() as f:
        times = [float(row["step_s"]) for row in csv.DictReader(f) if row.get("step_s")]
    return round(1000 * statistics.median(times[10:] or times), 1)


def summarise(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        out.append({"variant": variant, "seeds": len(mine), "flags": " ".join(VARIANTS[variant]),
                    **{k: round(statistics.median(r[k] for r in mine), 3)
                       for k in ("swd_ratio", "checkerboard_excess", "ms_ssim_gap", "memorisation_share", "steps",
                                 "step_ms")},
                    "swd_ratio_range": [round(min(r["swd_ratio"] for r in mine), 2),
                                        round(max(r["swd_ratio"] for r in mine), 2)]})
    base = next((s["swd_ratio"] for s in out if s["variant"] == baseline), None)
    for s in out:
        s["swd_vs_baseline"] = None if base is None else round(s["swd_ratio"] / base, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=None,
                        help="wall time per run (default 150 unless --steps is given)")
    length.add_argument("--steps", type=int, default=None, help="generator steps per run instead of a wall time")
    parser.add_argument("--variants", default="poster,wgan-gp",
                        help=f"comma-separated, from {','.join(VARIANTS)} (default poster,wgan-gp)")
    parser.add_argument("--baseline", default=BASELINE, help=f"the variant /base compares with (default {BASELINE})")
    parser.add_argument("--seeds", default="0,1,2", help="training/generation seeds (default 0,1,2)")
    parser.add_argument("--train-subjects", type=int, default=8, help="phantom subjects trained on (default 8)")
    parser.add_argument("--heldout-subjects", type=int, default=4, help="phantom subjects held out (default 4)")
    parser.add_argument("--images", type=int, default=256, help="slices generated per run (default 256)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the stores and runs in this folder; runs already there are measured, not retrained")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if args.steps is None and args.seconds is None:
        args.seconds = 150.0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    root = args.keep or Path(tempfile.mkdtemp(prefix="brats-gan-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, heldout = make_stores(root, args.train_subjects, args.heldout_subjects)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [(variant, seed, root / f"{variant}-seed{seed}") for seed in seeds for variant in variants]
    train_all(jobs, train, args, env)
    rows = [{"variant": variant, "seed": seed, **measure(run, train, heldout, args.images, seed, env)}
            for variant, seed, run in jobs]
    result = {"length": f"{args.seconds:g} s" if args.seconds else f"{args.steps} steps", "seeds": seeds,
              "summary": summarise(rows, args.baseline), "runs": rows, "seconds": round(time.perf_counter() - started, 1),
              "folder": str(root)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['length']} per run, seeds {args.seeds}, {args.images} generated slices vs "
          f"{args.heldout_subjects} held-out subjects; medians over seeds; runs in {root}")
    print(f"{'variant':<22} {'SWD/floor':>9} {'range':>11} {'/base':>6} {'checker-real dB':>15} "
          f"{'MS-SSIM gap':>11} {'memorised':>9} {'steps':>6} {'ms/step':>7}")
    for s in result["summary"]:
        ratio = "-" if s["swd_vs_baseline"] is None else f"{s['swd_vs_baseline']:.3f}"
        span = f"{s['swd_ratio_range'][0]:.2f}-{s['swd_ratio_range'][1]:.2f}"
        print(f"{s['variant']:<22} {s['swd_ratio']:9.2f} {span:>11} {ratio:>6} {s['checkerboard_excess']:15.2f} "
              f"{s['ms_ssim_gap']:11.3f} {s['memorisation_share']:9.3f} {s['steps']:6.0f} {s['step_ms']:7.1f}")
    print("every run:")
    for r in rows:
        print(f"  {r['variant']:<22} seed {r['seed']}: SWD {r['swd']:.1f} / floor {r['swd_floor']:.1f} = "
              f"{r['swd_ratio']:.2f}, checkerboard {r['checkerboard']:.2f} dB (real {r['checkerboard_real']:.2f}), "
              f"MS-SSIM {r['ms_ssim_fake']:.3f} (real {r['ms_ssim_real']:.3f}), memorised "
              f"{r['memorisation_share']:.3f}, {r['steps']} steps, {r['step_ms']} ms/step")
    print(f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
