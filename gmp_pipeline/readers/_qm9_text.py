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

    The whole batch goes through one compiled pass (:func:`_scan_files`); a batch it cannot
    take is split into lines in Python and its numbers go through the line scanners
    (:func:`_scan_heads`, :func:`_scan_atoms`, :func:`_scan_counts`) or, when they cannot take
    them either (a number with more than 15 significant digits, ``nan``, ...), through numpy's
    own conversion.  Raises
    :class:`NotParsed` when any file of the batch does not fit the grammar.
    """
    m = len(blobs)
    if m == 0:
        return []
    out = _parse_compiled(blobs)
    if out is not None:
        return out
    # line by line in Python, numbers through the scanners or numpy
    ns = np.empty(m, dtype=np.int64)
    heads: list[bytes] = []
    atoms: list[bytes] = []
    freq_lines: list[bytes] = []
    freq_text: list[str] = []
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
            ft = fl.split()
            nfreq[k] = len(ft)
            text = b" ".join(ft)
            if b"*^" in text:
                text = text.replace(b"*^", b"e")
            freq_text.append(text.decode("ascii"))
            smiles = lines[n + 3].strip().split(b"\t")
            inchi = lines[n + 4].strip().split(b"\t")
            if len(smiles) != 2 or len(inchi) != 2:
                raise NotParsed
            tail.append((smiles, inchi))
    except (ValueError, IndexError, UnicodeDecodeError):
        raise NotParsed from None
    ok = (ns < 2) | (nfreq == 3 * ns - 6) | (nfreq == 3 * ns - 5)
    if not ok.all():
        raise NotParsed
    n_total = int(ns.sum())
    gdb = np.empty(m, dtype=np.int64)
    props = np.empty((m, 15))
    numbers = np.empty(n_total, dtype=np.int64)
    xyz = np.empty((n_total, 3))
    q = np.empty(n_total)
    counts = np.empty(m, dtype=np.int64)
    hbuf = np.frombuffer(b"\n".join(heads), dtype=np.uint8)
    abuf = np.frombuffer(b"\n".join(atoms), dtype=np.uint8)
    fbuf = np.frombuffer(b"\n".join(freq_lines), dtype=np.uint8)
    if (_scan_heads(hbuf, m, gdb, props, _POW10) != 0
            or _scan_atoms(abuf, n_total, _ZLUT, numbers, xyz, q, _POW10) != 0
            or _scan_counts(fbuf, m, counts, _POW10) != 0 or not np.array_equal(counts, nfreq)):
        gdb, props, numbers, xyz, q = _numbers_numpy(heads, atoms, freq_lines, m, n_total)
    # assemble
    out = []
    props_l = props.tolist()
    gdb_l = gdb.tolist()
    a0 = 0
    try:
        for k in range(m):
            n = int(ns[k])
            nf = int(nfreq[k])
            info: dict[str, Any] = {"gdb_index": gdb_l[k]}
            info.update(zip(PROPERTIES, props_l[k]))
            (s1, s2), (i1, i2) = tail[k]
            info.update({"n_frequencies": nf, "frequencies": freq_text[k],
                         "linear": nf == 3 * n - 5 and n > 2,
                         "smiles_gdb": s1.strip().decode("utf-8"),
                         "smiles_relaxed": s2.strip().decode("utf-8"),
                         "inchi_gdb": i1.strip().decode("utf-8"),
                         "inchi_relaxed": i2.strip().decode("utf-8")})
            out.append({"numbers": numbers[a0:a0 + n], "positions": xyz[a0:a0 + n],
                        "charges": q[a0:a0 + n], "info": info})
            a0 += n
    except UnicodeDecodeError:
        raise NotParsed from None
    return out


def _numbers_numpy(heads, atoms, freq_lines, m, n_total):
    """The numbers of a batch through numpy's string conversion (slower, takes anything
    Python's float() takes)."""
    htok = b"\t".join(heads).replace(b"*^", b"e").split()
    if len(htok) != 17 * m or htok[0::17].count(b"gdb") != m:
        raise NotParsed
    try:
        gdb = np.array([int(t) for t in htok[1::17]], dtype=np.int64)
    except ValueError:
        raise NotParsed from None
    props = np.empty((m, 15))
    for c in range(15):
        props[:, c] = _floats(htok[2 + c::17])
    atok = b"\t".join(atoms).replace(b"*^", b"e").split()
    if len(atok) != 5 * n_total:
        raise NotParsed
    sym = atok[0::5]
    if any(len(s) != 1 for s in sym):
        raise NotParsed
    numbers = _ZLUT[np.frombuffer(b"".join(sym), dtype=np.uint8)]
    if not numbers.all():
        raise NotParsed
    xyz = np.empty((n_total, 3))
    for c in range(3):
        xyz[:, c] = _floats(atok[1 + c::5])
    q = _floats(atok[4::5])
    _floats(b"\t".join(freq_lines).replace(b"*^", b"e").split())  # every one a number
    return gdb, props, numbers, xyz, q


