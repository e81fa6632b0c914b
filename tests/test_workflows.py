"""End-to-end smoke runs of workflows/ and the force check that cannot be fooled.

The smoke runs call the scripts exactly as documented (``python workflows/X.py --smoke``) in
a temporary results folder.  They need the optional extras: torch (``[train]``) for the MD17
workflows and the force check, dscribe (``[workflows]``) for the BP baseline.
"""
from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"


def run_script(name: str, *args, timeout: float = 600) -> str:
    r = subprocess.run([sys.executable, str(WORKFLOWS / name), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(WORKFLOWS))
    try:
        yield importlib.import_module("_common")
    finally:
        sys.path.remove(str(WORKFLOWS))


@pytest.fixture(scope="module")
def md17_smoke(tmp_path_factory):
    pytest.importorskip("torch", reason="the MD17 workflows train with torch (pip install "
                        "-e '.[train]'; here: pip install torch==2.13.0)")
    pytest.importorskip("matplotlib", reason="the workflows plot with matplotlib")
    out = tmp_path_factory.mktemp("md17")
    stdout = run_script("md17_gmp.py", "--smoke", "--out", out)
    return out, stdout


def _finite_maes(res):
    for key in ("energy_mae_kcal_mol", "force_mae_kcal_mol_A", "energy_mae_meV",
                "force_mae_meV_A"):
        assert math.isfinite(res["test"][key]) and res["test"][key] > 0


def test_md17_gmp_smoke(md17_smoke):
    out, stdout = md17_smoke
    res = json.loads((out / "md17_gmp.json").read_text())
    assert res["smoke"] and res["n_features"] == 36 and res["n_test"] == 20
    _finite_maes(res)
    assert res["test"]["force_mae_meV_A"] == pytest.approx(
        res["test"]["force_mae_kcal_mol_A"] * 43.3641043, rel=1e-6)
    for png in ("md17_gmp_parity.png", "md17_gmp_learning_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the features really went through the CLI into a store that open_store reads
    assert "gmp-pipeline featurize rmd17" in stdout
    from gmp_pipeline import open_store

    st = open_store(out / "work" / "ethanol_train.zarr")
    assert len(st) == 40 and st.has_derivatives and st.units["energy"] == "kcal/mol"


def test_md17_bp_smoke(md17_smoke):
    pytest.importorskip("dscribe", reason="the BP baseline uses DScribe's ACSF "
                        "(pip install -e '.[workflows]')")
    out, _ = md17_smoke
    stdout = run_script("md17_bp.py", "--smoke", "--out", out)
    assert "using GMP results" in stdout  # same settings: the GMP smoke run is reused
    for name in ("md17_bp", "md17_bp_onehot"):
        res = json.loads((out / f"{name}.json").read_text())
        _finite_maes(res)
        assert res["timing"]["featurize_deriv_ms"] > 0
    assert json.loads((out / "md17_bp.json").read_text())["n_features"] == 36
    table = (out / "md17_comparison.md").read_text()
    assert "| GMP (gmp-pipeline) | 36 |" in table and "| BP (DScribe ACSF) | 36 |" in table
    assert "reproduced" in table and "smoke run" in table
    assert (out / "md17_learning_curves.png").exists()


def test_ocp_energy_smoke(tmp_path):
    stdout = run_script("ocp_energy.py", "--smoke", "--out", tmp_path, "--slurm-timeout", "180")
    res = json.loads((tmp_path / "ocp_energy.json").read_text())
    assert res["n_structures"] == 32 and res["energy_unit"] == "eV"
    assert res["cluster"] in ("slurm", "local")
    if res["cluster"] == "local":  # the fallback must say so
        assert "falling back to the local cluster" in stdout
    for m in res["models"].values():
        assert math.isfinite(m["nested_loo_mae"])


# ------------------------------------------------------------------------------ force check
@pytest.fixture(scope="module")
def f64_store(common, tmp_path_factory):
    pytest.importorskip("torch", reason="the force check runs a torch model")
    path = tmp_path_factory.mktemp("fc") / "ethanol_f64.zarr"
    common.featurize_rmd17(common.RMD17_TEST, path, common.DATA / "gmp_md17.yaml", 4,
                           workers=1, dtype="float64")
    return path


@pytest.mark.parametrize("trained", [False, True], ids=["random-init", "trained"])
def test_forces_from_store_equal_fd_of_freshly_featurized_structures(common, f64_store, trained):
    """F from stored derivatives (chain rule) == -dE/dr by central differences, where each
    displaced structure is featurized afresh by GMPFeaturizer.featurize; the two deliberate
    mistakes (pairs swapped, self-derivative dropped) must fail the same comparison."""
    import torch

    torch.manual_seed(1)
    samples = common.load_store(f64_store)
    if trained:
        model, hist, _ = common.train(samples[:3], samples[3:], epochs=15, batch_size=2,
                                      hidden=(16, 16), log_every=100)
        assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    else:
        model = common.make_model(samples[0]["features"].shape[1], (16, 16),
                                  *common.feature_stats(samples), *common.energy_stats(samples))
    chk = common.force_check(model, f64_store, [0, 3], h=1e-4)
    scale = chk["max_abs_force"]
    assert scale > 0.1  # a model with no forces would pass trivially
    assert chk["max_abs_dev"] < 2e-5 * scale, chk
    assert chk["swap_pairs_dev"] > 1e-2 * scale, chk
    assert chk["drop_self_dev"] > 1e-2 * scale, chk
    # stored features equal freshly computed ones at the stored geometry (same model energy)
    assert chk["energy_dev"] < 1e-6, chk


def test_force_check_uses_the_package_collate(common, f64_store):
    """The workflows' chain rule equals the formula in collate_energy_forces' docstring,
    written out independently here with dense derivatives."""
    import torch

    samples = common.load_store(f64_store)[:2]
    model = common.make_model(36, (8,), *common.feature_stats(samples),
                              *common.energy_stats(samples)).double()
    b = common.collate(samples, torch.float64)
    _, F = common.energy_and_forces(model, b)
    from gmp_pipeline import open_store

    st = open_store(f64_store)
    for k in range(2):
        d = st[k]
        n = len(d["numbers"])
        X = torch.as_tensor(d["features"]).requires_grad_(True)
        (g,) = torch.autograd.grad(model.atom_energies(X).sum(), X)
        dense = np.zeros((n, n, 3, X.shape[1]))  # [i, j, x, m] = dG[i, m]/dr[j, x]
        dense[d["pair_center"], d["pair_neighbor"]] = d["dfeatures"]
        want = -np.einsum("im,ijxm->jx", g.numpy(), dense)
        got = F[b["batch"] == k].detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------- QM9
@pytest.fixture(scope="module")
def qm9_smoke(tmp_path_factory):
    pytest.importorskip("torch", reason="the QM9 workflow trains with torch (pip install "
                        "-e '.[train]'; here: pip install torch==2.13.0)")
    pytest.importorskip("matplotlib", reason="the workflows plot with matplotlib")
    out = tmp_path_factory.mktemp("qm9")
    stdout = run_script("qm9_gmp.py", "--smoke", "--out", out, timeout=1800)
    return out, stdout


def test_qm9_gmp_smoke_split_runs_resume(qm9_smoke):
    out, stdout = qm9_smoke
    assert "gmp-pipeline featurize qm9" in stdout
    res = json.loads((out / "qm9_gmp.json").read_text())
    assert set(res["runs"]) == {"gmp_4", "gmp_12", "gmp_fextrap"}
    for r in res["runs"].values():
        assert r["smoke"] and r["n_features"] == 21 and r["finished"] and r["model"] == "shared"
    assert math.isfinite(res["runs"]["gmp_12"]["test"]["mae_kcal_mol"])
    assert res["runs"]["gmp_12"]["test"]["n"] == 4
    assert not res["runs"]["gmp_fextrap"]["train_set_has_F"]
    assert res["loglog_fit_all_points"]["slope"] is not None
    split = np.load(out / "qm9_split.npz")
    assert len(split["train"]) == 12 and len(split["val"]) == 4 and len(split["test"]) == 4
    assert len(set(split["train"]) | set(split["val"]) | set(split["test"])) == 20
    assert (out / "qm9_learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "Smoke run" in (out / "qm9_results.md").read_text()
    # the same command again resumes every run from its checkpoint (nothing retrained)
    again = run_script("qm9_gmp.py", "--smoke", "--out", out, timeout=1800)
    assert again.count("resuming from") == 3 and "using the complete store" in again
    assert json.loads((out / "qm9_gmp.json").read_text())["runs"]["gmp_12"]["test"] == \
        res["runs"]["gmp_12"]["test"]


def test_qm9_bp_smoke(qm9_smoke):
    pytest.importorskip("dscribe", reason="the BP baseline uses DScribe's ACSF "
                        "(pip install -e '.[workflows]')")
    out, _ = qm9_smoke
    run_script("qm9_bp.py", "--smoke", "--out", out, timeout=1800)
    res = json.loads((out / "qm9_gmp.json").read_text())
    bp = res["runs"]["bp_12"]
    assert bp["model"] == "per_element" and bp["n_features"] == 40 and bp["features"] == "acsf"
    assert math.isfinite(bp["test"]["mae_kcal_mol"])
    assert bp["featurize_timing"]["acsf_ms_per_molecule"] > 0
    assert "gmp-elem_12" in res["runs"]
    assert "GMP versus Behler-Parrinello" in (out / "qm9_results.md").read_text()
