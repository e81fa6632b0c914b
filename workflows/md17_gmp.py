#!/usr/bin/env python
"""rMD17 ethanol: GMP features through the CLI, then an element-agnostic atomistic MLP trained
on energies and forces read back with ``gmp_pipeline.open_store``.

    python workflows/md17_gmp.py            # full: 1000 train (900 fit + 100 validation), 1000 test
    python workflows/md17_gmp.py --smoke    # seconds: 40 train, 20 test, 4 epochs

Steps:
1. ``gmp-pipeline featurize rmd17 <train npz> -o train.zarr --features data/gmp_md17.yaml`` and
   the same for the test npz (subprocess; the bundled rMD17 split-01 extracts, real data).
2. Load both stores with ``open_store(...).torch_dataset()``; train one MLP shared by all
   elements (per-atom energies summed) on energies and on forces obtained by the chain rule
   through the stored derivatives (pair_center, pair_neighbor, dfeatures).
3. Report test energy and force MAE, write a parity plot and a learning curve (PNG) and a JSON
   with every number, including featurization and model timings (ms per structure).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402


def parse_args(argv=None, description=__doc__):
    p = argparse.ArgumentParser(description=description.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny run (seconds) for CI")
    p.add_argument("--n-train", type=int, help="training structures from the train file, "
                   "validation included (default 1000; smoke 40)")
    p.add_argument("--n-val", type=int, help="of those, held out for validation / "
                   "best-epoch selection (default 10%%)")
    p.add_argument("--n-test", type=int, help="test structures (default 1000; smoke 20)")
    p.add_argument("--epochs", type=int, help="default 400; smoke 4")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--force-weight", type=float, default=10.0,
                   help="weight of the normalized force MSE relative to the energy MSE")
    p.add_argument("--hidden", default="64,64", help="hidden layer widths (smoke: 16,16)")
    p.add_argument("--features", type=Path, default=C.DATA / "gmp_md17.yaml",
                   help="GMP feature YAML passed to the CLI (default: 36 features)")
    p.add_argument("--workers", type=int, default=2, help="Dask workers of the CLI run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results folder (default workflows/results; "
                   "smoke: workflows/results/smoke)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.n_train = args.n_train or (40 if smoke else 1000)
    args.n_val = args.n_val if args.n_val is not None else max(1, args.n_train // 10)
    args.n_test = args.n_test or (20 if smoke else 1000)
    args.epochs = args.epochs or (4 if smoke else 400)
    if smoke and args.hidden == "64,64":
        args.hidden = "16,16"
    args.hidden = tuple(int(h) for h in str(args.hidden).split(",") if h.strip())
    args.out = args.out or (C.RESULTS / "smoke" if smoke else C.RESULTS)
    return args


def read_rmd17(npz: Path, n: int):
    """Numbers, positions, energies and forces of the first ``n`` frames (for the BP baseline
    and for timing; the GMP model itself reads everything from the stores)."""
    d = np.load(npz)
    return (np.asarray(d["nuclear_charges"], dtype=np.int64), np.asarray(d["coords"][:n]),
            np.asarray(d["energies"][:n]), np.asarray(d["forces"][:n]))


def time_gmp_featurizer(features_yaml: Path, n: int = 200) -> dict:
    """In-process GMPFeaturizer cost, ms per structure (one thread, kernels warmed up),
    with and without derivatives, on the first ``n`` test structures."""
    from gmp_pipeline import GMPFeaturizer, Structure
    from gmp_pipeline.config import load_feature_config

    fz = GMPFeaturizer(**load_feature_config(features_yaml))
    Z, R, _, _ = read_rmd17(C.RMD17_TEST, n)
    structs = [Structure(Z, r, np.zeros((3, 3)), np.zeros(3, bool)) for r in R]
    fz.featurize(structs[0], derivatives=True)  # compile / load the kernels
    out = {}
    for der, key in ((False, "featurize_ms"), (True, "featurize_deriv_ms")):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for s in structs:
                fz.featurize(s, derivatives=der)
            best = min(best, time.perf_counter() - t)
        out[key] = 1e3 * best / len(structs)
    return out


def split_train_val(samples, n_val):
    return samples[:len(samples) - n_val], samples[len(samples) - n_val:]


def report(name, res):
    m = res["test"]
    C.log(f"{name}: test energy MAE {m['energy_mae_kcal_mol']:.3f} kcal/mol "
          f"({m['energy_mae_meV']:.1f} meV), force MAE {m['force_mae_kcal_mol_A']:.3f} kcal/mol/A "
          f"({m['force_mae_meV_A']:.1f} meV/A); {res['n_features']} features; featurize "
          f"{res['timing']['featurize_ms']:.3f} ms/structure ({res['timing']['featurize_deriv_ms']:.3f} "
          f"with derivatives), model {res['timing']['model_ms_batched']:.3f} ms/structure batched, "
          f"{res['timing']['model_ms_single']:.3f} single")


def train_and_evaluate(name, train_samples, test_samples, args, out: Path, timing: dict,
                       extra: dict | None = None) -> dict:
    """Train, evaluate on the test set, plot and write ``out/<name>.json``; return the results."""
    fit, val = split_train_val(train_samples, args.n_val)
    C.log(f"{name}: training on {len(fit)} structures, validating on {len(val)}, "
          f"testing on {len(test_samples)}; {args.epochs} epochs, hidden {args.hidden}")
    model, hist, info = C.train(fit, val, epochs=args.epochs, batch_size=args.batch_size,
                                lr=args.lr, force_weight=args.force_weight, hidden=args.hidden,
                                seed=args.seed, log_every=max(1, args.epochs // 15))
    E_pred, E_ref, F_pred, F_ref = C.evaluate(model, test_samples)
    timing = dict(timing, **C.time_model(model, test_samples))
    res = {"name": name, "n_features": int(train_samples[0]["features"].shape[1]),
           "n_fit": len(fit), "n_val": len(val), "n_test": len(test_samples),
           "epochs": args.epochs, "hidden": list(args.hidden), "batch_size": args.batch_size,
           "lr": args.lr, "force_weight": args.force_weight, "seed": args.seed,
           "smoke": bool(args.smoke), "test": C.maes(E_pred, E_ref, F_pred, F_ref),
           "timing": timing, **info, **(extra or {})}
    C.plot_parity(out / f"{name}_parity.png", E_pred, E_ref, F_pred, F_ref,
                  f"{name}: rMD17 ethanol test set ({len(test_samples)} structures)")
    C.plot_learning_curve(out / f"{name}_learning_curve.png", {name: hist},
                          f"{name}: learning curve ({len(fit)} training structures)")
    C.write_json(out / f"{name}.json", res)
    C.write_json(out / f"{name}_history.json", hist)
    return res


def featurize_stores(args, work: Path) -> dict:
    """Train and test stores through the CLI; returns the CLI wall times."""
    work.mkdir(parents=True, exist_ok=True)
    walls = {}
    for part, npz, n in (("train", C.RMD17_TRAIN, args.n_train), ("test", C.RMD17_TEST, args.n_test)):
        walls[f"cli_{part}_seconds"] = C.featurize_rmd17(
            npz, work / f"ethanol_{part}.zarr", args.features, None if n >= 1000 else n,
            workers=args.workers)
    return walls


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.set_threads(1)
    out = args.out
    work = out / "work"
    t0 = time.perf_counter()
    walls = featurize_stores(args, work)
    train_samples = C.load_store(work / "ethanol_train.zarr")[:args.n_train]
    test_samples = C.load_store(work / "ethanol_test.zarr")[:args.n_test]
    from gmp_pipeline import open_store

    st = open_store(work / "ethanol_train.zarr")
    C.log(f"store {st!r}; units {st.units}")
    timing = time_gmp_featurizer(args.features, n=min(200, args.n_test))
    timing.update(walls)
    res = train_and_evaluate("md17_gmp", train_samples, test_samples, args, out, timing,
                             {"feature_config": st.feature_config,
                              "features_file": str(args.features)})
    res["total_seconds"] = time.perf_counter() - t0
    C.write_json(out / "md17_gmp.json", res)
    report("GMP", res)
    C.log(f"wrote {out / 'md17_gmp.json'}, md17_gmp_parity.png, md17_gmp_learning_curve.png "
          f"({res['total_seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
