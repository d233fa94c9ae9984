"""`brats-gan info [--verify] [--sample I]`: a store's schema, counts and parameters, optionally a read of every
shard, or where one sample came from (its source files, slice and affine)."""

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
    p.add_argument("--sample", type=int, metavar="I",
                   help="print where sample I (0-based) came from instead: its subject, slice_index and, per channel, "
                        "the source file (path, size, SHA-256), the slice's index in it, the affine and the pixel -> "
                        "voxel map; a synthetic sample, its checkpoint")


def run(args: argparse.Namespace) -> int:
    from brats_gan.schema import StoreError, read_summary, sample_provenance

    try:
        s = read_summary(args.store)
    except StoreError as err:
        raise UserError(str(err)) from None
    try:
        sample = None if args.sample is None else sample_provenance(args.store, args.sample)
    except StoreError as err:
        raise UserError(f"--sample {args.sample}: {err}") from None
    if sample is not None and not args.verify:
        print(json.dumps(sample) if args.json else describe_sample(sample))
        return 0
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
        "provenance": provenance_line(s.attrs),
        **({"sample": sample} if sample is not None else {}),
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
        if key == "sample":
            print(describe_sample(value))
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


def provenance_line(attrs: dict) -> str:
    """What the store records of where its slices came from, in one line."""
    if attrs.get("synthetic"):
        checkpoint = attrs.get("checkpoint") or {}
        return (f"generated from {checkpoint.get('run')} step {checkpoint.get('step')} "
                f"({checkpoint.get('weights')} weights, sha256 {str(checkpoint.get('sha256'))[:12]})")
    if not attrs.get("sources"):
        return ("none: written before brats_gan recorded it (format_version 1); preprocess again to record it"
                if attrs.get("format_version") == 1 else "none recorded yet (store not complete)")
    return (f"source files of {len(attrs['sources'])} subjects, relative to {attrs.get('input_folder')}/; "
            "each slice: brats-gan info STORE --sample I")


def _matrix(rows: list) -> str:
    return "[" + ", ".join("[" + " ".join(f"{v:g}" for v in row) + "]" for row in rows) + "]"


def describe_sample(r: dict) -> str:
    """``brats-gan info --sample``'s text: the sample, then one block per channel's source file."""
    fraction = "" if r["tumour_fraction"] is None else f", tumour_fraction {r['tumour_fraction']:.4f}"
    where = "none: generated" if r["synthetic"] else "axial, in the RAS-reoriented volume"
    lines = [f"sample {r['sample']} of {r['store']}: subject {r['subject']}, slice_index {r['slice_index']} "
             f"({where}){fraction}"]
    if r["synthetic"]:
        checkpoint = r.get("checkpoint") or {}
        lines.append(f"  generated: no source file; drawn from {checkpoint.get('run')} step {checkpoint.get('step')} "
                     f"({checkpoint.get('preset')}, {checkpoint.get('weights')} weights {checkpoint.get('weights_file')}, "
                     f"sha256 {checkpoint.get('sha256')}), seed {r.get('seed')}")
        return "\n".join(lines)
    if r["sources"] is None:
        lines.append("  no provenance: this store was written before brats_gan recorded it (format_version "
                     f"{r['format_version']}); preprocess again to record it")
        return "\n".join(lines)
    axes = "ijk"
    for f in r["sources"]:
        shape = "x".join(map(str, f["source_shape"]))
        spacing = " x ".join(f"{v:g}" for v in f["voxel_spacing"])
        lines += [
            f"  {f['channel']}: {r['input_folder']}/{f['path']} ({f['bytes']} bytes, sha256 {f['sha256']})",
            f"    source slice {f['source_slice']} along voxel axis {f['slice_axis']} ({axes[f['slice_axis']]}) of its "
            f"{shape} voxels ({spacing} mm), stored {f['orientation']}, reoriented to RAS",
            f"    affine: {_matrix(f['affine'])}",
            f"    pixel (column, row, slice_index, 1) -> voxel (i, j, k, 1): {_matrix(f['pixel_to_voxel'])}",
            f"    intensity window: {f['intensity_window'][0]:g} .. {f['intensity_window'][1]:g} -> -1 .. 1",
        ]
    if "segmentation" in r:
        seg = r["segmentation"]
        lines.append(f"  tumour_fraction from {r['input_folder']}/{seg['path']} ({seg['bytes']} bytes, sha256 {seg['sha256']})")
    return "\n".join(lines)