# ------------------------------------------------------------------------ compiled scanning
# Numbers are read as an integer mantissa and a decimal exponent and converted with one IEEE
# multiplication or division by an exact power of ten, which is correctly rounded (the same
# double as Python's float()) when the mantissa has at most 15 digits and the exponent is at
# most 22 in magnitude (Clinger's fast path).  Any other number, or anything off the grammar,
# makes the kernel give up (negative status) and the batch goes to the slower exact paths.
from numba import njit  # noqa: E402

_POW10 = np.array([10.0 ** k for k in range(23)])


@njit(cache=True, nogil=True)
def _skip_ws(buf, i, n):
    while i < n and (buf[i] == 32 or buf[i] == 9 or buf[i] == 13):
        i += 1
    return i


@njit(cache=True, nogil=True)
def _number(buf, i, n, pow10):
    """Parse one number at buf[i]; return (value, next index, ok)."""
    neg = False
    if i < n and (buf[i] == 45 or buf[i] == 43):
        neg = buf[i] == 45
        i += 1
    mant = 0
    digits = 0
    frac = 0
    seen = 0
    while i < n and 48 <= buf[i] <= 57:
        if digits > 0 or buf[i] != 48:
            digits += 1
        mant = mant * 10 + (buf[i] - 48)
        seen += 1
        i += 1
    if i < n and buf[i] == 46:
        i += 1
        while i < n and 48 <= buf[i] <= 57:
            if digits > 0 or buf[i] != 48:
                digits += 1
            mant = mant * 10 + (buf[i] - 48)
            frac += 1
            seen += 1
            i += 1
    if seen == 0 or digits > 15:
        return 0.0, i, False
    e = 0
    has_e = False
    if i < n and (buf[i] == 101 or buf[i] == 69):
        i += 1
        has_e = True
    elif i + 1 < n and buf[i] == 42 and buf[i + 1] == 94:  # Mathematica *^
        i += 2
        has_e = True
    if has_e:
        eneg = False
        if i < n and (buf[i] == 45 or buf[i] == 43):
            eneg = buf[i] == 45
            i += 1
        ed = 0
        while i < n and 48 <= buf[i] <= 57:
            e = e * 10 + (buf[i] - 48)
            ed += 1
            i += 1
            if e > 1000:
                return 0.0, i, False
        if ed == 0:
            return 0.0, i, False
        if eneg:
            e = -e
    k = e - frac
    if k > 22 or k < -22:
        return 0.0, i, False
    v = float(mant)
    if k >= 0:
        v = v * pow10[k]
    else:
        v = v / pow10[-k]
    if neg:
        v = -v
    # the token must end here
    if i < n and not (buf[i] == 32 or buf[i] == 9 or buf[i] == 13 or buf[i] == 10):
        return 0.0, i, False
    return v, i, True


@njit(cache=True, nogil=True)
def _uint(buf, i, n, max_digits):
    """The unsigned integer at buf[i] (at most max_digits digits): (value, index past it), or
    value -1 when there is none or it is longer."""
    v = 0
    nd = 0
    while i < n and 48 <= buf[i] <= 57:
        v = v * 10 + (buf[i] - 48)
        nd += 1
        i += 1
        if nd > max_digits:
            return -1, i
    if nd == 0:
        return -1, i
    return v, i


@njit(cache=True, nogil=True)
def _head_line(buf, i, n, pow10, props, k):
    """'gdb <index> <15 numbers>' at buf[i] into props[k]: (index past it, gdb index), or
    index -1 when it does not fit."""
    i = _skip_ws(buf, i, n)
    if i + 3 >= n or buf[i] != 103 or buf[i + 1] != 100 or buf[i + 2] != 98:
        return -1, 0
    i += 3
    if not (buf[i] == 32 or buf[i] == 9):
        return -1, 0
    g, i = _uint(buf, _skip_ws(buf, i, n), n, 12)
    if g < 0 or (i < n and not (buf[i] == 32 or buf[i] == 9)):
        return -1, 0
    for c in range(15):
        i = _skip_ws(buf, i, n)
        v, i, ok = _number(buf, i, n, pow10)
        if not ok:
            return -1, 0
        props[k, c] = v
    return _skip_ws(buf, i, n), g


