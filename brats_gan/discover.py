"""Find BraTS subjects and their modality files in every BraTS folder layout.

Layouts (the dataset folder given directly, or one level above it):
- 2020: ``BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz`` (also plain ``.nii``)
- 2021: ``BraTS2021_00000/BraTS2021_00000_flair.nii.gz``
- 2023+: ``BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz`` (GLI, MEN, MET, PED, SSA)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

MODALITIES = ("flair", "t1", "t1ce", "t2", "seg")
#: BraTS releases whose naming :func:`subject_id` and :func:`modality_filename` spell (all are read).
LAYOUTS = ("2020", "2021", "2023")
# BraTS 2023 renamed the files: t2f = FLAIR, t1n = native T1, t1c = contrast-enhanced T1, t2w = T2.
NAMES_2023 = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}
ALIASES = {**{m: m for m in MODALITIES}, **{new: old for old, new in NAMES_2023.items()}}
_FILE = re.compile(r"^(?P<subject>.+?)[_-](?P<modality>" + "|".join(sorted(ALIASES, key=len, reverse=True))
                   + r")\.nii(?:\.gz)?$", re.IGNORECASE)
_NUMBER = re.compile(r"(\d+)(?:-\d{3})?$")


class DiscoveryError(ValueError):
    """The folder or the selection does not give any usable subject."""


@dataclass(frozen=True)
class Subject:
    """One BraTS case: its ID (the folder name) and a file per canonical modality."""

    id: str
    files: dict[str, Path] = field(hash=False, compare=False)
    problems: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    """Modality -> why its file cannot be used (two candidates, a directory); reported per subject."""

    @property
    def number(self) -> int | None:
        """The case number users quote ("001 to 015"): 2020's 001, 2021's 00000, 2023's 00001 of -000."""
        match = _NUMBER.search(self.id)
        return int(match.group(1)) if match else None

    @property
    def naming(self) -> str:
        """The ID without its case number ("BraTS20_Training_", "BraTS-GLI-"): numbers count cases within
        one naming, so in a folder mixing namings a bare number names several patients."""
        match = _NUMBER.search(self.id)
        return self.id[: match.start()] if match else self.id


def subject_id(layout: str, number: int) -> str:
    """The subject folder name BraTS uses in ``layout`` (what :func:`discover_subjects` finds)."""
    check_layout(layout)
    number = int(number)
    if number < (1 if layout == "2020" else 0):
        raise ValueError(f"subject number {number} is not valid for the BraTS {layout} layout")
    if layout == "2020":
        return f"BraTS20_Training_{number:03d}"
    if layout == "2021":
        return f"BraTS2021_{number:05d}"
    return f"BraTS-GLI-{number:05d}-000"


def modality_filename(layout: str, subject: str, modality: str, gz: bool = True) -> str:
    """File name of one modality (canonical name, or "seg") of ``subject`` as BraTS ``layout`` spells it."""
    check_layout(layout)
    if modality not in NAMES_2023:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    ext = ".nii.gz" if gz else ".nii"
    if layout == "2023":
        return f"{subject}-{NAMES_2023[modality]}{ext}"
    return f"{subject}_{modality}{ext}"


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown BraTS layout {layout!r}; expected one of {LAYOUTS}")


def canonical_modality(name: str) -> str:
    """flair/t2f, t1ce/t1c, t1/t1n, t2/t2w, seg -> the BraTS 2020 names used in the store."""
    try:
        return ALIASES[name.lower()]
    except KeyError:
        raise DiscoveryError(f"unknown modality {name!r}; known: {', '.join(sorted(ALIASES))}") from None


