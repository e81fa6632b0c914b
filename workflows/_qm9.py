"""QM9 training pieces shared by qm9_gmp.py and qm9_bp.py: targets, split, in-memory atom arrays,
atomistic networks (one shared, or one per element), resumable training, evaluation.

Everything works on whole arrays held in memory (read once from the store through the public
reader, ``open_store(...).array(...)``): a batch is a gather of atom rows, a molecule energy
an ``index_add`` of atom energies.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

import _common as C

REPO = C.REPO
SAMPLES = REPO / "tests" / "data" / "samples" / "qm9"
#: Hartree in kcal/mol (ASE / CODATA 2014: units.Hartree / (units.kcal / units.mol))
HARTREE_KCAL = 27.211386024367243 / 0.04336410390059322
ELEMENTS = (1, 6, 7, 8, 9)
SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}


# ----------------------------------------------------------------------------------- targets
def atomization_kcal(u0_hartree, numbers, n_atoms, atomref: dict) -> np.ndarray:
    """U0 atomization energy per molecule, kcal/mol: U0 - sum over atoms of atomref U0."""
    ref = np.zeros(10)
    for z, v in atomref.items():
        ref[z] = v["U0"]
    seg = np.repeat(np.arange(len(n_atoms)), n_atoms)
    ref_sum = np.bincount(seg, weights=ref[numbers], minlength=len(n_atoms))
    return (np.asarray(u0_hartree, dtype=np.float64) - ref_sum) * HARTREE_KCAL


def element_counts(numbers, n_atoms) -> np.ndarray:
    """(S, 5) counts of H, C, N, O, F per molecule."""
    seg = np.repeat(np.arange(len(n_atoms)), n_atoms)
    out = np.zeros((len(n_atoms), len(ELEMENTS)))
    for k, z in enumerate(ELEMENTS):
        out[:, k] = np.bincount(seg, weights=(numbers == z), minlength=len(n_atoms))
    return out


def linear_bias(counts, y, idx) -> np.ndarray:
    """Per-element linear fit y ~ counts @ c on molecules ``idx`` (least squares, no
    intercept); an element absent from ``idx`` gets c = 0."""
    present = counts[idx].sum(0) > 0
    c = np.zeros(counts.shape[1])
    sol, *_ = np.linalg.lstsq(counts[idx][:, present], y[idx], rcond=None)
    c[present] = sol
    return c


def make_split(n: int, n_train: int, n_val: int, seed: int):
    """Fixed seeded split of store indices: train, validation, test (the rest)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


# ------------------------------------------------------------------------------- atom arrays
class Molecules:
    """Atom rows ``X`` (A, M) float32, ``Z`` (A,), per-molecule ``n_atoms``, ``start``."""

    def __init__(self, X, Z, n_atoms):
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        self.Z = np.asarray(Z, dtype=np.int64)
        self.n_atoms = np.asarray(n_atoms, dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.n_atoms)[:-1]]).astype(np.int64)

    def atoms_of(self, mols):
        counts = self.n_atoms[mols]
        total = int(counts.sum())
        first = np.repeat(self.start[mols] - (np.cumsum(counts) - counts), counts)
        idx = first + np.arange(total)
        seg = np.repeat(np.arange(len(mols)), counts)
        return idx, seg

    def feature_stats(self, mols):
        idx, _ = self.atoms_of(mols)
        X = self.X[idx].astype(np.float64)
        mean, std = X.mean(0), X.std(0)
        std[std < 1e-8 * max(1.0, float(np.abs(X).max()))] = 1.0
        return mean, std


