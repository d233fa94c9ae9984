
import pytest
from conftest import run_cli

from brats_gan.discover import DiscoveryError, discover_subjects, select_subjects
from brats_gan.phantoms import write_phantom_dataset


@pytest.mark.parametrize("layout, gz, first_id", [
    ("2020", True, "BraTS20_Training_001"),
    ("2020", False, "BraTS20_Training_001"),
    ("2021", True, "BraTS2021_00001"),
    ("2023", True, "BraTS-GLI-00001-000"),
])
def test_every_layout_is_found_with_canonical_modality_names(tmp_path, layout, gz, first_id):
    write_phantom_dataset(tmp_path, n_subjects=3, layout=layout, shape=(24, 24, 16), gz=gz)
    subjects = discover_subjects(tmp_path)
    assert [s.id for s in subjects][0] == first_id
    assert len(subjects) == 3
    assert set(subjects[0].files) == {"flair", "t1", "t1ce", "t2", "seg"}
    assert subjects[0].files["flair"].name.endswith(".nii.gz" if gz else ".nii")


def test_dataset_folder_given_one_level_above(tmp_path):
    write_phantom_dataset(tmp_path / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData",
                          n_subjects=2, layout="2020", shape=(24, 24, 16))
    assert len(discover_subjects(tmp_path / "BraTS2020_TrainingData")) == 2


def test_other_2023_collections_and_real_case(tmp_path, real_case):
    folder = tmp_path / "BraTS-MEN-00004-000"
    folder.mkdir()
    (folder / "BraTS-MEN-00004-000-t2f.nii.gz").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    [men] = discover_subjects(tmp_path)
    assert men.id == "BraTS-MEN-00004-000" and men.number == 4 and list(men.files) == ["flair"]
    [real] = discover_subjects(real_case)
    assert set(real.files) == {"flair", "t1", "t1ce", "t2"}


def test_poster_selection_001_to_015(tmp_path):
    write_phantom_dataset(tmp_path, n_subjects=17, layout="2020", shape=(24, 24, 16), modalities=("flair",),
                          with_seg=False)
    chosen = select_subjects(discover_subjects(tmp_path), "001-015")
    assert [s.number for s in chosen] == list(range(1, 16))
    assert [s.id for s in select_subjects(discover_subjects(tmp_path), "BraTS20_Training_017,3")] == [
        "BraTS20_Training_003", "BraTS20_Training_017"]


def test_clear_errors_for_empty_folder_and_bad_selection(tmp_path):
    with pytest.raises(DiscoveryError, match="no BraTS subjects found"):
        discover_subjects(tmp_path)
    with pytest.raises(DiscoveryError, match="not a folder"):
        discover_subjects(tmp_path / "missing")
    write_phantom_dataset(tmp_path / "d", n_subjects=2, layout="2021", shape=(24, 24, 16))
    with pytest.raises(DiscoveryError, match="matches none"):
        select_subjects(discover_subjects(tmp_path / "d"), "500-600")
    with pytest.raises(DiscoveryError, match="IDs not found"):
        select_subjects(discover_subjects(tmp_path / "d"), "BraTS2021_99999")


def test_ambiguous_or_directory_modality_files_are_reported_never_guessed(tmp_path):
    from brats_gan.preprocess import PreprocessConfig, prepare_subject

    write_phantom_dataset(tmp_path, n_subjects=3, layout="2020", shape=(24, 24, 16), gz=True)
    first, second, third = sorted(p for p in tmp_path.iterdir())
    gz = first / f"{first.name}_flair.nii.gz"
    (first / f"{first.name}_flair.nii").write_bytes(gz.read_bytes())  # the same scan twice, or two scans?
    flair = second / f"{second.name}_flair.nii.gz"
    flair.unlink()
    flair.mkdir()
    subjects = {s.id: s for s in discover_subjects(tmp_path)}
    assert set(subjects) == {first.name, second.name, third.name}, "no subject vanishes"
    config = PreprocessConfig(slices=4, size=32)
    ambiguous = prepare_subject(subjects[first.name], config).error
    assert ambiguous == (f"ambiguous flair: {first.name}_flair.nii and {first.name}_flair.nii.gz; keep one of them")
    assert prepare_subject(subjects[second.name], config).error == f"{flair.name} is a directory, not a NIfTI file"
    assert prepare_subject(subjects[third.name], config).error is None
    assert "flair" in subjects[first.name].problems and "t1" in subjects[first.name].files


@pytest.mark.parametrize("spec", ["", " ", ",", " , "])
def test_an_empty_subject_selection_is_refused_not_taken_as_every_subject(tmp_path, spec):
    write_phantom_dataset(tmp_path / "data", n_subjects=2, layout="2020", shape=(24, 24, 16), modalities=("flair",),
                          with_seg=False)
    out = tmp_path / "s.zarr"
    proc = run_cli("preprocess", tmp_path / "data", "--out", out, "--subjects", spec, "--workers", "1",
                   "--dashboard-port", "0")
    assert proc.returncode == 2, proc.output
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"brats-gan preprocess: error: --subjects {spec!r} names no subject; give IDs or case numbers "
                    "such as 001-015, or leave --subjects out to take every subject")
    assert "dashboard" not in proc.stdout and not out.exists(), "refused before any work"
    assert len(select_subjects(discover_subjects(tmp_path / "data"), None)) == 2, "no --subjects: every subject"


def test_a_case_number_shared_by_two_layouts_in_one_folder_is_refused_and_full_ids_work(tmp_path):
    write_phantom_dataset(tmp_path, n_subjects=3, layout="2020", shape=(24, 24, 16), modalities=("flair",),
                          with_seg=False)
    write_phantom_dataset(tmp_path, n_subjects=2, layout="2023", shape=(24, 24, 16), modalities=("flair",),
                          with_seg=False)
    subjects = discover_subjects(tmp_path)
    assert len(subjects) == 5
    for spec, numbers in [("1", "case number 1 matches"), ("001-015", "case numbers 1-15 match"),
                          ("BraTS20_Training_003,2", "case number 2 matches")]:
        with pytest.raises(DiscoveryError) as refused:
            select_subjects(subjects, spec)
        message = str(refused.value)
        assert message.startswith(f"--subjects {spec}: {numbers} subjects of 2 BraTS namings"), message
        assert "BraTS-GLI-*, BraTS20_Training_*" in message and "give full IDs" in message
    assert "BraTS-GLI-00001-000 and BraTS20_Training_001" in str(pytest.raises(
        DiscoveryError, select_subjects, subjects, "1").value)
    assert [s.id for s in select_subjects(subjects, "BraTS20_Training_001,BraTS-GLI-00002-000")] == [
        "BraTS-GLI-00002-000", "BraTS20_Training_001"]
    assert [s.id for s in select_subjects(subjects, "3")] == ["BraTS20_Training_003"], "only one naming has a 3"
