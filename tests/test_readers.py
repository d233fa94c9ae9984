"""The store read as other projects read it: a preprocessed and a generated store, opened with each Zarr v3
reader the README names, give every array bit for bit as zarr-python does, and subject names through the
store's own layout.

Readers: xarray (``xr.open_zarr``), ``dask.array.from_zarr``, TensorStore (its ``zarr3`` driver),
zarr-python with the Rust ``zarrs`` codec pipeline in strict mode (so that nothing falls back to
zarr-python's own codecs), and zarrita under Node.js (``tests/readers/zarrita``). Each is skipped, with
the reason, where it is not installed: ``pip install -e .[test]`` brings TensorStore and zarrs, and
``npm ci --prefix tests/readers/zarrita`` zarrita. Node before 24 has no Float16Array, so the zarrita
reader compares float16 pixels as their 16-bit patterns (see ``read.mjs``).

Every array is compared, as listed by the store's own ``zarr.json`` files, so an array added to the
store is covered without a change here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brats_gan.discover import discover_subjects
from brats_gan.generate import generate
from brats_gan.preprocess import PreprocessConfig, run_preprocess

ZARRITA = Path(__file__).parent / "readers" / "zarrita"
README = Path(__file__).parents[1] / "README.md"
# The data types of the Zarr v3 core specification (every v3 reader decodes them), plus their r<bits> raw form.
CORE_DATA_TYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                   "float16", "float32", "float64", "complex64", "complex128"}


# Group attributes xarray reads as the Dataset's structure, not as attrs (CF: non-index coordinates that no
# data variable lists, such as per-subject arrays, are named in the group's `coordinates`).
XARRAY_DECODES = ("coordinates",)


@pytest.fixture(scope="module")
def stores(phantoms_2020: Path, dask_client, uninterrupted: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``preprocessed``: six phantom subjects, flair and t2, 4 slices of 32x32 (brain at 64x64 cropped);
    ``generated``: 8 images of the suite's shared two-rank training run."""
    root = tmp_path_factory.mktemp("readers")
    real = root / "preprocessed.zarr"
    report = run_preprocess(discover_subjects(phantoms_2020), real,
                            PreprocessConfig(modalities=("flair", "t2"), slices=4, size=32), dask_client,
                            progress=False)
    assert report.complete
    synthetic = root / "generated.zarr"
    generate(uninterrupted, synthetic, 8, progress=False)
    return {"preprocessed": real, "generated": synthetic}


def array_names(store: Path) -> list[str]:
    """Every array of the store, from its own zarr.json files (not the consolidated copy)."""
    return sorted(meta.parent.relative_to(store).as_posix() for meta in store.rglob("zarr.json")
                  if json.loads(meta.read_text())["node_type"] == "array")


def group_attributes(store: Path) -> dict[str, Any]:
    """The group's attributes as any JSON parser reads them from its zarr.json."""
    return json.loads((store / "zarr.json").read_text())["attributes"]


def is_strings(values: np.ndarray) -> bool:
    return values.dtype.kind in "OTU"


def subject_names(subject: Any, attributes: dict[str, Any]) -> list[str]:
    """Each sample's subject name, through the store's layout: the names themselves (format 1), or integer
    codes into the group attribute ``subject_names`` (the core-types layout issue 20 proposes)."""
    values = np.asarray(subject) if not isinstance(subject, list) else subject
    if isinstance(values, list) or is_strings(values):
        return [str(v) for v in values]
    return [attributes["subject_names"][int(code)] for code in values]


# ---------------------------------------------------------------- the readers: (arrays, group attributes)


