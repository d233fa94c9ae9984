"""`brats-gan info [--verify]`: a store's schema, counts and parameters, and optionally a read of every shard."""

from __future__ import annotations

import argparse
import json
import sys

from brats_gan.errors import UserError


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a store written by brats-gan preprocess or generate")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true",
                   help="also read every shard: present, decodable, finite, in [-1, 1] and equal to the checksums "
                        "its writer recorded (exit 1 when damaged)")


def run(args: argparse.Namespace) -> int:
    from brats_gan.schema import StoreError, read_summary

    try:
        s = read_summary(args.store)
    except StoreError as err:
        raise UserError(str(err)) from None
    info = {
        "store": s.path,
        "complete": s.complete,
        "format": f"{s.attrs['format']} v{s.attrs['format_version']} (brats_gan {s.attrs.get('tool_version')})",
        "image": {"dims": ["sample", "channel", "y", "x"], "shape": list(s.image_shape), "dtype": s.dtype,
                  "chunks": list(s.chunks), "shards": list(s.shards) if s.shards else None},
        "channels": list(s.channels),
        "samples": s.n_samples,
        "subjects": s.n_subjects,
        "skipped": s.attrs.get("skipped", []),
        "synthetic": s.attrs.get("synthetic", False),
        **({"checkpoint": s.attrs.get("checkpoint"), "seed": s.attrs.get("seed")} if s.attrs.get("synthetic") else {}),
        "params": s.attrs.get("params", {}),
    }
    status = 0
    if args.verify:
        from brats_gan.verify import check_store

        check = check_store(args.store, progress=not args.json)
        info["verify"] = {"ok": check.ok, "shards": check.shards, "checksums": check.checksums,
                          "seconds": round(check.seconds, 2),
                          "problems": [{"where": who, "problem": what} for who, what in check.problems]}
        status = 0 if check.ok else 1
    if args.json:
        print(json.dumps(info))
        return status
    for key, value in info.items():
        if key == "verify":
            continue
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        elif key == "skipped":
            print(f"skipped: {len(value)}")
            for item in value:
                print(f"  {item['subject']}: {item['reason']}")
        else:
            print(f"{key}: {value}")
    if args.verify:
        v = info["verify"]
        what = "pixels and checksums" if v["checksums"] else "pixels (no checksums recorded: an older writer)"
        print(f"verify: {'ok' if v['ok'] else 'DAMAGED'}, {v['shards']} shards read, {what}, {v['seconds']} s")
        for problem in v["problems"]:
            print(f"  {problem['where']}: {problem['problem']}", file=sys.stderr)
    return status