@njit(cache=True, nogil=True)
def _atom_line(buf, i, n, zlut, pow10, numbers, xyz, q, a):
    """'symbol x y z q' at buf[i] into atom a: the index past it, or -1."""
    i = _skip_ws(buf, i, n)
    if i + 1 >= n:
        return -1
    z = zlut[buf[i]]
    if z == 0 or not (buf[i + 1] == 32 or buf[i + 1] == 9):
        return -1
    numbers[a] = z
    i += 1
    for c in range(4):
        i = _skip_ws(buf, i, n)
        v, i, ok = _number(buf, i, n, pow10)
        if not ok:
            return -1
        if c < 3:
            xyz[a, c] = v
        else:
            q[a] = v
    return _skip_ws(buf, i, n)


@njit(cache=True, nogil=True)
def _numbers_line(buf, i, n, pow10):
    """A line of numbers at buf[i]: (index of its end, how many), or index -1."""
    c = 0
    while True:
        i = _skip_ws(buf, i, n)
        if i >= n or buf[i] == 10:
            return i, c
        v, i, ok = _number(buf, i, n, pow10)
        if not ok:
            return -1, 0
        c += 1


@njit(cache=True, nogil=True)
def _scan_atoms(buf, n_lines, zlut, numbers, xyz, q, pow10):
    """Lines 'symbol x y z q' separated by newlines; 0 when every line fits."""
    n = buf.shape[0]
    i = 0
    for a in range(n_lines):
        i = _atom_line(buf, i, n, zlut, pow10, numbers, xyz, q, a)
        if i < 0 or (i < n and buf[i] != 10):
            return -1
        i += 1
    return 0


@njit(cache=True, nogil=True)
def _scan_heads(buf, m, gdb, props, pow10):
    """Lines 'gdb <index> <15 numbers>' separated by newlines; 0 when every line fits."""
    n = buf.shape[0]
    i = 0
    for k in range(m):
        i, g = _head_line(buf, i, n, pow10, props, k)
        if i < 0 or (i < n and buf[i] != 10):
            return -1
        gdb[k] = g
        i += 1
    return 0


@njit(cache=True, nogil=True)
def _scan_counts(buf, m, counts, pow10):
    """Lines of numbers separated by newlines: every token a number; counts per line."""
    n = buf.shape[0]
    i = 0
    for k in range(m):
        i, c = _numbers_line(buf, i, n, pow10)
        if i < 0:
            return -1
        counts[k] = c
        i += 1
    return 0


@njit(cache=True, nogil=True)
def _line_end(buf, i, n):
    while i < n and buf[i] != 10:
        i += 1
    return i


@njit(cache=True, nogil=True)
def _is_space(c):
    # what bytes.strip() removes
    return c == 32 or c == 9 or c == 10 or c == 13 or c == 11 or c == 12


@njit(cache=True, nogil=True)
def _two_fields(buf, a, b, spans, k, j):
    """The line buf[a:b] stripped and split at its one tab into two stripped fields, as
    ``line.strip().split(b"\t")`` with each part stripped: their bounds into spans[k, j:j+4];
    False when the line does not hold exactly two fields."""
    while a < b and _is_space(buf[a]):
        a += 1
    while b > a and _is_space(buf[b - 1]):
        b -= 1
    t = -1
    for i in range(a, b):
        if buf[i] == 9:
            if t >= 0:
                return False
            t = i
    if t < 0:
        return False
    e = t
    while e > a and _is_space(buf[e - 1]):
        e -= 1
    s = t + 1
    while s < b and _is_space(buf[s]):
        s += 1
    spans[k, j] = a
    spans[k, j + 1] = e
    spans[k, j + 2] = s
    spans[k, j + 3] = b
    return True


@njit(cache=True, nogil=True)
def _count_atoms(buf, starts, ends, ns):
    """The atom count (first line) of every file; -1 when one is not a positive integer."""
    for k in range(starts.shape[0]):
        n = ends[k]
        v, i = _uint(buf, _skip_ws(buf, starts[k], n), n, 9)
        i = _skip_ws(buf, i, n)
        if v < 1 or (i < n and buf[i] != 10):
            return -1
        ns[k] = v
    return 0


