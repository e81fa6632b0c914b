"""Shared pieces of the workflows: running the CLI, loading stores into memory, the
element-agnostic atomistic MLP, chain-rule forces, training, timing and plots.

Nothing here is part of the installed package; the scripts in this folder import it by path.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RMD17_DIR = REPO / "tests" / "data" / "samples" / "rmd17"
RMD17_TRAIN = RMD17_DIR / "rmd17_ethanol_train_01.npz"
RMD17_TEST = RMD17_DIR / "rmd17_ethanol_test_01.npz"
OC20_LMDB = REPO / "tests" / "data" / "samples" / "oc20_lmdb" / "pyg2_is2re_style" / "data.lmdb"
DATA = HERE / "data"
RESULTS = HERE / "results"

KCAL_PER_MOL_IN_EV = 0.0433641043  # 1 kcal/mol in eV (ASE: units.kcal / units.mol)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------- CLI
def cli_command() -> list[str]:
    """``gmp-pipeline`` if it is on PATH, else ``python -m gmp_pipeline.cli`` (same code)."""
    exe = shutil.which("gmp-pipeline")
    if exe:
        return [exe]
    return [sys.executable, "-m", "gmp_pipeline.cli"]


def run_cli(args: list[str], timeout: float | None = None) -> tuple[float, str]:
    """Run ``gmp-pipeline ARGS``; return (wall seconds, combined output).

    On timeout the CLI gets SIGINT (its clean interrupt path closes the Dask cluster and
    cancels batch jobs) and then, if needed, SIGTERM; :class:`subprocess.TimeoutExpired` is
    re-raised.  A non-zero exit raises :class:`RuntimeError` with the output.
    """
    cmd = cli_command() + list(args)
    log("$ " + " ".join(str(c) for c in (["gmp-pipeline"] + list(args))))
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.communicate()
        raise
    wall = time.perf_counter() - t0
    for line in out.strip().splitlines():
        log("    " + line)
    if proc.returncode != 0:
        raise RuntimeError(f"gmp-pipeline {' '.join(map(str, args))} failed "
                           f"(exit {proc.returncode}):\n{out}")
    return wall, out


def write_split(path: Path, n: int) -> Path:
    """An rMD17 split file selecting the first ``n`` rows (used by --smoke and --n-train)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in range(n)))
    return path


def featurize_rmd17(npz: Path, store: Path, features_yaml: Path, n: int | None,
                    workers: int = 2, dtype: str = "float32") -> float:
    """Featurize ``npz`` (first ``n`` frames, or all) through the CLI; return wall seconds."""
    args = ["featurize", "rmd17", str(npz), "-o", str(store), "--features", str(features_yaml),
            "--workers", str(workers), "--no-progress", "--overwrite", "--dtype", dtype]
    if n is not None:
        split = write_split(store.parent / f"{store.stem}.split.csv", n)
        args += ["--reader-option", f"split_file={split}"]
    wall, _ = run_cli(args)
    return wall


# --------------------------------------------------------------------------- data in memory
_KEEP = ("features", "numbers", "positions", "energy", "forces", "cell", "pbc", "index",
         "pair_center", "pair_neighbor", "dfeatures")


def load_store(path) -> list[dict]:
    """Every structure of a gmp-features store as dicts of float64/int64 tensors, read with
    ``open_store(path).torch_dataset`` through a DataLoader (batched chunk reads)."""
    import torch
    from gmp_pipeline import open_store

    store = open_store(path)
    if not store.has_derivatives:
        raise ValueError(f"{path} was written without derivatives; forces need them")
    ds = store.torch_dataset(dtype=torch.float64)  # float64: total energies ~ -1e5 kcal/mol
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False,
                                         collate_fn=lambda items: items)
    out = []
    for items in loader:
        for s in items:
            out.append({k: s[k] for k in _KEEP})
    return out


