"""The embedded default corpus: fake distributions and a fake Debian tree, then this machine."""

from __future__ import annotations

import gzip
import importlib.metadata as md
import logging
import os
import shutil

import pytest

from silo.corpus import iter_documents, write_corpus
from silo.harvest import HarvestStats, iter_harvest, parse_copyright, render_man, strip_roff

MAN = """.TH FROB 1 "2024" "frob 1.0" "User Commands"
.SH NAME
frob \\- frobnicate the widgets
.SH DESCRIPTION
.B frob
reads widgets and \\fIfrobnicates\\fR them carefully, caf\u00e9 style.
.TP
.BR \\-v ", " \\-\\-verbose
say more
""".encode()

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: frob
Upstream-Contact: Jane Roe <jane@example.org>

Files: debian/*
Copyright: 2021 Debian
License: MIT

Files: *
Copyright: 2020 Jane Roe
License: GPL-2+
 This program is free software.
"""

HAS_GROFF = shutil.which("groff") is not None


def _dist(site, name, metadata, files):
    """A real installed-looking distribution: <site>/<name>-1.0.dist-info + files."""
    for rel, content in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(metadata)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in [*files, "missing/gone.py"])
                                 + f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return md.PathDistribution(info)


@pytest.fixture
def fake_dists(tmp_path):
    site = tmp_path / "site"
    frob = _dist(site, "frob_pkg", (
        "Metadata-Version: 2.4\nName: Frob_Pkg\nVersion: 1.0\nLicense-Expression: MIT OR Apache-2.0\n"
        "License: ignored when there is an expression\nAuthor: Jane Roe\n"
        "Classifier: Programming Language :: Python\nClassifier: License :: OSI Approved :: MIT License\n"
        "\nFrobPkg\n=======\n\nFrobs things.\n"), {
        "frob_pkg/__init__.py": "",
        "frob_pkg/core.py": 'def frob(x):\n\t"""Frobnicate x."""  \n    return x * 2\n',
        "frob_pkg/blank.py": "  \n\n",
        "frob_pkg/blob.py": b"\xff\xfe\x00binary",
        "frob_pkg/big.py": "x = 1\n" * 200_000,
        "frob_pkg/data.json": "{}",
        "__editable___frob_finder.py": "# generated\n",
    })
    gpl = _dist(site / "other", "gplthing", (
        "Metadata-Version: 2.1\nName: gplthing\nVersion: 1.0\n"
        "License: GNU GENERAL PUBLIC LICENSE\n        Version 3, 29 June 2007\n"
        "Maintainer-email: Max <max@example.org>\nDescription: UNKNOWN\n"
        "Classifier: License :: OSI Approved :: GNU General Public License v3 (GPLv3)\n"), {
        "gplthing.py": "import os\n",
    })
    # the same name again (another sys.path entry): the first one wins
    dup = _dist(site / "dup", "frob-pkg", "Metadata-Version: 2.1\nName: frob-pkg\nVersion: 0.1\nLicense: GPL\n",
                {"frob_pkg/core.py": "OLD = 1\n"})
    own = _dist(site / "own", "silo_lm", "Metadata-Version: 2.1\nName: silo-lm\nVersion: 0.1\n",
                {"silo/x.py": "mine = 1\n"})
    return [frob, gpl, dup, own]


def test_python_distribution_records(fake_dists):
    stats = HarvestStats()
    recs = list(iter_harvest(python=True, system=False, distributions=fake_dists, stats=stats))
    assert [r["doc_id"] for r in recs] == ["pypi:frob-pkg/README", "pypi:frob-pkg/frob_pkg/core.py",
                                          "pypi:gplthing/gplthing.py"]
    frob, core, gpl = recs
    assert frob["source"] == core["source"] == "pypi:frob-pkg"
    assert frob["license"] == core["license"] == "MIT OR Apache-2.0"
    assert core["license_classifiers"] == ["License :: OSI Approved :: MIT License"]
    assert core["owner"] == "Jane Roe" and frob["text"] == "FrobPkg\n=======\n\nFrobs things.\n"
    assert core["text"] == 'def frob(x):\n\t"""Frobnicate x."""  \n    return x * 2\n'  # exactly as on disk
    assert gpl["license"] == "GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007"  # multi-line, as found
    assert gpl["license_classifiers"] == ["License :: OSI Approved :: GNU General Public License v3 (GPLv3)"]
    assert gpl["owner"] == "Max <max@example.org>"
    assert set(recs[0]) == {"doc_id", "text", "source", "license", "license_classifiers", "owner"}
    # __init__ + blank empty, blob binary, big large, 2 listed-but-missing; .json, __editable__ ignored
    assert (stats.skipped_empty, stats.skipped_binary, stats.skipped_large, stats.skipped_error) == (2, 1, 1, 2)
    assert stats.documents == stats.python_documents == 3 and stats.system_documents == 0
    assert stats.bytes == stats.python_bytes == sum(len(r["text"].encode()) for r in recs)


@pytest.fixture
def fake_debian(tmp_path):
    man = tmp_path / "man" / "man1"
    man.mkdir(parents=True)
    (man / "frob.1.gz").write_bytes(gzip.compress(MAN))
    (man / "frob-link.1.gz").write_bytes(gzip.compress(b'.\\" a link\n.so man1/frob.1\n'))
    os.symlink("frob.1.gz", man / "frobalias.1.gz")
    (man / "plain.1").write_bytes(b".TH PLAIN 1\n.SH NAME\nplain \\- an uncompressed page\n")
    (tmp_path / "man" / "de" / "man1").mkdir(parents=True)
    (tmp_path / "man" / "de" / "man1" / "frob.1.gz").write_bytes(gzip.compress(MAN))
    doc = tmp_path / "doc"
    (doc / "frob").mkdir(parents=True)
    (doc / "frob" / "copyright").write_text(DEP5)
    (doc / "frob" / "README.md").write_text("Frob reads widgets.\n")
    (doc / "frob" / "FAQ.gz").write_bytes(gzip.compress(b"Why frob? Because.\n"))
    (doc / "frob" / "changelog.Debian.gz").write_bytes(gzip.compress(b"frob (1.0) unstable"))
    (doc / "frob" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (doc / "frob" / "logo.png").write_bytes(b"\x89PNG")
    os.symlink("frob", doc / "frob-common")  # a symlinked doc dir: its files are harvested once
    (doc / "other").mkdir()
    (doc / "other" / "copyright").write_text("This is free software, see the GPL.\n")
    (doc / "other" / "README").write_text("Other docs.\n")
    (doc / "orphan").mkdir()
    (doc / "orphan" / "notes.txt").write_text("Nobody owns me.\n")
    info = tmp_path / "info"
    info.mkdir()
    (info / "frob.list").write_text("/.\n" + "".join(f"{p}\n" for p in (
        man / "frob.1.gz", man / "plain.1", doc / "frob" / "README.md", doc / "frob" / "FAQ.gz")))
    (info / "other:amd64.list").write_text(f"{doc / 'other' / 'README'}\n")
    return tmp_path


def _system(t, **kw):
    return list(iter_harvest(python=False, man_root=str(t / "man"), doc_root=str(t / "doc"),
                             dpkg_info=str(t / "info"), **kw))


def test_system_docs_records(fake_debian):
    t = fake_debian
    stats = HarvestStats()
    recs = _system(t, stats=stats)
    assert [r["doc_id"] for r in recs] == [
        f"deb:frob:{t}/man/man1/frob.1.gz", f"deb:frob:{t}/man/man1/plain.1",  # man pages first
        f"deb:frob:{t}/doc/frob/FAQ.gz", f"deb:frob:{t}/doc/frob/README.md",
        f"deb:unknown:{t}/doc/orphan/notes.txt", f"deb:other:{t}/doc/other/README"]
    page = recs[0]
    assert "frob - frobnicate the widgets" in page["text"] and "frobnicates them carefully" in page["text"]
    assert "-v, --verbose" in page["text"]
    assert not any(m in page["text"] for m in (".SH", ".TH", ".B", "\\f", "\\-", "\x08", "\x1b"))
    if HAS_GROFF:
        assert "café" in page["text"]  # UTF-8 page read as UTF-8 (preconv), not as Latin-1
    for r in recs[:4]:
        assert (r["source"], r["license"], r["owner"]) == ("deb:frob", "GPL-2+", "Jane Roe <jane@example.org>")
        assert r["license_classifiers"] == []
    assert recs[2]["text"] == "Why frob? Because.\n"  # .gz docs decompressed
    assert (recs[4]["source"], recs[4]["license"], recs[4]["owner"]) == ("deb:unknown", "", None)
    assert (recs[5]["source"], recs[5]["license"], recs[5]["owner"]) == ("deb:other", "", None)  # free text
    # .so link, symlinked page, symlinked doc dir; latin-1 text
    assert (stats.skipped_link, stats.skipped_binary) == (3, 1)
    assert stats.system_documents == 6 and stats.python_documents == 0


def test_parse_copyright():
    assert parse_copyright(DEP5) == ("GPL-2+", "Jane Roe <jane@example.org>")
    holder_only = DEP5.replace("Upstream-Contact: Jane Roe <jane@example.org>\n", "").replace(
        "Format: https:", "Format: http:").replace("2020 Jane Roe", "Copyright (c) 2019-2020, Jane Roe\n 2021 Bob")
    assert parse_copyright(holder_only) == ("GPL-2+", "Jane Roe")
    no_star = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nLicense: BSD-3-Clause\n\n"
               "Files: src/*\nCopyright: 2020 X\nLicense: MIT\n")
    assert parse_copyright(no_star) == ("BSD-3-Clause", None)  # no `Files: *`: the header's License
    assert parse_copyright("Some free text\n\nLicense: MIT\n") == ("", None)
    assert parse_copyright("") == ("", None)


FORMAT = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
STAR = "Files: *\nCopyright: 2020 Jane Roe\nLicense: MIT\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\ufeff" + FORMAT + "\n" + STAR, ("MIT", "Jane Roe")),  # byte-order mark
        ((FORMAT + "\n" + STAR).replace("\n", "\r\n"), ("MIT", "Jane Roe")),
        ("Upstream-Name: frob\n" + FORMAT + "\n" + STAR, ("MIT", "Jane Roe")),  # Format not first
        (FORMAT.replace("https", "http").replace("1.0/", "1.0") + "\n" + STAR, ("MIT", "Jane Roe")),
        ("Format-Specification: http://svn.debian.org/wsvn/dep/web/deps/dep5.mdwn?op=file&rev=135\n"
         "\n" + STAR, ("MIT", "Jane Roe")),  # a DEP-5 draft
        ("# comment\n" + FORMAT + "\n# comment\n" + STAR, ("MIT", "Jane Roe")),
        (FORMAT + "\nFiles: *\nCopyright:\n 2019 Jane Roe\n 2020 Bob\nLicense:\n GPL-2+\n",
         ("GPL-2+", "Jane Roe")),  # values starting on the next line
        (FORMAT + "\nFiles: *\nCopyright: 2020 Jane Roe\nLicense: MIT\n\tPermission is hereby"
         " granted\n", ("MIT", "Jane Roe")),  # text continued with a tab: legal deb822
        (FORMAT + "\nFiles: *\nLicense: MIT\n", ("MIT", None)),  # no Copyright: still read
        (FORMAT + "\nFiles: debian/*\nCopyright: 2021 D\nLicense: GPL-2+\n\n"
         "Files: src/* *\nCopyright: 2019 Q\nLicense: BSD-3-clause\n", ("BSD-3-clause", "Q")),
        ("Files: *\nCopyright: 2020 Jane Roe\nLicense: MIT\n", ("", None)),  # no Format header
        (FORMAT + "\nFiles: *\nthis line is not a field\nLicense: MIT\n", ("", None)),  # not deb822
    ],
)
def test_parse_copyright_real_world_layouts(text, expected):
    assert parse_copyright(text) == expected


def test_parse_copyright_keeps_python_debian_quiet(caplog):
    """Tolerated deviations (an http:// Format URL, an old DEP-5 draft) are not news."""
    with caplog.at_level(logging.DEBUG):
        assert parse_copyright(FORMAT.replace("https", "http") + "\n" + STAR)[0] == "MIT"
        assert parse_copyright("Format: https://dep.debian.net/deps/dep5/\n\n" + STAR)[0] == "MIT"
    assert not [r for r in caplog.records if r.name.startswith("debian") and r.levelno >= logging.WARNING]


def test_render_man_fallback_and_links():
    assert render_man(b".so man1/x.1") is None
    assert render_man(b'.\\" comment\n.so man1/x.1\n', groff=False) is None
    text = render_man(MAN, groff=False)  # the pure-Python roff stripper
    assert "frob - frobnicate the widgets" in text and "frobnicates them carefully" in text
    assert "-v, --verbose" in text and "café" in text and ".B" not in text and "\\f" not in text
    assert "café" in strip_roff(MAN.decode())
    assert "caf\u00e9" in render_man(MAN.decode().encode("latin-1"), groff=False)  # Latin-1 fallback
    if HAS_GROFF:
        assert "frob - frobnicate the widgets" in render_man(MAN, groff=True)


def test_limit_interleaves_both_streams_and_stops(fake_dists, fake_debian):
    t = fake_debian
    kw = {"man_root": str(t / "man"), "doc_root": str(t / "doc"), "dpkg_info": str(t / "info"),
          "distributions": fake_dists}
    assert list(iter_harvest(0, **kw)) == []
    stats = HarvestStats()
    recs = list(iter_harvest(1, stats=stats, **kw))
    assert len(recs) == 1 and stats.documents == 1  # stops right after the record that reaches the limit
    recs = list(iter_harvest(100, **kw))
    assert {r["source"].split(":")[0] for r in recs} == {"pypi", "deb"}
    everything = list(iter_harvest(**kw))  # no limit: all Python, then all system
    kinds = [r["source"].split(":")[0] for r in everything]
    assert kinds == sorted(kinds, key=["pypi", "deb"].index) and len(everything) == 9


def test_this_machine_both_streams_deterministic_and_capped(tmp_path):
    a = list(iter_harvest(200_000))
    b = list(iter_harvest(200_000))
    assert [r["doc_id"] for r in a] == [r["doc_id"] for r in b]
    assert len({r["doc_id"] for r in a}) == len(a)
    sources = {r["source"].split(":")[0] for r in a}
    if not (os.path.isdir("/usr/share/man") and os.path.isdir("/var/lib/dpkg/info")):
        pytest.skip("not a Debian-like machine")
    assert sources == {"pypi", "deb"}
    total = sum(len(r["text"].encode()) for r in a)
    last = len(a[-1]["text"].encode())
    assert 200_000 <= total < 200_000 + last  # stops right after the cap is reached
    write_corpus(a, tmp_path / "c")
    tiers = {d["tier"] for d in iter_documents(tmp_path / "c")}
    assert "restricted" in tiers and tiers & {"pd", "sw", "by"}
