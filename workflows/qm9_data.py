#!/usr/bin/env python
"""Rebuild QM9 in its original layout from the ``qm9pack`` wheel (PyPI, MIT; data CC0).

    pip install -e ".[qm9]"                                   # qm9pack (~230 MB of CSV)
    python workflows/qm9_data.py --out /work/data/qm9         # dir + archive, 130,831 molecules
    python workflows/qm9_data.py --out D --limit 100          # the first 100 (tests)
    python workflows/qm9_data.py --out D --no-archive         # the directory only

Writes ``OUT/dsgdb9nsd/dsgdb9nsd_NNNNNN.xyz`` (one file per molecule), ``OUT/dsgdb9nsd.xyz.tar.bz2``
(flat members in gdb-index order, as the figshare release) and copies QM9's ``atomref.txt`` and
``uncharacterized.txt`` (the real files bundled in tests/data/samples/qm9) beside them.

qm9pack ships the 130,831 characterized molecules (the 133,885 of the release minus the 3,054 of
``uncharacterized.txt``) as CSV.  Each file is written in the QM9 grammar: line 1 the atom count;
``gdb <index>`` then the 15 properties, tab-separated, trailing tab; atom lines
``symbol<TAB>x<TAB>y<TAB>z<TAB>charge`` with a space before non-negative numbers; the frequencies
tab-separated; the SMILES line with a trailing tab; the InChI line.  Numbers are the CSV's own
text (never re-formatted), with the CSV's ``E`` exponents written back as Mathematica ``*^``
(the release writes ``7.9254*^-6`` where qm9pack has ``7.9254E-6``).

Known differences from the release (what qm9pack does not carry):
* qm9pack has ONE SMILES (the GDB-17 one) and ONE InChI (the GDB-17 one); the release has a second
  of each from the relaxed B3LYP geometry.  The second column repeats the first here, so files
  whose relaxed strings differ (aromatic or stereo forms, e.g. dsgdb9nsd_005005) differ in those
  two fields; everything else is byte-identical (checked against the real sample files by
  tests/test_qm9_data.py).
* 334 molecules carry their frequency list twice in qm9pack; the first 3N-6 (3N-5 when the list
  has 2 x (3N-5) values: linear molecules) are kept.  The second list is not an exact copy (it
  differs in the last digits, e.g. dsgdb9nsd_000029: 23.6099 then 23.6091 cm^-1: apparently a
  second frequency calculation); the build counts how many differ.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "data" / "samples" / "qm9"
N_CHARACTERIZED = 130_831


def qm9pack_csvs() -> list[Path]:
    """The three molecule CSVs of the installed qm9pack wheel (found without importing it: its
    __init__ imports pandas and setuptools' pkg_resources)."""
    import importlib.util

    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qm9pack is not installed: pip install -e '.[qm9]' (or pip install "
                         "qm9pack)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    parts = [data / f"qm9_part{k}.csv" for k in (1, 2, 3)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise SystemExit(f"qm9pack data files missing: {missing}")
    return parts


def iter_rows(limit: int | None = None):
    """CSV rows of qm9pack as dicts of raw text, in file order (= gdb order)."""
    n = 0
    for part in qm9pack_csvs():
        with open(part, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                yield row
                n += 1
                if limit is not None and n >= limit:
                    return


PROPERTY_COLUMNS = ("RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye", "Polarizability_bohr3",
                    "HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au",
                    "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au",
                    "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K")


def _mathematica(text: str) -> str:
    """The CSV's ``7.9254E-6`` back to the release's ``7.9254*^-6``."""
    if "E" in text or "e" in text:
        return text.replace("E", "*^").replace("e", "*^")
    return text


def _signed(text: str) -> str:
    """Atom-line number: a leading space before non-negative values, as in the release."""
    text = _mathematica(text)
    return text if text.startswith("-") else " " + text


def _list(text: str) -> list[str]:
    return [t for t in text.strip().strip("[]").replace("[", "").replace("]", "").split(",")
            if t.strip()]


class RowError(ValueError):
    pass


def molecule_text(row: dict, stats: dict | None = None) -> tuple[str, str]:
    """(file name, file text) of one qm9pack row in the QM9 grammar."""
    name = row["XYZ_file"]
    n = int(row["N_atoms"])
    index = int(row["Index"])
    if name != f"dsgdb9nsd_{index:06d}.xyz":
        raise RowError(f"{name}: index {index} does not match the name")
    symbols = [s.strip().strip("'\"") for s in row["Elements"].strip("[]").split(",")]
    xyz = _list(row["XYZ_Ang"])
    q = _list(row["Mulliken_pop"])
    freqs = _list(row["Harmonic_Freq_cmi"])
    if len(symbols) != n or len(xyz) != 3 * n or len(q) != n:
        raise RowError(f"{name}: {len(symbols)} symbols, {len(xyz)} coordinates, {len(q)} "
                       f"charges for {n} atoms")
    nf = len(freqs)
    if nf not in (3 * n - 6, 3 * n - 5):
        half = nf // 2
        if nf % 2 or half not in (3 * n - 6, 3 * n - 5):
            raise RowError(f"{name}: {nf} frequencies for {n} atoms")
        if stats is not None:
            stats["frequencies_deduplicated"] = stats.get("frequencies_deduplicated", 0) + 1
            if freqs[:half] != freqs[half:]:
                stats["second_list_differs"] = stats.get("second_list_differs", 0) + 1
        freqs = freqs[:half]
    props = [_mathematica(row[c].strip()) for c in PROPERTY_COLUMNS]
    lines = [str(n), f"gdb {index}\t" + "\t".join(props) + "\t"]
    for k in range(n):
        lines.append(symbols[k] + "\t" + "\t".join(_signed(v.strip()) for v in
                                                   (*xyz[3 * k:3 * k + 3], q[k])))
    lines.append("\t".join(_mathematica(f.strip()) for f in freqs))
    smiles, inchi = row["SMILES"].strip(), row["InChi"].strip()
    # qm9pack has only the GDB-17 strings: the relaxed-geometry column repeats them
    lines.append(f"{smiles}\t{smiles}\t")
    lines.append(f"{inchi}\t{inchi}")
    return name, "\n".join(lines) + "\n"


def build(out: Path, *, limit: int | None = None, archive: bool = True,
          directory: bool = True, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    d = out / "dsgdb9nsd"
    t0 = time.perf_counter()
    stats: dict = {"molecules": 0, "frequencies_deduplicated": 0, "second_list_differs": 0}
    tar = None
    tar_path = out / "dsgdb9nsd.xyz.tar.bz2"
    tmp_tar = tar_path.with_name(tar_path.name + ".part")
    if directory:
        d.mkdir(exist_ok=True)
    if archive:
        tar = tarfile.open(tmp_tar, "w:bz2", compresslevel=9, format=tarfile.GNU_FORMAT)
    try:
        for row in iter_rows(limit):
            name, text = molecule_text(row, stats)
            data = text.encode("utf-8")
            if directory:
                with open(d / name, "wb") as f:
                    f.write(data)
            if tar is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 1402000000  # fixed: the build is reproducible
                tar.addfile(info, io.BytesIO(data))
            stats["molecules"] += 1
            if stats["molecules"] % 20000 == 0:
                log(f"  {stats['molecules']} molecules ({time.perf_counter() - t0:.0f} s)")
    finally:
        if tar is not None:
            tar.close()
    if tar is not None:
        os.replace(tmp_tar, tar_path)
    for extra in ("atomref.txt", "uncharacterized.txt"):
        shutil.copy(SAMPLES / extra, out / extra)
        if directory:
            shutil.copy(SAMPLES / extra, d / extra)
    stats["seconds"] = time.perf_counter() - t0
    stats["directory"] = str(d) if directory else None
    stats["archive"] = str(tar_path) if archive else None
    if limit is None and stats["molecules"] != N_CHARACTERIZED:
        log(f"warning: {stats['molecules']} molecules, expected {N_CHARACTERIZED}")
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (outside the repo)")
    p.add_argument("--limit", type=int, help="only the first N molecules")
    p.add_argument("--no-archive", action="store_true", help="do not write the .tar.bz2")
    p.add_argument("--no-directory", action="store_true", help="do not write the directory")
    a = p.parse_args(argv)
    st = build(a.out, limit=a.limit, archive=not a.no_archive, directory=not a.no_directory)
    print(f"{st['molecules']} molecules ({st['frequencies_deduplicated']} with their frequency "
          f"list given twice, {st['second_list_differs']} of them with a second list that differs) in {st['seconds']:.0f} s: {st['directory']} {st['archive']}")
    return st


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
