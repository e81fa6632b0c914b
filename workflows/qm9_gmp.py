#!/usr/bin/env python
"""QM9 U0 atomization energies from GMP features: one atomistic network for all elements.

    python workflows/qm9_data.py --out /work/data/qm9            # once: the data (qm9pack)
    python workflows/qm9_gmp.py --data /work/data/qm9/dsgdb9nsd  # every run (resumable)
    python workflows/qm9_gmp.py --data DIR --runs 110000         # only some runs
    python workflows/qm9_gmp.py --report                         # tables/plots from what exists
    python workflows/qm9_gmp.py --smoke                          # seconds, bundled 20 files

Steps:
1. ``gmp-pipeline featurize qm9 DIR -o <out>/work/qm9_gmp.zarr --features data/gmp_qm9.yaml
   --no-derivatives`` (subprocess; resumes an interrupted store, skipped when complete).
2. Whole arrays back through ``open_store(...).array(...)`` into memory.
3. Target: U0 atomization energy in kcal/mol (U0 minus QM9's atomref U0 of the atoms, the real
   atomref.txt), minus a per-element linear fit on the training molecules (the paper's
   per-element energy bias); the network learns the residual.
4. Fixed seeded split (seed 0): 110,000 train / 10,000 validation / the rest test, written to
   ``<out>/qm9_split.npz`` (store indices and gdb indices).  Learning-curve runs train on the
   first n of the training permutation (nested subsets): 1k, 5k, 10k, 50k, 110k.
5. The element extrapolation (``fextrap``): train on the molecules without F among the first
   50k of the training split, test on the test molecules with F (F's linear-bias coefficient
   cannot be fitted without F and is 0: F atoms enter with their atomref energy only).
6. Each run is checkpointed every epoch under ``<out>/work/ckpt/`` and resumes when the same
   command is run again; ``--max-minutes`` caps a run (then its result says "not finished").
   Results: ``<out>/qm9_runs/<run>.json`` per run, and ``qm9_gmp.json``, ``qm9_results.md``,
   ``qm9_learning_curve.png``, ``qm9_parity.png`` over all runs present.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
import _qm9 as Q  # noqa: E402

SIZES = (1000, 5000, 10000, 50000, 110000)
EPOCHS = {1000: 600, 5000: 300, 10000: 200, 50000: 100, 110000: 100, "fextrap": 100}
FEXTRAP_FROM = 50000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="directory of dsgdb9nsd_*.xyz (or the .tar.bz2)")
    p.add_argument("--smoke", action="store_true", help="tiny run on the bundled samples (CI)")
    p.add_argument("--runs", help="comma list of training sizes and/or 'fextrap' (default all)")
    p.add_argument("--report", action="store_true", help="only aggregate existing run results")
    p.add_argument("--notes", type=Path, help="with --report: a markdown file whose text goes "
                   "into the results as the measured run's status and interpretation")
    p.add_argument("--features", type=Path, default=C.DATA / "gmp_qm9.yaml")
    p.add_argument("--store", type=Path, help="features store (default <out>/work/qm9_gmp.zarr)")
    p.add_argument("--hidden", default="128,128")
    p.add_argument("--model", choices=("shared", "per_element"), default="shared",
                   help="one network for all elements (runs gmp_N) or one per element, as "
                        "the paper's BP (runs gmp-elem_N)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-min", type=float, default=1e-5)
    p.add_argument("--epochs", type=int, help="epochs of every run (default: per size, "
                   f"{EPOCHS})")
    p.add_argument("--max-minutes", type=float, help="stop a run after this many minutes of "
                   "training (checkpointed; rerun to resume)")
    p.add_argument("--n-train", type=int, default=110000)
    p.add_argument("--n-val", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.smoke:
        a.data = a.data or Q.SAMPLES
        if a.features == C.DATA / "gmp_qm9.yaml":
            # the shipped default set (21 features), whose kernels the other tests compile
            # too: a new set costs a first numba compilation of minutes on a busy machine
            a.features = C.REPO / "gmp_pipeline" / "data" / "features-default.yaml"
        a.n_train, a.n_val = 12, 4
        a.hidden = "16,16" if a.hidden == "128,128" else a.hidden
        a.epochs = a.epochs or 3
        a.sizes = (4, 12)
        a.fextrap_from = 12
    else:
        a.sizes = SIZES
        a.fextrap_from = FEXTRAP_FROM
    a.hidden = tuple(int(h) for h in str(a.hidden).split(",") if h.strip())
    a.out = a.out or (C.RESULTS / "smoke" if a.smoke else C.RESULTS)
    a.store = a.store or a.out / "work" / ("qm9_smoke.zarr" if a.smoke else "qm9_gmp.zarr")
    if a.runs:
        a.run_list = [r.strip() if r.strip() == "fextrap" else int(r) for r in a.runs.split(",")]
    else:
        a.run_list = list(a.sizes) + ["fextrap"]
    return a


def machine() -> dict:
    import os

    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "note": "shared with other jobs; niced"}


def ensure_store(a) -> dict:
    """Featurize through the CLI unless the store is already complete."""
    from gmp_pipeline import open_store

    try:
        if open_store(a.store).complete:
            C.log(f"using the complete store {a.store}")
            return {"featurize_seconds": None, "reused": True}
    except Exception:  # noqa: BLE001 - missing or incomplete: (re)run the CLI, which resumes
        pass
    if a.data is None:
        raise SystemExit("--data DIR (the dsgdb9nsd directory or archive) is needed to "
                         "featurize; build it with workflows/qm9_data.py")
    secs, out = C.run_cli(["featurize", "qm9", str(a.data), "-o", str(a.store), "--features",
                           str(a.features), "--no-derivatives", "--workers", str(a.workers),
                           "--no-progress"])
    C.log(out.strip().splitlines()[-1])
    return {"featurize_seconds": secs, "reused": False}


def prepare(a):
    from gmp_pipeline.readers.qm9 import read_atomref

    d = Q.load_gmp_store(a.store)
    ref = read_atomref(Q.SAMPLES / "atomref.txt")
    y = Q.atomization_kcal(d["U0"], d["Z"], d["n_atoms"], ref)
    counts = Q.element_counts(d["Z"], d["n_atoms"])
    n = len(y)
    n_train, n_val = min(a.n_train, n), a.n_val
    tr, va, te = Q.make_split(n, n_train, n_val, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out / "qm9_split.npz", train=tr, val=va, test=te,
                        train_gdb=d["gdb"][tr], val_gdb=d["gdb"][va], test_gdb=d["gdb"][te],
                        seed=a.seed)
    mols = Q.Molecules(d["X"], d["Z"], d["n_atoms"])
    return d, mols, y, counts, (tr, va, te)


def run_one(a, run, mols, y, counts, split, *, kind="shared", prefix="gmp", extra=None):
    """One training run; writes <out>/qm9_runs/<prefix>_<run>.json and returns its dict."""
    tr, va, te = split
    has_f = counts[:, 4] > 0
    if run == "fextrap":
        base = tr[:a.fextrap_from]
        train_idx = base[~has_f[base]]
        test_sets = {"test_with_F": te[has_f[te]], "test_without_F": te[~has_f[te]]}
        val_idx = va[~has_f[va]]
    else:
        train_idx = tr[:int(run)]
        test_sets = {"test": te, "test_with_F": te[has_f[te]], "test_without_F": te[~has_f[te]]}
        val_idx = va
    coef = Q.linear_bias(counts, y, train_idx)
    bias = counts @ coef
    resid = y - bias
    epochs = a.epochs or EPOCHS.get(run, EPOCHS.get(int(run) if run != "fextrap" else run, 100))
    name = f"{prefix}_{run}"
    t0 = time.perf_counter()
    model, hist, info = Q.train(
        name, mols, resid, train_idx, val_idx, kind=kind, hidden=a.hidden, epochs=epochs,
        batch_size=a.batch_size, lr=a.lr, lr_min=a.lr_min, seed=a.seed,
        ckpt=a.out / "work" / "ckpt" / f"{name}.pt", max_minutes=a.max_minutes,
        settings={"features": (extra or {}).get("features", "gmp"), "run": str(run)},
        log_every=max(1, epochs // 20), val_every=max(1, epochs // 100))
    res = {"run": str(run), "name": name, "model": kind, "n_train": int(len(train_idx)),
           "n_val": int(len(val_idx)), "epochs": epochs, "hidden": list(a.hidden),
           "batch_size": a.batch_size, "lr": a.lr, "lr_min": a.lr_min, "seed": a.seed,
           "smoke": bool(a.smoke), "n_features": int(mols.X.shape[1]),
           "bias_coefficients_kcal_mol": {Q.SYMBOL[z]: float(c) for z, c in
                                          zip(Q.ELEMENTS, coef)},
           "train_set_has_F": bool(has_f[train_idx].any()), **info,
           "wall_seconds_this_call": time.perf_counter() - t0}
    res.update(extra or {})
    preds = {}
    for key, idx in test_sets.items():
        if len(idx) == 0:
            res[key] = {"n": 0, "mae_kcal_mol": None}
            continue
        p = Q.predict(model, mols, idx) + bias[idx]
        err = p - y[idx]
        res[key] = {"n": int(len(idx)), "mae_kcal_mol": float(np.abs(err).mean()),
                    "rmse_kcal_mol": float(np.sqrt((err ** 2).mean())),
                    "median_ae_kcal_mol": float(np.median(np.abs(err)))}
        preds[key] = (y[idx], p)
    if run == "fextrap" and len(test_sets["test_with_F"]):
        # diagnostic, labelled: one F reference energy taken from the F molecules of the
        # validation split (not from the test set), to separate a constant per-F-atom offset
        # from errors in how the network describes F environments
        vf = va[has_f[va]]
        if len(vf):
            pv = Q.predict(model, mols, vf) + bias[vf]
            nF = counts[vf, 4]
            off = float(((y[vf] - pv) * nF).sum() / (nF ** 2).sum())
            idx = test_sets["test_with_F"]
            err = Q.predict(model, mols, idx) + bias[idx] + off * counts[idx, 4] - y[idx]
            res["test_with_F_after_F_offset_from_val"] = {
                "n": int(len(idx)), "offset_kcal_mol_per_F": off,
                "n_val_F_molecules_used": int(len(vf)),
                "mae_kcal_mol": float(np.abs(err).mean())}
    runs_dir = a.out / "qm9_runs"
    C.write_json(runs_dir / f"{name}.json", res)
    C.write_json(runs_dir / f"{name}_history.json", hist)
    if "test" in preds and prefix == "gmp" and str(run) == str(max(a.sizes)):
        np.savez_compressed(a.out / "work" / f"{name}_test_predictions.npz",
                            ref=preds["test"][0], pred=preds["test"][1])
        plot_parity(a.out / "qm9_parity.png", *preds["test"], f"QM9 U0, {name}")
    m = res.get("test", res.get("test_with_F"))
    C.log(f"{name}: n_train {res['n_train']}, test MAE "
          f"{m['mae_kcal_mol'] if m['mae_kcal_mol'] is None else round(m['mae_kcal_mol'], 3)}"
          f" kcal/mol ({'finished' if info['finished'] else 'NOT finished'}, "
          f"{info['epochs_done']}/{epochs} epochs, {info['train_seconds'] / 60:.1f} min)")
    return res


def plot_parity(path, ref, pred, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(ref, pred, s=2, alpha=0.4)
    lim = [min(ref.min(), pred.min()), max(ref.max(), pred.max())]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("reference U0 atomization energy (kcal/mol)")
    ax.set_ylabel("predicted (kcal/mol)")
    ax.set_title(f"{title}\nMAE {np.abs(pred - ref).mean():.3f} kcal/mol")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loglog_fit(points):
    """(slope, intercept) of log10 MAE = b log10 n + a, and the n where the fit gives 1."""
    if len(points) < 2:
        return None
    n = np.log10([p[0] for p in points])
    m = np.log10([p[1] for p in points])
    b, a0 = np.polyfit(n, m, 1)
    n_1 = 10 ** (-a0 / b) if b < 0 else None
    return {"slope": float(b), "intercept": float(a0),
            "n_train_for_1_kcal_mol": None if n_1 is None else float(n_1)}


def aggregate(out: Path, command: str | None = None, extra: dict | None = None) -> dict:
    """qm9_gmp.json, qm9_results.md and qm9_learning_curve.png from <out>/qm9_runs/*.json."""
    runs = {}
    for p in sorted((out / "qm9_runs").glob("*.json")):
        if not p.name.endswith("_history.json"):
            r = json.loads(p.read_text())
            runs[r["name"]] = r
    summary_path = out / "qm9_gmp.json"
    old = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    curve = sorted((r["n_train"], r["test"]["mae_kcal_mol"], r["finished"]) for r in runs.values()
                   if r["name"].startswith("gmp_") and r["run"] != "fextrap"
                   and r.get("test", {}).get("mae_kcal_mol"))
    fit_all = loglog_fit([(n, m) for n, m, _ in curve])
    fit_fin = loglog_fit([(n, m) for n, m, f in curve if f])
    commands = dict(old.get("commands", {}))
    if command:
        commands[command] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary = {"runs": runs, "learning_curve": [{"n_train": n, "test_mae_kcal_mol": m,
                                                  "finished": f} for n, m, f in curve],
               "loglog_fit_all_points": fit_all, "loglog_fit_finished_points": fit_fin,
               "commands": commands, "machine": machine(),
               **{k: v for k, v in old.items() if k not in ("runs", "learning_curve",
                                                           "loglog_fit_all_points",
                                                           "loglog_fit_finished_points",
                                                           "commands", "machine")}}
    summary.update(extra or {})
    C.write_json(summary_path, summary)
    if curve:
        try:
            plot_curve(out / "qm9_learning_curve.png", curve, fit_all, runs)
        except ImportError:
            pass
    (out / "qm9_results.md").write_text(markdown(summary))
    return summary


def plot_curve(path, curve, fit, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    n = np.array([c[0] for c in curve])
    m = np.array([c[1] for c in curve])
    ax.loglog(n, m, "o-", label="GMP, shared network (test MAE)")
    if fit:
        xs = np.logspace(np.log10(n.min()), np.log10(max(n.max(), 2e5)), 50)
        ax.loglog(xs, 10 ** (fit["intercept"] + fit["slope"] * np.log10(xs)), "k:",
                  label=f"fit, slope {fit['slope']:.2f}")
    for r in runs.values():
        if r["name"].startswith("bp_") and r.get("test", {}).get("mae_kcal_mol"):
            ax.loglog([r["n_train"]], [r["test"]["mae_kcal_mol"]], "s", label=f"BP ACSF, {r['model']}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="1 kcal/mol")
    ax.set_xlabel("training molecules")
    ax.set_ylabel("test MAE U0 (kcal/mol)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(s: dict) -> str:
    runs = s["runs"]
    L = ["# QM9 U0: GMP (one shared network) and the BP baseline", "",
         "Produced by `workflows/qm9_gmp.py` and `workflows/qm9_bp.py` (all numbers in "
         "`qm9_gmp.json`; split indices in `qm9_split.npz`).  Target: U0 atomization energy "
         "(U0 minus QM9 atomref U0), kcal/mol, minus a per-element linear fit on each run's "
         "training molecules.  Split seed 0: 110,000 train / 10,000 validation / 10,831 test.",
         "", "## Runs", "",
         "| run | features | model | n_train | epochs done / planned | finished | train min | "
         "best val MAE | test MAE kcal/mol | test MAE, molecules with F |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs.values(), key=lambda r: (r["name"].split("_")[0], r["n_train"])):
        t = r.get("test", {}).get("mae_kcal_mol")
        tf = r.get("test_with_F", {}).get("mae_kcal_mol")
        L.append(f"| {r['name']} | {r.get('features', 'gmp')} ({r['n_features']}) | "
                 f"{r['model']} {tuple(r['hidden'])} | {r['n_train']} | {r['epochs_done']} / "
                 f"{r['epochs_planned']} | {'yes' if r['finished'] else '**no**'} | "
                 f"{r['train_seconds'] / 60:.1f} | {_fmt(r['best_val_mae'])} | {_fmt(t)} | "
                 f"{_fmt(tf)} |")
    fit = s.get("loglog_fit_all_points")
    L += ["", "## Learning curve", ""]
    if fit:
        n1 = fit["n_train_for_1_kcal_mol"]
        L.append(f"log-log fit over {len(s['learning_curve'])} points: slope "
                 f"{fit['slope']:.3f}; extrapolated to 1 kcal/mol at "
                 f"{'-' if n1 is None else f'{n1:,.0f}'} training molecules "
                 "(an extrapolation of this model and training budget, not a measurement).")
    bp = [r for r in runs.values() if r["name"].startswith("bp_")]
    if bp:
        n = bp[0]["n_train"]
        tim = bp[0].get("featurize_timing", {})
        L += ["", f"## GMP versus Behler-Parrinello at {n} training molecules", "",
              "Same split, targets, optimizer, batch and epochs; 40 features each (matched "
              f"count).  ACSF: DScribe, r_cut {bp[0]['acsf']['r_cut']} A, G1 + 4 G2 + 1 G4 "
              "for H, C, N, O, F.  Featurization cost in-process, one thread, no "
              f"derivatives: ACSF {_fmt(tim.get('acsf_ms_per_molecule'))} ms, GMP "
              f"{_fmt(tim.get('gmp_ms_per_molecule'))} ms per molecule "
              f"({tim.get('n_molecules_timed', '-')} test molecules, this shared machine).", "",
              "| features | network | parameters | epochs done | test MAE kcal/mol | "
              "molecules with F |", "|---|---|---|---|---|---|"]
        for name, label in ((f"gmp_{n}", "GMP"), (f"gmp-elem_{n}", "GMP"), (f"bp_{n}", "BP ACSF")):
            r = runs.get(name)
            if r:
                net = "one shared MLP" if r["model"] == "shared" else "one MLP per element"
                L.append(f"| {label} ({r['n_features']}) | {net} {tuple(r['hidden'])} | "
                         f"{r['n_parameters']} | {r['epochs_done']}/{r['epochs_planned']} | "
                         f"{_fmt(r['test']['mae_kcal_mol'])} | "
                         f"{_fmt(r['test_with_F']['mae_kcal_mol'])} |")
    fx = runs.get("gmp_fextrap")
    if fx:
        L += ["", "## Element extrapolation (no F in training)", "",
              f"Trained on {fx['n_train']} molecules without F; test molecules with F: MAE "
              f"{_fmt(fx['test_with_F']['mae_kcal_mol'])} kcal/mol (n = "
              f"{fx['test_with_F']['n']}); without F: "
              f"{_fmt(fx['test_without_F']['mae_kcal_mol'])}."]
        off = fx.get("test_with_F_after_F_offset_from_val")
        if off:
            L.append(f"With one F reference energy taken from the validation molecules with F "
                     f"({off['offset_kcal_mol_per_F']:.2f} kcal/mol per F atom): "
                     f"{_fmt(off['mae_kcal_mol'])} kcal/mol.")
        ref = runs.get(f"gmp_{FEXTRAP_FROM}")
        if ref:
            L.append(f"For comparison the {ref['n_train']}-molecule run trained WITH F: MAE on "
                     f"the same F molecules {_fmt(ref['test_with_F']['mae_kcal_mol'])}.")
    if any(r["smoke"] for r in runs.values()):
        L += ["", "**Smoke run (20 bundled molecules, 3 epochs): the numbers mean nothing.**"]
    for k in ("status", "notes"):
        if s.get(k):
            L += ["", f"## {k.capitalize()}", "", s[k]]
    L += ["", "Commands: " + "; ".join(f"`{c}` ({t})" for c, t in s.get("commands", {}).items()),
          "", f"Machine: {s['machine']}"]
    return "\n".join(L) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    command = "python workflows/qm9_gmp.py " + " ".join(argv)
    if a.report:
        s = aggregate(a.out, None, {"notes": a.notes.read_text().strip()} if a.notes else None)
        print((a.out / "qm9_results.md").read_text())
        return s
    C.set_threads(a.threads)
    t0 = time.perf_counter()
    feat = ensure_store(a)
    d, mols, y, counts, split = prepare(a)
    C.log(f"{len(y)} molecules, {mols.X.shape[0]} atoms, {mols.X.shape[1]} features; split "
          f"{len(split[0])}/{len(split[1])}/{len(split[2])}")
    for run in a.run_list:
        run_one(a, run, mols, y, counts, split, kind=a.model,
                prefix="gmp" if a.model == "shared" else "gmp-elem",
                extra={"features": "gmp", "feature_set": str(a.features.name),
                       "feature_config": d["feature_config"]})
        aggregate(a.out, command, {"featurize": feat} if not feat["reused"] else None)
    s = aggregate(a.out, command)
    C.log(f"total {time.perf_counter() - t0:.0f} s")
    return s


if __name__ == "__main__":
    main()
