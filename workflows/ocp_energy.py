#!/usr/bin/env python
"""OC20-style LMDB: GMP features through the CLI on SLURM (local fallback), then a simple
energy model.

    python workflows/ocp_energy.py            # all 32 records of the bundled sample
    python workflows/ocp_energy.py --smoke    # same data (it is tiny), fewer ridge alphas

1. ``gmp-pipeline featurize ocp tests/data/samples/oc20_lmdb/pyg2_is2re_style/data.lmdb -o
   ocp.zarr --no-derivatives --cluster slurm --cluster-config workflows/data/slurm-small.yaml
   --max-jobs 1`` when ``sinfo`` answers; otherwise (or when the SLURM run fails or no worker
   starts within --slurm-timeout seconds) the same command with ``--cluster local``, with a
   message saying so.
2. Energy model: ridge regression (standardized columns, unpenalized intercept) on three
   per-structure GMP descriptors: the adsorbate atom's features (element-agnostic, the
   headline), all atoms' features summed, and per-element sums; energy target = the reader's
   energy (y_relaxed for this IS2RE-style file, eV).  Leave-one-out MAE (closed form) for each ridge
   alpha; alpha chosen by nested leave-one-out so the reported MAE is not tuned on its own
   folds.  Baselines: the mean energy, and a linear fit on element counts.

The bundled LMDB is NOT OC20 DFT data (see tests/data/samples/oc20_lmdb/SOURCES.md: K on slabs,
third-party energies); this shows the mechanics, not OC20 accuracy.  No torch needed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402


def slurm_available() -> bool:
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "up" in r.stdout


def featurize(store: Path, cluster: str, slurm_timeout: float) -> dict:
    base = ["featurize", "ocp", str(C.OC20_LMDB), "-o", str(store), "--no-derivatives",
            "--no-progress", "--overwrite"]
    if cluster in ("auto", "slurm"):
        if slurm_available():
            try:
                wall, _ = C.run_cli(base + ["--cluster", "slurm", "--cluster-config",
                                            str(C.DATA / "slurm-small.yaml"), "--max-jobs", "1"],
                                    timeout=slurm_timeout)
                return {"cluster": "slurm", "cli_seconds": wall}
            except subprocess.TimeoutExpired:
                C.log(f"SLURM run did not finish within {slurm_timeout:.0f} s (no worker job "
                      "started?); interrupted it (its jobs are cancelled) and falling back to the "
                      "local cluster")
            except RuntimeError as exc:
                C.log(f"SLURM run failed ({str(exc).splitlines()[0]}); falling back to the "
                      "local cluster")
        else:
            C.log("SLURM not available (sinfo does not answer); falling back to the local "
                  "cluster")
    wall, _ = C.run_cli(base + ["--cluster", "local", "--workers", "2"])
    return {"cluster": "local", "cli_seconds": wall}


def descriptors(store_path, adsorbate: int) -> tuple[dict, np.ndarray, dict]:
    """Three per-structure descriptor sets and the energies (S,):

    * ``adsorbate``: summed GMP features of the adsorbate atoms (element ``adsorbate``; the
      sample's tags are all 0, so tags cannot mark them) -- element-agnostic, M columns;
    * ``all_atoms``: summed GMP features of every atom plus the atom count, M + 1 columns;
    * ``per_element``: for each element, its atom count and summed features,
      n_elements * (M + 1) columns.
    """
    from gmp_pipeline import open_store

    st = open_store(store_path)
    rows = st.get_batch(range(len(st)))
    elements = sorted({int(z) for r in rows for z in r["numbers"]})
    M = st.n_features
    per = np.zeros((len(rows), len(elements) * (M + 1)))
    allat = np.zeros((len(rows), M + 1))
    ads = np.zeros((len(rows), M))
    for k, r in enumerate(rows):
        f = r["features"].astype(np.float64)
        allat[k, 0] = len(f)
        allat[k, 1:] = f.sum(0)
        ads[k] = f[r["numbers"] == adsorbate].sum(0)
        for e_i, z in enumerate(elements):
            sel = r["numbers"] == z
            per[k, e_i * (M + 1)] = sel.sum()
            per[k, e_i * (M + 1) + 1:(e_i + 1) * (M + 1)] = f[sel].sum(0)
    if not ads.any():
        raise SystemExit(f"no atom of element Z={adsorbate} in {store_path}; pass --adsorbate")
    y = np.array([float(r["energy"]) for r in rows])
    counts = per[:, [k * (M + 1) for k in range(len(elements))]]
    return ({"adsorbate": ads, "all_atoms": allat, "per_element": per, "_counts": counts}, y,
            {"units": st.units, "n_features": M, "elements": elements, "repr": repr(st)})


def _standardize(X, ref=None):
    ref = X if ref is None else ref
    mu, sd = ref.mean(0), ref.std(0)
    sd[sd == 0] = 1.0
    return (X - mu) / sd


def ridge_loo(X: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Exact leave-one-out predictions of ridge regression with an unpenalized intercept on
    standardized columns, in the dual (kernel) form (S x S, cheap when columns >> rows).

    With centred columns Z the hat matrix is 11^T/S + G (G + alpha I)^-1, G = Z Z^T, and the
    LOO prediction is y_i - (y_i - yhat_i) / (1 - H_ii).  The column statistics use every row.
    """
    Z = _standardize(X)
    G = Z @ Z.T
    n = len(y)
    H = np.full((n, n), 1.0 / n) + G @ np.linalg.inv(G + alpha * np.eye(n))
    yhat = H @ y
    return y - (y - yhat) / (1.0 - np.diag(H))


def ridge_predict(X_fit, y_fit, x_new, alpha: float) -> float:
    Z = _standardize(X_fit)
    z = _standardize(x_new[None, :], X_fit)[0]
    ym = y_fit.mean()
    c = np.linalg.solve(Z @ Z.T + alpha * np.eye(len(y_fit)), y_fit - ym)
    return float(ym + (Z @ z) @ c)


def nested_loo_mae(X, y, alphas) -> tuple[float, list[float]]:
    """Outer leave-one-out; in each outer fold alpha is picked by inner LOO on the rest, so
    the reported MAE is not tuned on the structure it predicts."""
    errs, picked = [], []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        inner = [np.abs(ridge_loo(X[keep], y[keep], a) - y[keep]).mean() for a in alphas]
        a = alphas[int(np.argmin(inner))]
        picked.append(a)
        errs.append(abs(ridge_predict(X[keep], y[keep], X[i], a) - y[i]))
    return float(np.mean(errs)), picked


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="fewer ridge alphas (the data is tiny)")
    p.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                   help="auto/slurm: SLURM when sinfo answers, else local (with a message)")
    p.add_argument("--slurm-timeout", type=float, default=240.0,
                   help="seconds to wait for the SLURM run before falling back to local")
    p.add_argument("--adsorbate", type=int, default=19,
                   help="atomic number of the adsorbate (K in the bundled sample)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = args.out or (C.RESULTS / "smoke" if args.smoke else C.RESULTS)
    t0 = time.perf_counter()
    run = featurize(out / "work" / "ocp.zarr", args.cluster, args.slurm_timeout)
    Xs, y, info = descriptors(out / "work" / "ocp.zarr", args.adsorbate)
    u = info["units"].get("energy")
    C.log(f"{info['repr']}; energy unit {u}, elements {info['elements']}")
    alphas = [1e-2, 1.0, 100.0] if args.smoke else list(np.logspace(-4, 3, 15))
    models = {}
    for name in ("adsorbate", "all_atoms", "per_element"):
        X = Xs[name]
        nested, picked = nested_loo_mae(X, y, alphas)
        models[name] = {"n_descriptors": int(X.shape[1]), "nested_loo_mae": nested,
                        "alpha_picked": sorted(set(float(a) for a in picked)),
                        "loo_mae_by_alpha": {float(a): float(np.abs(ridge_loo(X, y, a) - y).mean())
                                             for a in alphas}}
        C.log(f"  ridge on {name:<12} ({X.shape[1]:4d} columns): nested leave-one-out MAE "
              f"{nested:.4f} {u}")
    base_mean = float(np.abs(y - (y.sum() - y) / (len(y) - 1)).mean())  # LOO mean predictor
    base_counts = float(np.abs(ridge_loo(Xs["_counts"], y, 1e-8) - y).mean())
    res = {"cluster": run["cluster"], "cli_seconds": run["cli_seconds"], "n_structures": len(y),
           "elements": info["elements"], "energy_unit": u, "energy_std": float(y.std()),
           "models": models, "baseline_mean_loo_mae": base_mean,
           "baseline_counts_loo_mae": base_counts,
           "smoke": bool(args.smoke), "total_seconds": time.perf_counter() - t0}
    C.write_json(out / "ocp_energy.json", res)
    u = res["energy_unit"]
    C.log(f"OCP energy model on {len(y)} structures (featurized on the {run['cluster']} cluster): "
          f"nested leave-one-out MAE {models['adsorbate']['nested_loo_mae']:.4f} {u} (ridge on "
          f"the adsorbate's GMP features); baselines (LOO): mean {base_mean:.4f} {u}, element "
          f"counts {base_counts:.4f} {u}; energy std {y.std():.4f} {u}")
    C.log(f"wrote {out / 'ocp_energy.json'} ({res['total_seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
