"""The embedded default corpus: a fake distribution and a fake Debian tree, then this machine."""

from __future__ import annotations

import gzip
import importlib.metadata as md

import pytest

from silo.corpus import iter_documents, write_corpus
from silo.harvest import HarvestStats, iter_harvest, parse_copyright, render_man

MAN = b""".TH FROB 1 "2024" "frob 1.0" "User Commands"
.SH NAME
frob \\- frobnicate the widgets
.SH DESCRIPTION
.B frob
reads widgets and \\fIfrobnicates\\fR them carefully.
"""

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: frob
Upstream-Contact: Jane Roe <jane@example.org>

Files: *
Copyright: 2020 Jane Roe
License: GPL-2+
 This program is free software.

Files: debian/*
Copyright: 2021 Debian
License: MIT
"""


@pytest.fixture
def fake_dist(tmp_path):
    site = tmp_path / "site"
    pkg = site / "frobpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text('def frob(x):\n    """Frobnicate x."""\n    return x * 2\n')
    (pkg / "blob.py").write_bytes(b"\xff\xfe\x00binary")
    (pkg / "big.py").write_text("x = 1\n" * 200_000)
    info = site / "frobpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.4\nName: FrobPkg\nVersion: 1.0\nLicense-Expression: MIT OR Apache-2.0\n"
        "Author: Jane Roe\nClassifier: License :: OSI Approved :: MIT License\n\nFrobPkg\n=======\n\nFrobs things.\n")
    (info / "RECORD").write_text("frobpkg/__init__.py,,\nfrobpkg/core.py,,\nfrobpkg/blob.py,,\nfrobpkg/big.py,,\n"
                                 "frobpkg-1.0.dist-info/METADATA,,\n")
    return md.PathDistribution(info)


def test_python_distribution_records(fake_dist):
    stats = HarvestStats()
    recs = list(iter_harvest(python=True, system=False, distributions=[fake_dist, fake_dist], stats=stats))
    assert [r["doc_id"] for r in recs] == ["pypi:frobpkg/README", "pypi:frobpkg/frobpkg/core.py"]
    assert all(r["source"] == "pypi:frobpkg" and r["license"] == "MIT OR Apache-2.0" for r in recs)
    assert recs[0]["license_classifiers"] == ["License :: OSI Approved :: MIT License"]
    assert recs[0]["owner"] == "Jane Roe" and "Frobs things." in recs[0]["text"]
    assert recs[1]["text"].startswith("def frob(x):\n    ")  # whitespace kept exactly
    assert (stats.skipped_binary, stats.skipped_large, stats.skipped_empty) == (1, 1, 1)


@pytest.fixture
def fake_debian(tmp_path):
    man = tmp_path / "man" / "man1"
    man.mkdir(parents=True)
    (man / "frob.1.gz").write_bytes(gzip.compress(MAN))
    (man / "link.1.gz").write_bytes(gzip.compress(b".so man1/frob.1\n"))
    (tmp_path / "man" / "de" / "man1").mkdir(parents=True)
    (tmp_path / "man" / "de" / "man1" / "frob.1.gz").write_bytes(gzip.compress(MAN))
    doc = tmp_path / "doc"
    (doc / "frob").mkdir(parents=True)
    (doc / "frob" / "copyright").write_text(DEP5)
    (doc / "frob" / "README.md").write_text("Frob reads widgets.\n")
    (doc / "frob" / "changelog.Debian.gz").write_bytes(gzip.compress(b"frob (1.0) unstable"))
    (doc / "other").mkdir()
    (doc / "other" / "copyright").write_text("This is free software, see the GPL.\n")
    (doc / "other" / "README").write_text("Other docs.\n")
    info = tmp_path / "info"
    info.mkdir()
    (info / "frob.list").write_text(f"{man / 'frob.1.gz'}\n{doc / 'frob' / 'README.md'}\n")
    (info / "other:amd64.list").write_text(f"{doc / 'other' / 'README'}\n")
    return tmp_path


def test_system_docs_records(fake_debian):
    t = fake_debian
    recs = list(iter_harvest(python=False, man_root=str(t / "man"), doc_root=str(t / "doc"),
                             dpkg_info=str(t / "info")))
    by_src = {(r["source"], r["doc_id"].rsplit("/", 1)[-1]): r for r in recs}
    assert set(by_src) == {("deb:frob", "frob.1.gz"), ("deb:frob", "README.md"), ("deb:other", "README")}
    page = by_src[("deb:frob", "frob.1.gz")]
    assert "frobnicate the widgets" in page["text"] and ".SH" not in page["text"] and "\\f" not in page["text"]
    assert page["license"] == "GPL-2+" and page["owner"] == "Jane Roe <jane@example.org>"
    assert by_src[("deb:other", "README")]["license"] == ""  # not machine-readable: unknown


def test_parse_copyright_and_roff_fallback():
    assert parse_copyright(DEP5) == ("GPL-2+", "Jane Roe <jane@example.org>")
    assert parse_copyright("Some free text") == ("", None)
    assert render_man(b".so man1/x.1") is None
    assert "frobnicate" in render_man(MAN)


def test_this_machine_both_streams_deterministic_and_capped(tmp_path):
    a = list(iter_harvest(200_000))
    b = list(iter_harvest(200_000))
    assert [r["doc_id"] for r in a] == [r["doc_id"] for r in b]
    sources = {r["source"].split(":")[0] for r in a}
    assert sources == {"pypi", "deb"}
    total = sum(len(r["text"].encode()) for r in a)
    assert 200_000 <= total < 200_000 + 1_100_000  # stops right after the cap is reached
    write_corpus(a, tmp_path / "c")
    tiers = {d["tier"] for d in iter_documents(tmp_path / "c")}
    assert "restricted" in tiers and tiers & {"pd", "sw", "by"}