def load_gmp_store(path):
    """Whole arrays of a QM9 features store through the public reader: features, numbers,
    atom counts, U0 (Hartree) and gdb indices."""
    from gmp_pipeline import open_store

    st = open_store(path)
    X = np.asarray(st.array("atoms/features")[:])
    Z = np.asarray(st.array("atoms/numbers")[:]).astype(np.int64)
    n = st.n_atoms()
    u0 = np.asarray(st.array("structures/U0")[:], dtype=np.float64)
    gdb = np.asarray(st.array("structures/gdb_index")[:], dtype=np.int64)
    positions = np.asarray(st.array("atoms/positions")[:], dtype=np.float64)
    return {"X": X, "Z": Z, "n_atoms": n, "U0": u0, "gdb": gdb, "positions": positions,
            "feature_list": st.feature_list, "feature_config": st.feature_config}


# ----------------------------------------------------------------------------------- models
def make_model(kind: str, n_features: int, hidden, x_mean, x_std, e_scale: float):
    """``shared``: one MLP for all elements; ``per_element``: one MLP per element (BP)."""
    import torch

    def mlp():
        layers, last = [], n_features
        for h in hidden:
            layers += [torch.nn.Linear(last, h), torch.nn.SiLU()]
            last = h
        layers.append(torch.nn.Linear(last, 1))
        return torch.nn.Sequential(*layers)

    class Atomistic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.kind = kind
            if kind == "shared":
                self.net = mlp()
            else:
                self.nets = torch.nn.ModuleDict({SYMBOL[z]: mlp() for z in ELEMENTS})
            self.register_buffer("x_mean", torch.as_tensor(x_mean, dtype=torch.float32))
            self.register_buffer("x_std", torch.as_tensor(x_std, dtype=torch.float32))
            self.register_buffer("e_scale", torch.tensor(float(e_scale)))

        def atom_energies(self, X, Z):
            x = (X - self.x_mean) / self.x_std
            if self.kind == "shared":
                return self.net(x).squeeze(-1) * self.e_scale
            out = torch.zeros(x.shape[0], dtype=x.dtype)
            for z in ELEMENTS:
                m = Z == z
                if bool(m.any()):
                    out[m] = self.nets[SYMBOL[z]](x[m]).squeeze(-1)
            return out * self.e_scale

        def forward(self, X, Z, seg, n_mol: int):
            ea = self.atom_energies(X, Z)
            return torch.zeros(n_mol, dtype=ea.dtype).index_add(0, seg, ea)

    return Atomistic()