def read_with_zarr_python(store: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    import zarr

    group = zarr.open_group(store, mode="r", use_consolidated=False)
    return {name: group[name][...] for name in names}, dict(group.attrs)


def read_with_xarray(store: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    import xarray as xr

    with xr.open_zarr(store) as ds:
        return {name: ds[name].values for name in names}, dict(ds.attrs)


def read_with_dask(store: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    import dask.array as da

    return {name: da.from_zarr(str(store), component=name).compute() for name in names}, group_attributes(store)


def read_with_tensorstore(store: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    ts = pytest.importorskip("tensorstore", reason="TensorStore is not installed (`pip install -e .[test]`)")

    arrays: dict[str, Any] = {}
    for name in names:
        try:
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / name)}}
            arrays[name] = ts.open(spec, read=True).result().read().result()
        except ValueError as err:  # TensorStore's refusals (FAILED_PRECONDITION, ...) are ValueErrors
            arrays[name] = err
    attributes = ts.open({"driver": "json", "kvstore": {"driver": "file", "path": str(store / "zarr.json")},
                          "json_pointer": "/attributes"}, read=True).result().read().result()
    return arrays, attributes.item() if isinstance(attributes, np.ndarray) else attributes


def read_with_zarrs(store: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    pytest.importorskip("zarrs", reason="the zarrs codec pipeline is not installed (`pip install -e .[test]`)")
    import zarr

    arrays: dict[str, Any] = {}
    # strict: refuse rather than hand an array zarrs cannot decode to zarr-python's own pipeline
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline", "codec_pipeline.strict": True}):
        group = zarr.open_group(store, mode="r", use_consolidated=False)
        for name in names:
            array = group[name]
            assert type(array.async_array.codec_pipeline).__name__ == "ZarrsCodecPipeline"
            try:
                arrays[name] = array[...]
            except Exception as err:  # zarrs.pipeline.UnsupportedDataTypeError and friends
                arrays[name] = err
        return arrays, dict(group.attrs)


def read_with_zarrita(store: Path, names: list[str], out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("zarrita runs under Node.js, and `node` is not on PATH")
    if not (ZARRITA / "node_modules" / "zarrita" / "package.json").is_file():
        pytest.skip("zarrita is not installed: `npm ci --prefix tests/readers/zarrita` installs it")
    out.mkdir()
    done = subprocess.run([node, ZARRITA / "read.mjs", "--float16-bits", store, out, *names],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"node read.mjs exited {done.returncode}:\n{done.stdout}{done.stderr}"
    result = json.loads((out / "result.json").read_text())
    order = "<" if result["endianness"] == "LE" else ">"
    arrays: dict[str, Any] = {}
    for name, read in result["arrays"].items():
        if "error" in read:
            arrays[name] = RuntimeError(read["error"])
        elif "strings" in read:
            arrays[name] = read["strings"]
        else:
            arrays[name] = {"data_type": read["data_type"], "shape": read["shape"],
                            "bytes": (out / read["file"]).read_bytes(), "order": order}
    return arrays, result["attributes"]


def as_zarr_python_dtype(read: dict[str, Any], reference: np.ndarray) -> np.ndarray:
    """zarrita's raw bytes as an array of the reference's dtype, once its data type name agrees."""
    assert read["data_type"] == str(reference.dtype), f"zarrita's data type {read['data_type']}"
    return np.frombuffer(read["bytes"], dtype=reference.dtype.newbyteorder(read["order"])).reshape(read["shape"])


READERS: dict[str, Callable[..., tuple[dict[str, Any], dict[str, Any]]]] = {
    "xarray": read_with_xarray,
    "dask": read_with_dask,
    "tensorstore": read_with_tensorstore,
    "zarrs": read_with_zarrs,
    "zarrita": read_with_zarrita,
}


def as_read(got: Any, reference: np.ndarray) -> Any:
    """What a reader returned for one array, as a list of str (strings) or a numpy array; exceptions as is."""
    if isinstance(got, Exception):
        return got
    if isinstance(got, dict):
        return as_zarr_python_dtype(got, reference)
    return got if isinstance(got, list) else np.asarray(got).tolist() if is_strings(reference) else np.asarray(got)


def differences(got: Any, reference: np.ndarray) -> str | None:
    """Why ``got`` (from ``as_read``) is not bit for bit ``reference`` (None when it is)."""
    if isinstance(got, Exception):
        return f"refused: {type(got).__module__}.{type(got).__name__}: {' '.join(str(got).split())[:300]}"
    if is_strings(reference):
        if not isinstance(got, list) or not all(isinstance(v, str) for v in got):
            return f"not strings: {type(got).__name__}"
        return None if got == reference.tolist() else f"other strings: {got[:3]}..."
    if not isinstance(got, np.ndarray):
        return f"a {type(got).__name__}, not an array"
    if got.dtype != reference.dtype or got.shape != reference.shape:
        return f"{got.dtype} {got.shape}, zarr-python {reference.dtype} {reference.shape}"
    if np.ascontiguousarray(got).astype(got.dtype.newbyteorder("<")).tobytes() != \
            np.ascontiguousarray(reference).astype(reference.dtype.newbyteorder("<")).tobytes():
        return f"other values: {np.count_nonzero(got != reference)} of {got.size} differ"
    return None


@pytest.mark.parametrize("kind", ["preprocessed", "generated"])
@pytest.mark.parametrize("reader", ["xarray", "dask", "tensorstore", "zarrs", "zarrita"])
def test_every_array_reads_bit_for_bit_as_zarr_python_reads_it(reader: str, kind: str, stores: dict[str, Path],
                                                              tmp_path: Path) -> None:
    store = stores[kind]
    names = array_names(store)
    assert {"image", "subject", "slice_index"} <= set(names), names
    expected, expected_attributes = read_with_zarr_python(store, names)
    extra = {"out": tmp_path / "zarrita"} if reader == "zarrita" else {}
    got, attributes = READERS[reader](store, names, **extra)
    if reader == "xarray":
        expected_attributes = {k: v for k, v in expected_attributes.items() if k not in XARRAY_DECODES}
    assert attributes == expected_attributes, f"{reader} read other group attributes"
    got = {name: as_read(got.get(name, KeyError(f"{reader} returned no {name}")), expected[name]) for name in names}
    problems = {name: why for name in names if (why := differences(got[name], expected[name]))}
    assert not problems, f"{reader} on the {kind} store:\n" + "\n".join(f"  {n}: {w}" for n, w in problems.items())
    assert subject_names(got["subject"], attributes) == subject_names(expected["subject"], expected_attributes)


@pytest.mark.parametrize("kind", ["preprocessed", "generated"])
def test_every_array_holds_a_core_zarr_v3_data_type(kind: str, stores: dict[str, Path]) -> None:
    """Names live in the group attributes, not in arrays: zarr-python's variable-length strings (and its
    fixed-width string types) are extensions that TensorStore, zarrs and zarrita refuse."""
    store = stores[kind]
    types = {name: json.loads((store / name / "zarr.json").read_text())["data_type"] for name in array_names(store)}
    assert {name: t for name, t in types.items() if t not in CORE_DATA_TYPES} == {}
    attributes = group_attributes(store)
    assert attributes["format_version"] == 2 and attributes["channel_names"]
    subject = read_with_zarr_python(store, ["subject"])[0]["subject"]
    assert subject.dtype == np.int32 and 0 <= subject.min() and subject.max() < len(attributes["subject_names"])


def readme_snippet(marker: str) -> str:
    """The README's python code block that contains ``marker``: the tests run what users copy."""
    blocks = [block.split("\n", 1)[1] for block in README.read_text().split("```")[1::2] if block.startswith("python")]
    (found,) = [block for block in blocks if marker in block]
    return found


@pytest.mark.parametrize("kind", ["preprocessed", "generated"])
def test_the_readmes_tensorstore_snippet_reads_names_pixels_and_slice_indices(kind: str, stores: dict[str, Path],
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who never ran brats_gan opens the store with TensorStore from the README alone: the snippet
    (run from the store's folder, with its relative path, as written) gives what brats_gan's own
    ``open_store`` gives."""
    pytest.importorskip("tensorstore", reason="TensorStore is not installed (`pip install -e .[test]`)")
    from brats_gan import open_store

    code = readme_snippet("import tensorstore")
    assert 'store = "brats2020.zarr"' in code
    store = stores[kind]
    monkeypatch.chdir(store.parent)
    seen: dict[str, Any] = {}
    exec(code.replace('"brats2020.zarr"', repr(store.name)), seen)  # noqa: S102  (the README's own code)
    ds = open_store(store)
    assert seen["subjects"].tolist() == ds.subject.values.tolist()
    assert list(seen["channels"]) == ds.channel.values.tolist()
    assert np.array_equal(seen["slice_index"], ds.slice_index.values)
    assert seen["sample"].dtype == np.float16
    assert seen["sample"].tobytes() == ds.image[0].values.tobytes()
