"""First-use mistakes (issue 12): misspelt reader options, empty sources, a psp that lacks an
element of the source, messages.  Every check here runs before any cluster starts."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from helpers import SAMPLES

from gmp_pipeline.cli import main
from gmp_pipeline.errors import InputError, SourceError
from gmp_pipeline.readers import open_reader

MD17 = SAMPLES / "md17" / "ethanol.npz"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# -- unknown reader options ---------------------------------------------------------------------

def test_unknown_reader_option_is_refused_with_the_valid_ones():
    with pytest.raises(InputError) as exc:
        open_reader("md17", MD17, bogus=3)
    msg = str(exc.value)
    assert "'bogus'" in msg and "md17" in msg
    assert "energy_unit, molecule, skip_bad_records" in msg


def test_misspelt_reader_option_suggests_the_close_match():
    with pytest.raises(InputError, match=r"did you mean 'energy_unit'"):
        open_reader("md17", MD17, energy_units="eV")
    with pytest.raises(InputError, match=r"'energy_keys'.*did you mean 'energy_key'"):
        open_reader("qm9", SAMPLES / "qm9", energy_keys="U")
    # the options each reader really has are still accepted
    assert open_reader("md17", MD17, energy_unit="eV").units["energy"] == "eV"
    assert len(open_reader("qm9", SAMPLES / "qm9", energy_key="H")) == 20


def test_ocp_lists_the_options_of_the_detected_format():
    with pytest.raises(InputError) as exc:
        open_reader("ocp", SAMPLES / "oc20_lmdb" / "pyg2_is2re_style", energy_target="total")
    msg = str(exc.value)
    assert "'energy_target'" in msg and "energy_key" in msg and "LMDB" in msg


@pytest.mark.parametrize("option", ["foo=1", "energy_units=eV"])
def test_cli_unknown_reader_option_is_one_clean_error(tmp_path, option):
    res = run_cli("featurize", "md17", MD17, "-o", tmp_path / "x.zarr", "--reader-option",
                  option, "--no-progress")
    assert res.exit_code == 1
    assert "Error: unknown reader option" in res.output and option.split("=")[0] in res.output
    assert "valid options: energy_unit, molecule, skip_bad_records" in res.output
    assert "Traceback" not in res.output and "dashboard" not in res.output
    assert not (tmp_path / "x.zarr").exists()


# -- empty sources ------------------------------------------------------------------------------

def _small_featurizer():
    from helpers import SMALL_FEATURES

    from gmp_pipeline.features import GMPFeaturizer

    return GMPFeaturizer(**SMALL_FEATURES)


def _write_md17(path, numbers=(8, 1, 1), m=3):
    import numpy as np

    n = len(numbers)
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(m, n, 3)) + np.arange(n)[None, :, None] * 1.5
    np.savez(path, R=pos, z=np.asarray(numbers), E=np.zeros((m, 1)), F=np.zeros((m, n, 3)))
    return path


def test_cli_empty_qm9_directory_is_refused_before_any_store(tmp_path):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    res = run_cli("featurize", "qm9", empty, "-o", tmp_path / "o.zarr", "--no-progress")
    assert res.exit_code == 1
    assert f"Error: file '{empty}': the qm9 source holds no structures" in res.output
    assert "Traceback" not in res.output and "dashboard" not in res.output
    assert not (tmp_path / "o.zarr").exists()


def test_md17_without_frames_is_refused_by_the_library(tmp_path):
    from gmp_pipeline.errors import SourceError
    from gmp_pipeline.pipeline import featurize_to_store

    src = _write_md17(tmp_path / "empty.npz", m=0)
    with pytest.raises(SourceError, match=r"empty\.npz.*holds no structures"):
        featurize_to_store(open_reader("md17", src), tmp_path / "o.zarr", _small_featurizer(),
                           progress=False)
    assert not (tmp_path / "o.zarr").exists()


# -- an element the pseudopotential lacks --------------------------------------------------------

_FRAME = 'Properties=species:S:1:pos:R:3 energy={e} pbc="F F F"'


def _write_extxyz_with_am(path):
    water = ["O 0.0 0.0 0.0", "H 0.96 0.0 0.0", "H -0.24 0.93 0.0"]
    amo2 = ["Am 0.0 0.0 0.0", "O 1.8 0.0 0.0", "O -1.8 0.0 0.0"]
    lines = []
    for k, atoms in enumerate([water, amo2, water]):
        lines += [str(len(atoms)), _FRAME.format(e=-1.0 - k)] + atoms
    path.write_text("\n".join(lines) + "\n")
    return path


def test_element_missing_from_psp_is_a_record_error_naming_file_record_element(tmp_path):
    from gmp_pipeline.errors import SourceError
    from gmp_pipeline.pipeline import featurize_to_store

    src = _write_extxyz_with_am(tmp_path / "mixed.extxyz")
    with pytest.raises(SourceError) as exc:
        featurize_to_store(open_reader("ase", src), tmp_path / "o.zarr", _small_featurizer(),
                           progress=False)
    msg = str(exc.value)
    assert f"file '{src}'" in msg and "record 1" in msg and "Am (Z=95)" in msg
    assert "QE-kjpaw" in msg


def test_element_missing_from_psp_is_skipped_with_skip_bad_records(tmp_path):
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.store.reader import open_store

    src = _write_extxyz_with_am(tmp_path / "mixed.extxyz")
    out = tmp_path / "o.zarr"
    summary = featurize_to_store(open_reader("ase", src, skip_bad_records=True), out,
                                 _small_featurizer(), progress=False)
    assert summary.n_structures == 2
    assert [i for i, _ in summary.skipped_records] == [1]
    assert "Am (Z=95)" in summary.skipped_records[0][1]
    st = open_store(out)
    assert len(st) == 2


def test_element_missing_from_psp_is_refused_before_the_cluster(tmp_path):
    src = _write_md17(tmp_path / "amo2.npz", numbers=(95, 8, 8))
    res = run_cli("featurize", "md17", src, "-o", tmp_path / "o.zarr", "--no-progress")
    assert res.exit_code == 1
    assert f"Error: file '{src}': element Am (Z=95) has no entry in psp file" in res.output
    assert "dashboard" not in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.zarr").exists()


# -- messages -----------------------------------------------------------------------------------

def test_feature_yaml_bad_value_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "neg.yaml"
    bad.write_text("orders: [-1, 0]\nsigmas: [-0.4]\npsp: QE-kjpaw\n")
    res = run_cli("featurize", "md17", MD17, "-o", tmp_path / "x.zarr", "--features", bad,
                  "--no-progress")
    assert res.exit_code == 1
    assert f"Error: feature file '{bad}', key 'sigmas': -0.4 is not a positive" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.zarr").exists()


def test_messages_use_singular_for_one(tmp_path):
    from gmp_pipeline.pipeline import featurize_to_store

    src = _write_md17(tmp_path / "one.npz", m=1)
    lines = []
    summary = featurize_to_store(open_reader("md17", src), tmp_path / "o.zarr",
                                 _small_featurizer(), progress=False, log=lines.append)
    assert summary.n_tasks == 1
    assert "planned 1 task over 1 structure (3 atoms)" in lines
    from gmp_pipeline.pipeline.run import counted

    assert counted(1, "structure") == "1 structure" and counted(2, "task") == "2 tasks"


def test_s2ef_shard_without_sidecar_warns_once(tmp_path, caplog):
    import logging

    import numpy as np
    from fixtures.ocp_writers import s2ef_frame_text

    rng = np.random.default_rng(1)
    p = tmp_path / "7.extxyz"
    text = ""
    for _ in range(2):
        pos = rng.normal(size=(2, 3)) * 0.3 + [[0, 0, 0], [0, 0, 1.0]]
        text += s2ef_frame_text(numbers=[1, 1], positions=pos, cell=np.eye(3) * 6,
                                fixed=[0, 0], tags=[1, 1], forces=np.zeros((2, 3)), energy=-1.0)
    p.write_text(text)
    with caplog.at_level(logging.WARNING, logger="gmp_pipeline.readers"):
        r = open_reader("ocp", p)
        assert len(r) == 2 and r.n_atoms().tolist() == [2, 2]
        recs = list(r.read())
        open_reader("ocp", p).describe()
    warned = [rec.getMessage() for rec in caplog.records if "sidecar" in rec.getMessage()]
    assert len(warned) == 1, warned
    assert "7.txt is missing" in warned[0] and "ids are lost" in warned[0]
    assert recs[0].info["sid"] == -1


# -- the source's identity in the fingerprint ----------------------------------------------------

def test_rewritten_source_is_refused_like_a_changed_configuration(tmp_path):
    import numpy as np

    from gmp_pipeline.errors import StoreError
    from gmp_pipeline.pipeline import featurize_to_store

    src = _write_md17(tmp_path / "mol.npz", m=4)
    out = tmp_path / "o.zarr"
    fz = _small_featurizer()
    assert featurize_to_store(open_reader("md17", src), out, fz, progress=False).state == "new"
    # nothing changed: still "already complete", nothing recomputed
    again = featurize_to_store(open_reader("md17", src), out, fz, progress=False)
    assert again.state == "complete" and again.tasks_computed == 0
    # same file name, frame count and size; other positions
    size = os.path.getsize(src)
    with np.load(src) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["R"] = arrays["R"] + 0.05
    np.savez(src, **arrays)
    assert os.path.getsize(src) == size
    with pytest.raises(StoreError) as exc:
        featurize_to_store(open_reader("md17", src), out, fz, progress=False)
    msg = str(exc.value)
    assert "source that has changed" in msg and "mol.npz" in msg and "sample_sha256" in msg
    assert "--overwrite" in msg


def test_directory_source_identity_sees_a_rewritten_member(tmp_path):
    from gmp_pipeline.store.layout import source_identity

    d = tmp_path / "qm9"
    d.mkdir()
    for k in range(6):
        (d / f"m{k}.xyz").write_text(f"molecule {k}\n")
    first = source_identity([d])
    assert source_identity([d]) == first
    assert first[str(d)]["files"] == 6
    (d / "m2.xyz").write_text("molecule X\n")      # same size, not a sampled member
    os.utime(d / "m2.xyz", ns=(1, 1))
    assert source_identity([d])[str(d)]["listing_sha256"] != first[str(d)]["listing_sha256"]


def test_store_written_before_source_identity_still_resumes(tmp_path):
    from gmp_pipeline.store.layout import fingerprint, fingerprints_match

    parts = {"feature_config": {}, "source": {}, "options": {}}
    old = {"fingerprint": fingerprint(parts), "fingerprint_parts": parts}
    new_parts = {**parts, "source_identity": {"/x": {"size": 1}}}
    new = {"fingerprint": fingerprint(new_parts), "fingerprint_parts": new_parts}
    assert fingerprints_match(old, new)
    changed = {**new_parts, "source_identity": {"/x": {"size": 2}}}
    assert not fingerprints_match(new, {"fingerprint": fingerprint(changed),
                                        "fingerprint_parts": changed})


def test_source_whose_every_record_is_skipped_is_not_a_complete_store(tmp_path):
    from gmp_pipeline.errors import SourceError
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.store.layout import read_root_attrs

    src = _write_md17(tmp_path / "amo2.npz", numbers=(95, 8, 8))
    out = tmp_path / "o.zarr"
    with pytest.raises(SourceError, match=r"amo2\.npz.*every one of the 3 records was skipped"):
        featurize_to_store(open_reader("md17", src, skip_bad_records=True), out,
                           _small_featurizer(), progress=False)
    assert not (read_root_attrs(out) or {}).get("complete")


def test_nonfinite_positions_are_a_bad_record_that_skip_bad_records_skips(tmp_path):
    import ase.io
    from ase.build import molecule

    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.readers import open_reader
    from gmp_pipeline.store import open_store

    frames = [molecule("H2O"), molecule("CH4"), molecule("NH3")]
    pos = frames[1].get_positions()
    pos[2, 0] = float("nan")
    frames[1].set_positions(pos)
    src = tmp_path / "nan.extxyz"
    ase.io.write(src, frames, format="extxyz")
    fz = GMPFeaturizer(orders=[-1, 0], sigmas=[0.5])
    with pytest.raises(SourceError, match=r"nan\.extxyz', record 1, field 'positions': atom 2"):
        featurize_to_store(open_reader("ase", str(src)), tmp_path / "a.zarr", fz,
                           progress=False, log=lambda m: None)
    featurize_to_store(open_reader("ase", str(src), skip_bad_records=True), tmp_path / "b.zarr",
                       fz, progress=False, log=lambda m: None)
    st = open_store(tmp_path / "b.zarr")
    assert len(st) == 2 and st.attrs["counts"]["n_skipped_records"] == 1