def samples_from_dense(features: list[np.ndarray], derivs: list[np.ndarray],
                       numbers: list[np.ndarray], energies, forces) -> list[dict]:
    """Structure dicts (same keys as :func:`load_store`) from dense derivatives
    ``D[c, j, x, m] = d features[c, m] / d r[j, x]`` (DScribe's layout), every (c, j) pair kept."""
    import torch

    out = []
    for k, (X, D, Z, E, F) in enumerate(zip(features, derivs, numbers, energies, forces)):
        n = X.shape[0]
        c, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        out.append({
            "features": torch.as_tensor(np.asarray(X, dtype=np.float64)),
            "numbers": torch.as_tensor(np.asarray(Z, dtype=np.int64)),
            "energy": torch.as_tensor(float(E), dtype=torch.float64),
            "forces": torch.as_tensor(np.asarray(F, dtype=np.float64)),
            "positions": torch.zeros(n, 3, dtype=torch.float64),  # not needed by the model
            "cell": torch.zeros(3, 3, dtype=torch.float64),
            "pbc": torch.zeros(3, dtype=torch.bool),
            "index": torch.tensor(k),
            "pair_center": torch.as_tensor(c.reshape(-1)),
            "pair_neighbor": torch.as_tensor(j.reshape(-1)),
            # (c, j, x, m) -> (p, x, m)
            "dfeatures": torch.as_tensor(np.asarray(D, dtype=np.float64).reshape(n * n, 3, -1)),
        })
    return out


def collate(samples: list[dict], dtype=None) -> dict:
    """Batch structure dicts with the package's ``collate_energy_forces`` and cast the
    float arrays for training (energies stay float64 until the shift is removed)."""
    from gmp_pipeline.store import collate_energy_forces

    b = collate_energy_forces(samples)
    if dtype is not None:
        for k in ("features", "forces", "dfeatures"):
            b[k] = b[k].to(dtype)
    return b


# ------------------------------------------------------------------------------------ model
def make_model(n_features: int, hidden=(64, 64), x_mean=None, x_std=None,
               e_shift: float = 0.0, e_scale: float = 1.0):
    """One MLP shared by every element: per-atom energy from the atom's features only;
    the structure energy is the sum over atoms.

    Inputs are standardized with the training set's per-column mean/std (buffers), and the
    per-atom output is ``e_scale * net(x) + e_shift`` (``e_shift``: mean energy per atom).
    """
    import torch
    from torch import nn

    class AtomisticMLP(nn.Module):
        def __init__(self):
            super().__init__()
            layers, d = [], n_features
            for h in hidden:
                layers += [nn.Linear(d, h), nn.SiLU()]
                d = h
            layers.append(nn.Linear(d, 1))
            self.net = nn.Sequential(*layers)
            self.register_buffer("x_mean", torch.as_tensor(
                np.zeros(n_features) if x_mean is None else x_mean, dtype=torch.float32))
            self.register_buffer("x_std", torch.as_tensor(
                np.ones(n_features) if x_std is None else x_std, dtype=torch.float32))
            self.register_buffer("e_shift", torch.tensor(float(e_shift)))
            self.register_buffer("e_scale", torch.tensor(float(e_scale)))

        def atom_energies(self, features):
            x = (features - self.x_mean) / self.x_std
            return self.net(x).squeeze(-1) * self.e_scale + self.e_shift

        def forward(self, features, batch, n_structures: int):
            """Structure energies (B,) = sum of per-atom energies."""
            ea = self.atom_energies(features)
            return torch.zeros(n_structures, dtype=ea.dtype).index_add(0, batch, ea)

    return AtomisticMLP()


def energy_and_forces(model, b: dict, create_graph: bool = False):
    """Energies (B,) and forces (A, 3) of a collated batch.

    Forces by the chain rule through the stored derivatives:
    ``F_j = - sum_i sum_m dE/dG[i, m] * dG[i, m]/dr_j`` with one term per stored pair
    (i = pair_center, j = pair_neighbor, dG/dr = dfeatures).
    """
    import torch

    feats = b["features"].detach().requires_grad_(True)
    E = model(feats, b["batch"], len(b["n_atoms"]))
    (g,) = torch.autograd.grad(E.sum(), feats, create_graph=create_graph)
    contrib = torch.einsum("pm,pxm->px", g[b["pair_center"]], b["dfeatures"])
    F = -torch.zeros(feats.shape[0], 3, dtype=contrib.dtype).index_add(
        0, b["pair_neighbor"], contrib)
    return E, F


def feature_stats(samples: list[dict]):
    X = np.concatenate([s["features"].numpy() for s in samples])
    std = X.std(0)
    std[std < 1e-8 * max(1.0, float(np.abs(X).max()))] = 1.0  # constant columns pass through
    return X.mean(0), std