def _subject_in(folder: Path) -> Subject | None:
    """The subject in ``folder``, or None when no file is named like one of its modalities. A modality with
    two candidate files (``_flair.nii`` beside ``_flair.nii.gz``: which one a directory listing gives first
    differs between file systems) or whose "file" is a directory is recorded as a problem, never guessed."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _FILE.match(path.name)
        if match and match.group("subject") == folder.name:
            found.setdefault(canonical_modality(match.group("modality")), []).append(path)
    files, problems = {}, {}
    for modality, paths in found.items():
        if len(paths) > 1:
            problems[modality] = f"ambiguous {modality}: {' and '.join(p.name for p in paths)}; keep one of them"
        elif paths[0].is_dir():
            problems[modality] = f"{paths[0].name} is a directory, not a NIfTI file"
        else:
            files[modality] = paths[0]
    return Subject(folder.name, files, problems) if found else None


def _subjects_below(folder: Path) -> list[Subject]:
    found = (_subject_in(child) for child in sorted(folder.iterdir()) if child.is_dir())
    return [s for s in found if s is not None]


def discover_subjects(root: str | Path) -> list[Subject]:
    """All subjects in ``root``, or in the dataset folders one level below it, sorted by ID."""
    root = Path(root)
    if not root.is_dir():
        raise DiscoveryError(f"{root}: not a folder")
    subjects = _subjects_below(root)
    if not subjects:
        for child in sorted(p for p in root.iterdir() if p.is_dir()):
            subjects.extend(_subjects_below(child))
    if not subjects:
        raise DiscoveryError(
            f"{root}: no BraTS subjects found (expected folders like BraTS20_Training_001/ holding "
            "BraTS20_Training_001_flair.nii.gz, here or one level below)"
        )
    ids = [s.id for s in subjects]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DiscoveryError(f"{root}: subject IDs found in more than one dataset folder: {duplicates[:5]}")
    return sorted(subjects, key=lambda s: s.id)


def parse_selection(spec: str) -> tuple[set[str], list[tuple[int, int]]]:
    """'001-015,BraTS20_Training_042,100' -> exact IDs and inclusive number ranges."""
    ids: set[str] = set()
    ranges: list[tuple[int, int]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if re.fullmatch(r"\d+", item):
            ranges.append((int(item), int(item)))
        elif re.fullmatch(r"\d+-\d+", item):
            a, b = (int(x) for x in item.split("-"))
            if a > b:
                raise DiscoveryError(f"subject range {item!r} runs backwards")
            ranges.append((a, b))
        else:
            ids.add(item)
    return ids, ranges


def select_subjects(subjects: list[Subject], spec: str | None) -> list[Subject]:
    """Keep the subjects named by ``spec`` (IDs and/or case-number ranges such as the poster's 001-015);
    None takes them all. A selection that names nothing, or a case number that names patients of two
    namings (a folder mixing BraTS releases), is refused rather than guessed."""
    if spec is None:
        return list(subjects)
    if not spec.strip(" ,"):
        raise DiscoveryError(f"--subjects {spec!r} names no subject; give IDs or case numbers such as 001-015, "
                             "or leave --subjects out to take every subject")
    ids, ranges = parse_selection(spec)
    for a, b in ranges:
        _refuse_ambiguous_numbers(spec, [s for s in subjects if s.number is not None and a <= s.number <= b],
                                  f"case number {a} matches" if a == b else f"case numbers {a}-{b} match")
    chosen = [
        s for s in subjects
        if s.id in ids or (s.number is not None and any(a <= s.number <= b for a, b in ranges))
    ]
    unknown = ids - {s.id for s in subjects}
    if unknown:
        raise DiscoveryError(f"--subjects names IDs not found: {', '.join(sorted(unknown)[:5])}")
    if not chosen:
        raise DiscoveryError(f"--subjects {spec!r} matches none of the {len(subjects)} subjects found")
    return chosen


def _refuse_ambiguous_numbers(spec: str, matched: list[Subject], numbers: str) -> None:
    namings = sorted({s.naming for s in matched})
    if len(namings) < 2:
        return
    firsts = [next(s.id for s in matched if s.naming == naming) for naming in namings]
    raise DiscoveryError(
        f"--subjects {spec}: {numbers} subjects of {len(namings)} BraTS namings in this folder "
        f"({', '.join(n + '*' for n in namings)}), e.g. {' and '.join(firsts)}; a case number names a patient only "
        f"within one naming, so give full IDs instead (e.g. --subjects {firsts[-1]})"
    )
