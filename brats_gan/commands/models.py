"""`brats-gan models`: print a preset's generator and critic in the form of the poster's Tables I and II.

The shapes come from a forward pass of the real modules, so what this prints is what the trainer builds.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from brats_gan.errors import UserError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from brats_gan.models import PRESETS

    parser.add_argument(
        "--preset", default="paper", metavar="NAME", help=f"model preset, one of: {', '.join(PRESETS)} (default: paper)"
    )
    parser.add_argument("--recipe", default=None, metavar="NAME",
                        help="the training recipe whose network changes to apply (default: the preset's)")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"generator": [{"layer", "activation", "output_shape"}, ...], "discriminator": [...]}',
    )


def format_shape(shape: tuple[int, ...]) -> str:
    return " × ".join(str(n) for n in shape)


def format_table(title: str, rows: list[dict[str, Any]]) -> str:
    """One network as the poster prints it, plus a parameter column and a total line."""
    header = ("Layer", "Activation", "Output shape", "Parameters")
    body = [(r["layer"], r["activation"], format_shape(r["output_shape"]), f"{r['parameters']:,}") for r in rows]
    total = ("Total", "", "", f"{sum(r['parameters'] for r in rows):,}")
    widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *map(line, body), rule, line(total)])


def run(args: argparse.Namespace) -> int:
    from brats_gan.models import build_models, layer_table
    from brats_gan.recipes import model_config

    try:
        config = model_config(args.preset, args.recipe)
    except ValueError as err:
        raise UserError(str(err)) from None
    generator, critic = build_models(config)
    tables = {"generator": layer_table(generator), "discriminator": layer_table(critic)}
    if args.json:
        keep = ("layer", "activation", "output_shape")
        out = {
            name: [{k: list(r[k]) if k == "output_shape" else r[k] for k in keep} for r in rows]
            for name, rows in tables.items()
        }
        print(json.dumps(out, indent=2))
        return 0
    print(format_table(f"Generator (preset {args.preset})", tables["generator"]))
    print()
    print(format_table(f"Discriminator / critic (preset {args.preset})", tables["discriminator"]))
    return 0