@njit(cache=True, nogil=True)
def _scan_files(buf, starts, ends, ns, zlut, pow10, gdb, props, numbers, xyz, q, nfreq, spans):
    """Every file of a batch in one pass: header, atoms, frequency count; ``spans[k]`` gets the
    byte range of the frequency line and those of the two SMILES and two InChI strings.  0 when
    every file fits."""
    a = 0
    for k in range(starts.shape[0]):
        n = ends[k]
        i = _line_end(buf, starts[k], n) + 1          # past the atom-count line
        i, g = _head_line(buf, i, n, pow10, props, k)
        if i < 0 or i >= n or buf[i] != 10:
            return -1
        gdb[k] = g
        i += 1
        for _ in range(ns[k]):
            i = _atom_line(buf, i, n, zlut, pow10, numbers, xyz, q, a)
            if i < 0 or i >= n or buf[i] != 10:
                return -1
            i += 1
            a += 1
        spans[k, 0] = i
        i, c = _numbers_line(buf, i, n, pow10)
        if i < 0 or i >= n:
            return -1
        spans[k, 1] = i
        nfreq[k] = c
        i += 1
        e = _line_end(buf, i, n)                      # SMILES line
        if e >= n or not _two_fields(buf, i, e, spans, k, 2):
            return -1
        i = e + 1
        e = _line_end(buf, i, n)                      # InChI line (the file may end here)
        if not _two_fields(buf, i, e, spans, k, 6):
            return -1
    return 0


_INFO_KEYS = ("gdb_index",) + PROPERTIES + ("n_frequencies", "frequencies", "linear",
                                            "smiles_gdb", "smiles_relaxed", "inchi_gdb",
                                            "inchi_relaxed")


def _parse_compiled(blobs: Sequence[bytes]):
    """The whole batch through :func:`_scan_files`; None when it cannot take it."""
    m = len(blobs)
    lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=m)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    data = b"".join(blobs)
    buf = np.frombuffer(data, dtype=np.uint8)
    ns = np.empty(m, dtype=np.int64)
    if _count_atoms(buf, starts, ends, ns) != 0:
        return None
    n_total = int(ns.sum())
    gdb = np.empty(m, dtype=np.int64)
    props = np.empty((m, 15))
    numbers = np.empty(n_total, dtype=np.int64)
    xyz = np.empty((n_total, 3))
    q = np.empty(n_total)
    nfreq = np.empty(m, dtype=np.int64)
    spans = np.empty((m, 10), dtype=np.int64)
    if _scan_files(buf, starts, ends, ns, _ZLUT, _POW10, gdb, props, numbers, xyz, q, nfreq,
                   spans) != 0:
        return None
    ok = (ns < 2) | (nfreq == 3 * ns - 6) | (nfreq == 3 * ns - 5)
    if not ok.all():
        raise NotParsed
    # ASCII (the whole release): byte offsets are character offsets, so decode the batch once
    text = data.decode("ascii") if data.isascii() else None
    out = []
    props_l, gdb_l, ns_l, nf_l, sp = props.tolist(), gdb.tolist(), ns.tolist(), nfreq.tolist(), \
        spans.tolist()
    a0 = 0
    for k in range(m):
        n, nf = ns_l[k], nf_l[k]
        f0, f1, s0, s1, s2, s3, i0, i1, i2, i3 = sp[k]
        if text is not None:
            freq = " ".join(text[f0:f1].split())
            strings = (text[s0:s1], text[s2:s3], text[i0:i1], text[i2:i3])
        else:
            try:
                freq = " ".join(data[f0:f1].decode("ascii").split())
                strings = tuple(data[x:y].decode("utf-8") for x, y in
                                ((s0, s1), (s2, s3), (i0, i1), (i2, i3)))
            except UnicodeDecodeError:
                raise NotParsed from None
        if "*^" in freq:
            freq = freq.replace("*^", "e")
        info = dict(zip(_INFO_KEYS, (gdb_l[k], *props_l[k], nf, freq,
                                     nf == 3 * n - 5 and n > 2, *strings)))
        out.append({"numbers": numbers[a0:a0 + n], "positions": xyz[a0:a0 + n],
                    "charges": q[a0:a0 + n], "info": info})
        a0 += n
    return out
