#!/usr/bin/env python
"""QM9 baseline: Behler-Parrinello symmetry functions (DScribe ACSF) with one network per
element, at 10,000 training molecules, against GMP at the same size.

    python workflows/qm9_bp.py --data /work/data/qm9/dsgdb9nsd     # after (or with) qm9_gmp.py
    python workflows/qm9_bp.py --smoke

Same split, targets (U0 atomization energy minus a per-element linear fit, kcal/mol), training
(Adam, cosine decay, batch, epochs of the GMP 10k run) and evaluation as qm9_gmp.py.  Runs:

* ``bp_10000``: ACSF, one MLP per element (H, C, N, O, F), as the paper's BP;
* ``gmp-elem_10000``: GMP features with one MLP per element (separates the network layout from
  the features; ``gmp_10000`` of qm9_gmp.py is GMP with the shared network).

ACSF: r_cut 6 A (Behler's usual range; GMP's cutoff covers every QM9 molecule), G1, four G2
(eta 2.0, 0.5, 0.125, 0.0556 A^-2, R_s 0: Gaussian widths 0.5, 1, 2, 3 A) and one G4
(eta 0.005 A^-2, zeta 1, lambda 1) for 5 species: 5 x (1 + 4) + 15 x 1 = 40 features per atom,
matching GMP's 40.  Featurization cost (ms per molecule, in-process, one thread, no
derivatives) is measured for both and reported.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
import _qm9 as Q  # noqa: E402
import qm9_gmp as G  # noqa: E402

SPECIES = ["H", "C", "N", "O", "F"]
R_CUT = 6.0
G2 = [[2.0, 0.0], [0.5, 0.0], [0.125, 0.0], [0.0556, 0.0]]
G4 = [[0.005, 1.0, 1.0]]


def make_acsf():
    from dscribe.descriptors import ACSF

    acsf = ACSF(r_cut=R_CUT, g2_params=G2, g4_params=G4, species=SPECIES)
    assert acsf.get_number_of_features() == 40, acsf.get_number_of_features()
    return acsf


def atoms_list(d, mols: Q.Molecules, idx):
    import ase

    out = []
    for i in idx:
        a, b = int(mols.start[i]), int(mols.start[i] + mols.n_atoms[i])
        out.append(ase.Atoms(numbers=mols.Z[a:b], positions=d["positions"][a:b]))
    return out


def acsf_features(acsf, atoms) -> np.ndarray:
    X = acsf.create(atoms, n_jobs=1)
    if isinstance(X, list):
        return np.concatenate([np.asarray(x) for x in X])
    X = np.asarray(X)
    return X.reshape(-1, X.shape[-1])


def time_featurizers(d, mols, idx, features_yaml) -> dict:
    """ms per molecule, in-process, one thread, after warm-up: ACSF and GMP (no derivatives)."""
    from gmp_pipeline import GMPFeaturizer, Structure
    from gmp_pipeline.cli import load_feature_config

    acsf = make_acsf()
    atoms = atoms_list(d, mols, idx)
    acsf.create(atoms[0])
    t = time.perf_counter()
    for a in atoms:
        acsf.create(a)
    t_acsf = (time.perf_counter() - t) / len(atoms)
    fz = GMPFeaturizer(**load_feature_config(features_yaml))
    structs = [Structure(a.numbers, a.positions, np.zeros((3, 3)), np.zeros(3, bool))
               for a in atoms]
    fz.featurize(structs[0], derivatives=False)
    t = time.perf_counter()
    for s in structs:
        fz.featurize(s, derivatives=False)
    t_gmp = (time.perf_counter() - t) / len(structs)
    return {"acsf_ms_per_molecule": 1e3 * t_acsf, "gmp_ms_per_molecule": 1e3 * t_gmp,
            "n_molecules_timed": len(atoms)}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = G.parse_args(argv)
    C.set_threads(a.threads)
    n = 12 if a.smoke else 10000
    command = "python workflows/qm9_bp.py " + " ".join(argv)
    t0 = time.perf_counter()
    G.ensure_store(a)
    d, mols, y, counts, split = G.prepare(a)
    tr, va, te = split
    # the molecules BP needs: the first n of the training permutation, validation, test
    need = np.concatenate([tr[:n], va, te])
    X_cache = a.out / "work" / f"acsf_{hashlib.sha256(need.tobytes()).hexdigest()[:12]}.npy"
    acsf = make_acsf()
    if X_cache.exists():
        X = np.load(X_cache)
        C.log(f"ACSF features from {X_cache}")
    else:
        t = time.perf_counter()
        X = acsf_features(acsf, atoms_list(d, mols, need)).astype(np.float32)
        C.log(f"DScribe ACSF for {len(need)} molecules in {time.perf_counter() - t:.0f} s")
        X_cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(X_cache, X)
    # a Molecules of just those, in that order; the split re-expressed in its indices
    a_idx, _ = mols.atoms_of(need)
    sub_n = mols.n_atoms[need]
    assert X.shape[0] == sub_n.sum()
    bp_mols = Q.Molecules(X, mols.Z[a_idx], sub_n)
    gmp_sub = Q.Molecules(mols.X[a_idx], mols.Z[a_idx], sub_n)
    k_tr, k_va = n, len(va)
    sub_split = (np.arange(k_tr), np.arange(k_tr, k_tr + k_va), np.arange(k_tr + k_va, len(need)))
    y_sub, c_sub = y[need], counts[need]
    timing = time_featurizers(d, mols, te[:min(500, len(te))], a.features)
    C.log(f"featurization: ACSF {timing['acsf_ms_per_molecule']:.3f} ms, GMP "
          f"{timing['gmp_ms_per_molecule']:.3f} ms per molecule")
    setup = {"acsf": {"r_cut": R_CUT, "species": SPECIES, "g2": G2, "g4": G4,
                      "n_features": 40}, "featurize_timing": timing}
    G.run_one(a, n, bp_mols, y_sub, c_sub, sub_split, kind="per_element", prefix="bp",
              extra={"features": "acsf", **setup})
    G.aggregate(a.out, command)
    G.run_one(a, n, gmp_sub, y_sub, c_sub, sub_split, kind="per_element", prefix="gmp-elem",
              extra={"features": "gmp", "featurize_timing": timing})
    G.aggregate(a.out, command)
    C.log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
