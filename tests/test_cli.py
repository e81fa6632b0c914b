"""End-to-end: `gmp-pipeline featurize` through the CLI on a multi-process LocalCluster, for every
reader kind with a bundled sample; then `inspect` and `verify`."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SAMPLES, check_store_against_source, write_features_yaml

from gmp_pipeline.cli import main

#: a bundled sample per reader kind, and how many structures to compare in full
SOURCES = {
    "md17": (SAMPLES / "md17" / "ethanol.npz", 8),
    "rmd17": (SAMPLES / "rmd17" / "rmd17_ethanol_test_01.npz", 8),
    "qm9": (SAMPLES / "qm9", None),
    "ase": (SAMPLES / "extxyz" / "toy_c3h8_relax.extxyz", 10),
    "ocp": (SAMPLES / "oc20_lmdb" / "pyg2_is2re_style", None),
}


def _kinds():
    from gmp_pipeline.readers import reader_names

    names = reader_names()
    return [pytest.param(k, marks=pytest.mark.skipif(k not in names,
                                                     reason=f"reader {k!r} not available"))
            for k in SOURCES]


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.mark.parametrize("kind", _kinds())
def test_featurize_inspect_verify_every_reader(kind, tmp_path, dask_address):
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader
    from helpers import SMALL_FEATURES

    path, n_check = SOURCES[kind]
    feats = write_features_yaml(tmp_path / "f.yaml")
    out = tmp_path / f"{kind}.zarr"
    res = run_cli("featurize", kind, path, "-o", out, "--features", feats,
                  "--cluster", dask_address, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "Dask dashboard:" in res.output
    assert "wrote" in res.output

    reader = open_reader(kind, path)
    fz = GMPFeaturizer(**SMALL_FEATURES)
    n = len(reader)
    idx = None if n_check is None else sorted(set(np.linspace(0, n - 1, n_check).astype(int)))
    assert check_store_against_source(out, reader, fz, idx) > 0

    res = run_cli("inspect", out)
    assert res.exit_code == 0, res.output
    assert "complete:    yes" in res.output
    assert f"{n} structures" in res.output
    assert "pairs/dfeatures" in res.output and "per pair" in res.output

    res = run_cli("verify", out, "--sample", 3)
    assert res.exit_code == 0, res.output
    assert "verify: OK" in res.output


def test_no_derivatives_float64(tmp_path, dask_address):
    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.readers import open_reader
    from gmp_pipeline.store import open_store
    from helpers import SMALL_FEATURES

    path = SAMPLES / "qm9"
    out = tmp_path / "q.zarr"
    res = run_cli("featurize", "qm9", path, "-o", out, "--features",
                  write_features_yaml(tmp_path / "f.yaml"), "--no-derivatives",
                  "--dtype", "float64", "--cluster", dask_address, "--no-progress")
    assert res.exit_code == 0, res.output
    st = open_store(out)
    assert not st.has_derivatives and st.array("atoms/features").dtype == np.float64
    check_store_against_source(out, open_reader("qm9", path), GMPFeaturizer(**SMALL_FEATURES),
                               derivatives=False)
    assert run_cli("verify", out, "--sample", 2).exit_code == 0


def test_help_texts():
    res = run_cli("--help")
    assert res.exit_code == 0 and "featurize" in res.output and "verify" in res.output
    res = run_cli("featurize", "--help")
    for opt in ("--features", "--derivatives", "--cluster", "--workers", "--chunk-size",
                "--dtype", "--overwrite", "--skip-bad-records", "--dry-run"):
        assert opt in res.output


def test_default_feature_set_is_documented_and_loads():
    from gmp_pipeline.cli import make_featurizer
    from gmp_pipeline.config import DEFAULT_FEATURES

    fz = make_featurizer()
    assert DEFAULT_FEATURES.is_file()
    assert fz.n_features == 21
    assert "21 features" in DEFAULT_FEATURES.read_text()


def test_bad_feature_file_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("orders: [-1, 0]\nsigmas: [0.3]\nwidth: 3\n")
    res = run_cli("featurize", "qm9", SAMPLES / "qm9", "-o", tmp_path / "x.zarr",
                  "--features", bad, "--no-progress")
    assert res.exit_code == 1
    assert "Error:" in res.output and "width" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "x.zarr").exists()


def test_dry_run_needs_a_batch_scheduler(tmp_path):
    res = run_cli("featurize", "qm9", SAMPLES / "qm9", "-o", tmp_path / "x.zarr", "--dry-run")
    assert res.exit_code == 1 and "Error:" in res.output
    res = run_cli("featurize", "qm9", SAMPLES / "qm9", "-o", tmp_path / "x.zarr", "--dry-run",
                  "--cluster", "slurm")
    assert res.exit_code == 0, res.output
    assert "#SBATCH" in res.output


def test_verify_detects_a_corrupted_store(tmp_path):
    import zarr

    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.readers import open_reader
    from helpers import SMALL_FEATURES

    out = tmp_path / "q.zarr"
    featurize_to_store(open_reader("qm9", str(SAMPLES / "qm9")), out,
                       GMPFeaturizer(**SMALL_FEATURES), progress=False, log=lambda m: None)
    assert run_cli("verify", out, "--sample", 20).exit_code == 0
    arr = zarr.open_array(str(out / "pairs" / "dfeatures"), mode="r+")
    arr[5] = arr[5] + 1.0
    res = run_cli("verify", out, "--sample", 20)
    assert res.exit_code == 1
    assert "FAIL structure 0: dfeatures differs" in res.output


def test_verify_says_how_many_structures_it_recomputed(tmp_path):
    import ase.io
    from ase.build import molecule

    from gmp_pipeline.features import GMPFeaturizer
    from gmp_pipeline.pipeline import featurize_to_store
    from gmp_pipeline.readers import open_reader
    from helpers import SMALL_FEATURES

    src = tmp_path / "one.extxyz"
    ase.io.write(src, [molecule("H2O")], format="extxyz")
    out = tmp_path / "one.zarr"
    featurize_to_store(open_reader("ase", str(src)), out, GMPFeaturizer(**SMALL_FEATURES),
                       progress=False, log=lambda m: None)
    res = run_cli("verify", out, "--sample", 20)
    assert res.exit_code == 0, res.output
    assert "verify: OK (1 structure recomputed and matched" in res.output, res.output
    assert "checksums good" in res.output


def test_skip_bad_records_as_a_reader_option_is_one_error_line(tmp_path):
    res = run_cli("featurize", "md17", SAMPLES / "md17" / "ethanol.npz", "-o", tmp_path / "x",
                  "--reader-option", "skip_bad_records=true")
    assert res.exit_code == 1
    assert "use --skip-bad-records" in res.output and "Traceback" not in res.output