def energy_stats(samples: list[dict]):
    E = np.array([float(s["energy"].reshape(())) for s in samples])
    N = np.array([len(s["numbers"]) for s in samples], dtype=np.float64)
    shift = float((E / N).mean())
    resid = E - shift * N
    scale = float(resid.std()) or 1.0
    return shift, scale


def train(samples_train: list[dict], samples_val: list[dict], *, epochs: int, batch_size: int = 32,
          lr: float = 2e-3, lr_min: float = 2e-5, force_weight: float = 10.0, hidden=(64, 64),
          seed: int = 0, log_every: int = 10):
    """Train the atomistic MLP on energies and forces.

    Loss = MSE(E)/var(E) + force_weight * MSE(F)/var(F) (variances of the training targets),
    Adam with a cosine learning-rate decay from ``lr`` to ``lr_min``.  The weights of the epoch
    with the lowest validation loss are kept.  Returns (model, history list of dicts).
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_mean, x_std = feature_stats(samples_train)
    e_shift, e_scale = energy_stats(samples_train)
    M = samples_train[0]["features"].shape[1]
    model = make_model(M, hidden, x_mean, x_std, e_shift, e_scale)
    # energies relative to the per-atom shift, in float64, before any float32 cast
    def prep(samples):
        out = []
        for s in samples:
            s = dict(s)
            # reshape: the torch dataset gives 0-d values as shape (1,)
            s["energy_rel"] = s["energy"].reshape(()) - e_shift * len(s["numbers"])
            out.append(s)
        return out

    tr, va = prep(samples_train), prep(samples_val)
    E_tr = np.array([float(s["energy_rel"]) for s in tr])
    assert all(s["energy_rel"].shape == () for s in tr)
    F_tr = np.concatenate([s["forces"].numpy() for s in tr])
    var_E = float(E_tr.var()) or 1.0
    var_F = float(F_tr.var()) or 1.0
    model_shift = model.e_shift.clone()
    model.e_shift.zero_()  # the model predicts energy_rel; the shift is added back at the end

    def batch_of(items):
        b = collate(items, torch.float32)
        b["energy_rel"] = torch.stack([s["energy_rel"] for s in items]).to(torch.float32)
        return b

    val_batch = batch_of(va) if va else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr_min)
    history = []
    best = (float("inf"), None, -1)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(tr))
        tot = {"loss": 0.0, "e_abs": 0.0, "f_abs": 0.0, "n_s": 0, "n_f": 0}
        for lo in range(0, len(order), batch_size):
            b = batch_of([tr[i] for i in order[lo:lo + batch_size]])
            E, F = energy_and_forces(model, b, create_graph=True)
            loss = (((E - b["energy_rel"]) ** 2).mean() / var_E
                    + force_weight * ((F - b["forces"]) ** 2).mean() / var_F)
            opt.zero_grad()
            loss.backward()
            opt.step()
            nb = len(b["n_atoms"])
            tot["loss"] += float(loss.detach()) * nb
            tot["e_abs"] += float((E.detach() - b["energy_rel"]).abs().sum())
            tot["f_abs"] += float((F.detach() - b["forces"]).abs().sum())
            tot["n_s"] += nb
            tot["n_f"] += F.numel()
        sched.step()
        rec = {"epoch": epoch, "train_loss": tot["loss"] / tot["n_s"],
               "train_energy_mae": tot["e_abs"] / tot["n_s"],
               "train_force_mae": tot["f_abs"] / tot["n_f"], "lr": opt.param_groups[0]["lr"]}
        if val_batch is not None:
            model.eval()
            E, F = energy_and_forces(model, val_batch)
            E, F = E.detach(), F.detach()
            vloss = float(((E - val_batch["energy_rel"]) ** 2).mean() / var_E
                          + force_weight * ((F - val_batch["forces"]) ** 2).mean() / var_F)
            rec.update(val_loss=vloss,
                       val_energy_mae=float((E - val_batch["energy_rel"]).abs().mean()),
                       val_force_mae=float((F - val_batch["forces"]).abs().mean()))
            if vloss < best[0]:
                best = (vloss, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
        history.append(rec)
        if epoch == 1 or epoch % log_every == 0 or epoch == epochs:
            msg = (f"epoch {epoch:4d}  loss {rec['train_loss']:.4f}  train E {rec['train_energy_mae']:.3f}"
                   f"  F {rec['train_force_mae']:.3f}")
            if "val_loss" in rec:
                msg += f"  | val E {rec['val_energy_mae']:.3f}  F {rec['val_force_mae']:.3f}"
            log(msg + f"  ({time.perf_counter() - t0:.0f} s)")
    if best[1] is not None:
        model.load_state_dict(best[1])
        log(f"kept the weights of epoch {best[2]} (lowest validation loss)")
    model.e_shift.copy_(model_shift)
    model.eval()
    return model, history, {"best_epoch": best[2], "train_seconds": time.perf_counter() - t0}


def evaluate(model, samples: list[dict]):
    """Predicted and reference energies (S,) and forces (A, 3) as float64 numpy arrays.

    The model runs in float32; energies are compared relative to the model's per-atom shift
    so that the float32 rounding of ~1e5 kcal/mol totals does not enter the error.
    """
    import torch

    shift = float(model.e_shift)
    b = collate(samples, torch.float32)
    with torch.no_grad():
        model.e_shift.zero_()
    E, F = energy_and_forces(model, b)
    with torch.no_grad():
        model.e_shift.fill_(shift)
    N = b["n_atoms"].numpy().astype(np.float64)
    E_pred = E.detach().double().numpy() + shift * N
    E_ref = b["energy"].double().numpy()
    return E_pred, E_ref, F.detach().double().numpy(), b["forces"].double().numpy()


def time_model(model, samples: list[dict], repeats: int = 3, single: int = 100) -> dict:
    """Model cost (energy + forces by the chain rule), ms per structure: batched over
    ``samples`` and one structure at a time (first ``single`` structures)."""
    import torch

    b = collate(samples, torch.float32)
    energy_and_forces(model, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        energy_and_forces(model, b)
        best = min(best, time.perf_counter() - t)
    one = [collate([s], torch.float32) for s in samples[:single]]
    t = time.perf_counter()
    for bb in one:
        energy_and_forces(model, bb)
    t_one = (time.perf_counter() - t) / max(len(one), 1)
    return {"model_ms_batched": 1e3 * best / len(samples), "model_ms_single": 1e3 * t_one}


def maes(E_pred, E_ref, F_pred, F_ref) -> dict:
    e = float(np.abs(E_pred - E_ref).mean())
    f = float(np.abs(F_pred - F_ref).mean())
    return {"energy_mae_kcal_mol": e, "force_mae_kcal_mol_A": f,
            "energy_mae_meV": e * KCAL_PER_MOL_IN_EV * 1e3,
            "force_mae_meV_A": f * KCAL_PER_MOL_IN_EV * 1e3}


# ------------------------------------------------------------------------------------ plots
def plot_parity(path: Path, E_pred, E_ref, F_pred, F_ref, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4.5))
    e0 = float(np.mean(E_ref))
    ax[0].scatter(E_ref - e0, E_pred - e0, s=4, alpha=0.6)
    lim = [min((E_ref - e0).min(), (E_pred - e0).min()), max((E_ref - e0).max(), (E_pred - e0).max())]
    ax[0].plot(lim, lim, "k--", lw=0.8)
    ax[0].set_xlabel(f"reference energy - {e0:.1f} (kcal/mol)")
    ax[0].set_ylabel("predicted energy (same shift, kcal/mol)")
    ax[0].set_title(f"energy, MAE {np.abs(E_pred - E_ref).mean():.3f} kcal/mol")
    fr, fp = F_ref.reshape(-1), F_pred.reshape(-1)
    ax[1].scatter(fr, fp, s=2, alpha=0.3)
    lim = [min(fr.min(), fp.min()), max(fr.max(), fp.max())]
    ax[1].plot(lim, lim, "k--", lw=0.8)
    ax[1].set_xlabel("reference force component (kcal/mol/A)")
    ax[1].set_ylabel("predicted force component (kcal/mol/A)")
    ax[1].set_title(f"forces, MAE {np.abs(fp - fr).mean():.3f} kcal/mol/A")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curve(path: Path, histories: dict[str, list[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))
    for label, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        for k, (key, name) in enumerate((("energy_mae", "energy MAE (kcal/mol)"),
                                         ("force_mae", "force MAE (kcal/mol/A)"))):
            l, = ax[k].plot(ep, [h[f"train_{key}"] for h in hist], lw=1, label=f"{label} train")
            if "val_" + key in hist[0]:
                ax[k].plot(ep, [h[f"val_{key}"] for h in hist], lw=1, ls="--", color=l.get_color(),
                           label=f"{label} validation")
            ax[k].set_yscale("log")
            ax[k].set_xlabel("epoch")
            ax[k].set_ylabel(name)
    ax[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float) + "\n")


def set_threads(n: int = 1) -> None:
    """One torch thread: the machine is shared and the network is small."""
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


# ------------------------------------------------------------------------------- force check
def fd_forces_fresh(model, featurizer, numbers, positions, cell, pbc, h: float = 1e-4):
    """``-dE/dr`` by central finite differences of the model energy, where every displaced
    structure is featurized afresh with ``featurizer.featurize`` (no stored derivative is
    used).  The model runs in float64 here."""
    import copy

    import torch
    from gmp_pipeline import Structure

    m64 = copy.deepcopy(model).double().eval()

    def energy(pos):
        s = Structure(numbers, pos, cell, pbc)
        X = torch.as_tensor(featurizer.featurize(s, derivatives=False).features)
        with torch.no_grad():
            return float(m64.atom_energies(X).sum())

    pos0 = np.asarray(positions, dtype=np.float64)
    F = np.zeros_like(pos0)
    for j in range(pos0.shape[0]):
        for x in range(3):
            p = pos0.copy()
            p[j, x] += h
            ep = energy(p)
            p[j, x] -= 2 * h
            em = energy(p)
            F[j, x] = -(ep - em) / (2 * h)
    return F, energy(pos0)


def chain_rule_forces(model, sample: dict, swap_pairs: bool = False, drop_self: bool = False):
    """Forces of one stored structure by the chain rule (float64 model), plus the energy.

    ``swap_pairs`` / ``drop_self`` are deliberate mistakes (centre and neighbour exchanged;
    the derivative of an atom's features with respect to its own position left out) used as
    negative controls: a force check that passes them would prove nothing."""
    import copy

    import torch

    m64 = copy.deepcopy(model).double().eval()
    b = collate([sample], torch.float64)
    if swap_pairs:
        b["pair_center"], b["pair_neighbor"] = b["pair_neighbor"], b["pair_center"]
    if drop_self:
        keep = b["pair_center"] != b["pair_neighbor"]
        for k in ("pair_center", "pair_neighbor", "dfeatures"):
            b[k] = b[k][keep]
    E, F = energy_and_forces(m64, b)
    return F.detach().numpy(), float(E.detach())


def force_check(model, store_path, indices, h: float = 1e-4) -> dict:
    """Compare chain-rule forces from the store with finite differences of the model energy on
    freshly featurized displaced structures, for structures ``indices`` of the store.

    Returns the largest absolute deviation, the largest force, the deviations of the two
    negative controls and the energy mismatch stored-vs-fresh features at the stored geometry.
    """
    from gmp_pipeline import GMPFeaturizer, open_store

    st = open_store(store_path)
    fz = GMPFeaturizer.from_config(st.feature_config)
    ds = st.torch_dataset(dtype=__import__("torch").float64)
    out = {"max_abs_dev": 0.0, "max_abs_force": 0.0, "swap_pairs_dev": 0.0,
           "drop_self_dev": 0.0, "energy_dev": 0.0, "n_structures": len(indices), "h": h}
    for i in indices:
        s = {k: v for k, v in ds[int(i)].items() if k in _KEEP}
        raw = st[int(i)]
        F_fd, E_fresh = fd_forces_fresh(model, fz, raw["numbers"], raw["positions"], raw["cell"],
                                        raw["pbc"], h)
        F_ch, E_st = chain_rule_forces(model, s)
        F_sw, _ = chain_rule_forces(model, s, swap_pairs=True)
        F_ds, _ = chain_rule_forces(model, s, drop_self=True)
        out["max_abs_dev"] = max(out["max_abs_dev"], float(np.abs(F_ch - F_fd).max()))
        out["max_abs_force"] = max(out["max_abs_force"], float(np.abs(F_fd).max()))
        out["swap_pairs_dev"] = max(out["swap_pairs_dev"], float(np.abs(F_sw - F_fd).max()))
        out["drop_self_dev"] = max(out["drop_self_dev"], float(np.abs(F_ds - F_fd).max()))
        out["energy_dev"] = max(out["energy_dev"], abs(E_st - E_fresh))
    return out
