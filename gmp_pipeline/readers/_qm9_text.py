"""Fast parsing of many QM9 ``dsgdb9nsd`` files at once.

:func:`parse_batch` splits each file into its lines (one C call per file), then converts the
numbers of the whole batch with a few numpy calls: all property lines together, all atom lines
together, all frequency lines together.  It yields exactly what the per-file parser
``qm9.parse_qm9_text`` gives; whenever the batch does not fit the grammar (a wrong count, a
non-numeric token, an unknown element, undecodable text) it reports the batch as not parsed and
the caller parses the files one by one with the per-file parser, whose errors name the file,
the record and the field.  Bad input is therefore never slower to diagnose, only slower to
parse.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

PROPERTIES = ("A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H",
              "G", "Cv")
_Z = {b"H": 1, b"C": 6, b"N": 7, b"O": 8, b"F": 9}
_ZLUT = np.zeros(256, dtype=np.int64)
for _s, _z in _Z.items():
    _ZLUT[_s[0]] = _z


class NotParsed(Exception):
    """The batch does not fit the grammar: parse its files one by one."""


def _floats(tokens: list[bytes]) -> np.ndarray:
    if not tokens:
        return np.zeros(0)
    try:
        return np.array(tokens).astype(np.float64)
    except (ValueError, TypeError):
        raise NotParsed from None


def parse_batch(blobs: Sequence[bytes]) -> list[dict[str, Any]]:
    """Parse the raw bytes of many dsgdb9nsd files; return one dict per file with
    ``numbers``, ``positions``, ``charges`` and ``info`` (as ``parse_qm9_text``).

    Raises :class:`NotParsed` when any file of the batch does not fit the grammar.
    """
    m = len(blobs)
    if m == 0:
        return []
    ns = np.empty(m, dtype=np.int64)
    heads: list[bytes] = []
    atoms: list[bytes] = []
    freq_lines: list[bytes] = []
    nfreq = np.empty(m, dtype=np.int64)
    tail: list[tuple[list[bytes], list[bytes]]] = []
    try:
        for k, blob in enumerate(blobs):
            lines = blob.split(b"\n")
            n = int(lines[0])
            if n < 1 or len(lines) < n + 5:
                raise NotParsed
            ns[k] = n
            heads.append(lines[1])
            atoms.extend(lines[2:2 + n])
            fl = lines[n + 2]
            freq_lines.append(fl)
            nfreq[k] = len(fl.split())
            smiles = lines[n + 3].strip().split(b"\t")
            inchi = lines[n + 4].strip().split(b"\t")
            if len(smiles) != 2 or len(inchi) != 2:
                raise NotParsed
            tail.append((smiles, inchi))
    except (ValueError, IndexError):
        raise NotParsed from None
    # property lines: 'gdb', index, 15 numbers each
    htok = b"\t".join(heads).replace(b"*^", b"e").split()
    if len(htok) != 17 * m or htok[0::17].count(b"gdb") != m:
        raise NotParsed
    try:
        gdb = [int(t) for t in htok[1::17]]
    except ValueError:
        raise NotParsed from None
    props = np.empty((m, 15))
    for c in range(15):
        props[:, c] = _floats(htok[2 + c::17])
    # atom lines: symbol and 4 numbers each
    atok = b"\t".join(atoms).replace(b"*^", b"e").split()
    n_total = int(ns.sum())
    if len(atok) != 5 * n_total:
        raise NotParsed
    sym = atok[0::5]
    if any(len(s) != 1 for s in sym):
        raise NotParsed
    numbers = _ZLUT[np.frombuffer(b"".join(sym), dtype=np.uint8)]
    if not numbers.all():
        raise NotParsed
    xyzq = np.empty((n_total, 4))
    for c in range(4):
        xyzq[:, c] = _floats(atok[1 + c::5])
    # frequencies: 3N-6 (or 3N-5, linear) numbers each
    ok = (ns < 2) | (nfreq == 3 * ns - 6) | (nfreq == 3 * ns - 5)
    if not ok.all():
        raise NotParsed
    ftok = b"\t".join(freq_lines).replace(b"*^", b"e").split()
    _floats(ftok)  # every frequency must be a number
    # assemble
    out = []
    props_l = props.tolist()
    a0 = 0
    f0 = 0
    try:
        for k in range(m):
            n = int(ns[k])
            nf = int(nfreq[k])
            info: dict[str, Any] = {"gdb_index": gdb[k]}
            info.update(zip(PROPERTIES, props_l[k]))
            (s1, s2), (i1, i2) = tail[k]
            info.update({"n_frequencies": nf,
                         "frequencies": b" ".join(ftok[f0:f0 + nf]).decode("ascii"),
                         "linear": nf == 3 * n - 5 and n > 2,
                         "smiles_gdb": s1.strip().decode("utf-8"),
                         "smiles_relaxed": s2.strip().decode("utf-8"),
                         "inchi_gdb": i1.strip().decode("utf-8"),
                         "inchi_relaxed": i2.strip().decode("utf-8")})
            block = xyzq[a0:a0 + n]
            out.append({"numbers": numbers[a0:a0 + n], "positions": block[:, :3],
                        "charges": block[:, 3], "info": info})
            a0 += n
            f0 += nf
    except UnicodeDecodeError:
        raise NotParsed from None
    return out