def n_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------- training
def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def _save_atomic(obj, path: Path):
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def predict(model, mols: Molecules, idx, batch: int = 4096) -> np.ndarray:
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(idx), batch):
            m = idx[lo:lo + batch]
            a, seg = mols.atoms_of(m)
            out.append(model(torch.from_numpy(mols.X[a]), torch.from_numpy(mols.Z[a]),
                             torch.from_numpy(seg), len(m)).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train(name: str, mols: Molecules, y: np.ndarray, train_idx, val_idx, *, kind: str,
          hidden, epochs: int, batch_size: int, lr: float, lr_min: float, seed: int,
          ckpt: Path, max_minutes: float | None = None, settings: dict | None = None,
          log_every: int = 10, val_every: int = 1):
    """Train an atomistic model on molecule targets ``y`` (kcal/mol, the residual after the
    bias), MSE loss, Adam, cosine decay ``lr`` -> ``lr_min`` over ``epochs``; the weights of the
    best validation MAE are kept.  A checkpoint (model, optimizer, scheduler, RNG, history,
    best weights) is written every ``val_every`` epochs (after validating) to ``ckpt``; a rerun with the same settings resumes
    from it.  ``max_minutes`` stops the run (checkpointed, ``finished`` False) when exceeded.

    Returns (model with the best weights, history, info dict).
    """
    import torch

    settings = dict(settings or {})
    settings.update(kind=kind, hidden=list(hidden), epochs=epochs, batch_size=batch_size,
                    lr=lr, lr_min=lr_min, seed=seed, n_train=int(len(train_idx)),
                    n_val=int(len(val_idx)),
                    train_sha=hashlib.sha256(np.asarray(train_idx).tobytes()).hexdigest()[:16])
    key = settings_hash(settings)
    torch.manual_seed(seed)
    x_mean, x_std = mols.feature_stats(train_idx)
    e_scale = float(np.std(y[train_idx]) / max(1.0, np.sqrt(mols.n_atoms[train_idx].mean())))
    model = make_model(kind, mols.X.shape[1], hidden, x_mean, x_std, e_scale or 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr_min)
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    best = {"val_mae": float("inf"), "epoch": 0, "state": None}
    epoch0, elapsed0 = 0, 0.0
    if ckpt.exists():
        ck = torch.load(ckpt, weights_only=False)
        if ck.get("key") == key:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            rng.bit_generator.state = ck["rng"]
            torch.set_rng_state(ck["torch_rng"])
            history, best = ck["history"], ck["best"]
            epoch0, elapsed0 = ck["epoch"], ck["elapsed"]
            C.log(f"{name}: resuming from {ckpt} at epoch {epoch0} ({elapsed0 / 60:.1f} min "
                  "trained so far)")
        else:
            C.log(f"{name}: checkpoint {ckpt} has other settings; starting afresh")
    yv = y[val_idx]
    t0 = time.perf_counter()
    finished = epoch0 >= epochs
    stopped_by_time = False
    yt = torch.from_numpy(y.astype(np.float32))
    var = float(np.var(y[train_idx])) or 1.0
    for epoch in range(epoch0 + 1, epochs + 1):
        model.train()
        order = rng.permutation(np.asarray(train_idx))
        tot_abs, tot_n = 0.0, 0
        for lo in range(0, len(order), batch_size):
            m = order[lo:lo + batch_size]
            a, seg = mols.atoms_of(m)
            E = model(torch.from_numpy(mols.X[a]), torch.from_numpy(mols.Z[a]),
                       torch.from_numpy(seg), len(m))
            t = yt[m]
            loss = ((E - t) ** 2).mean() / var
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot_abs += float((E.detach() - t).abs().sum())
            tot_n += len(m)
        sched.step()
        elapsed = elapsed0 + time.perf_counter() - t0
        finished = epoch == epochs
        over = max_minutes is not None and elapsed > 60 * max_minutes and not finished
        rec = {"epoch": epoch, "train_mae": tot_abs / max(tot_n, 1),
               "lr": opt.param_groups[0]["lr"], "elapsed_s": elapsed}
        history.append(rec)
        if not (epoch % val_every == 0 or finished or over):
            continue
        pv = predict(model, mols, val_idx)
        val_mae = float(np.abs(pv - yv).mean()) if len(val_idx) else float("nan")
        rec["val_mae"] = val_mae
        if val_mae < best["val_mae"] or best["state"] is None:
            best = {"val_mae": val_mae, "epoch": epoch,
                    "state": {k: v.clone() for k, v in model.state_dict().items()}}
        _save_atomic({"key": key, "settings": settings, "model": model.state_dict(),
                      "opt": opt.state_dict(), "sched": sched.state_dict(),
                      "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                      "history": history, "best": best, "epoch": epoch, "elapsed": elapsed},
                     ckpt)
        if epoch % log_every == 0 or finished or over:
            C.log(f"{name}: epoch {epoch}/{epochs}  train MAE {rec['train_mae']:.3f}  val MAE "
                  f"{val_mae:.3f} kcal/mol (best {best['val_mae']:.3f} @ {best['epoch']})  "
                  f"{elapsed / 60:.1f} min")
        if over:
            stopped_by_time = True
            C.log(f"{name}: stopped by the time cap ({max_minutes} min) at epoch {epoch} of "
                  f"{epochs}; rerun the same command to resume")
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    info = {"finished": finished, "stopped_by_time_cap": stopped_by_time,
            "epochs_done": history[-1]["epoch"] if history else 0, "epochs_planned": epochs,
            "best_epoch": best["epoch"], "best_val_mae": best["val_mae"],
            "train_seconds": history[-1]["elapsed_s"] if history else 0.0,
            "n_parameters": n_parameters(model), "settings": settings}
    return model, history, info
