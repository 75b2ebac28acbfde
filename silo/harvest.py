"""The embedded default corpus: license-labelled text read from the machine itself.

No network, no download: every machine that runs SILO has some. Two streams:

* **Python distributions** (`importlib.metadata`): each source file listed in a
  distribution's RECORD (docstrings included) and its README / long description.
  `source = "pypi:<name>"`; license from `License-Expression`, else `License`, plus the
  trove `License ::` classifiers (the corpus writer turns them into a tier).
* **System documentation** (Debian layout): manual pages under `/usr/share/man/man*`,
  rendered to plain text with groff (a small roff stripper where groff is missing), and
  READMEs / text files under `/usr/share/doc/<package>/`. Each file is mapped to the
  Debian package that owns it (`/var/lib/dpkg/info/*.list`); its license is the
  `License:` of the `Files: *` paragraph of that package's machine-readable copyright
  file, and unknown (→ restricted) when the file is not machine-readable.

Mostly permissive code for the LM, mostly restricted English prose for the datastore —
SILO's setting in miniature. Records come out in a fixed order (distributions and files
sorted), so two harvests of one machine are identical; with a byte limit the two
streams alternate, so even a small harvest has both kinds of text. Files that are not
UTF-8, empty or larger than `max_file_bytes` are skipped and counted in `HarvestStats`.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

MAX_FILE_BYTES = 1 << 20
_DEP5 = "format: https://www.debian.org/doc/packaging-manuals/copyright-format/"
_DOC_NAMES = re.compile(r"^(readme|news|faq|authors|thanks|todo|usage|install)([._-].*)?$|.*\.(txt|md|rst)(\.gz)?$", re.I)
_ANSI = re.compile(r"\x1b\[[0-9;]*m|.\x08")


@dataclass
class HarvestStats:
    documents: int = 0
    bytes: int = 0
    skipped_binary: int = 0
    skipped_large: int = 0
    skipped_empty: int = 0


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _decode(data: bytes, stats: HarvestStats, limit: int) -> str | None:
    if len(data) > limit:
        stats.skipped_large += 1
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_binary += 1
        return None
    if "\x00" in text:
        stats.skipped_binary += 1
        return None
    if not text.strip():
        stats.skipped_empty += 1
        return None
    return text


# ---------------------------------------------------------------------------- Python


def _dist_license(meta) -> tuple[str, list[str]]:
    license_ = (meta.get("License-Expression") or meta.get("License") or "").strip()
    classifiers = [c for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    return license_, classifiers


def _dist_owner(meta) -> str | None:
    for key in ("Maintainer", "Author", "Maintainer-email", "Author-email"):
        value = (meta.get(key) or "").strip()
        if value and value.upper() != "UNKNOWN":
            return value
    return None


def iter_python(distributions: Iterable | None, stats: HarvestStats, max_file_bytes: int) -> Iterator[dict]:
    dists = list(md.distributions() if distributions is None else distributions)
    seen = set()
    for dist in sorted(dists, key=lambda d: _norm(d.metadata.get("Name") or "")):
        name = _norm(dist.metadata.get("Name") or "")
        if not name or name in seen:
            continue
        seen.add(name)
        meta = dist.metadata
        license_, classifiers = _dist_license(meta)
        base = {"source": f"pypi:{name}", "license": license_, "license_classifiers": classifiers,
                "owner": _dist_owner(meta)}
        readme = meta.get_payload() if hasattr(meta, "get_payload") else None
        readme = readme or meta.get("Description") or ""
        if readme.strip():
            yield {"doc_id": f"pypi:{name}/README", "text": readme, **base}
        for f in sorted(dist.files or [], key=str):
            if not str(f).endswith(".py"):
                continue
            try:
                data = Path(dist.locate_file(f)).read_bytes()
            except OSError:
                continue
            text = _decode(data, stats, max_file_bytes)
            if text is not None:
                yield {"doc_id": f"pypi:{name}/{f}", "text": text, **base}


# ---------------------------------------------------------------------------- Debian


def _owners(dpkg_info: Path) -> dict[str, str]:
    owner: dict[str, str] = {}
    if not dpkg_info.is_dir():
        return owner
    for lst in sorted(dpkg_info.glob("*.list")):
        pkg = lst.name[: -len(".list")].split(":")[0]
        try:
            for line in lst.read_text(errors="replace").splitlines():
                owner.setdefault(line.strip(), pkg)
        except OSError:
            continue
    return owner


def parse_copyright(text: str) -> tuple[str, str | None]:
    """(license of `Files: *`, owner) from a DEP-5 copyright file; ('', None) otherwise."""
    if not text.lower().startswith(_DEP5[:40]) and _DEP5 not in text.lower()[:200]:
        return "", None
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]

    def fields(p: str) -> dict[str, str]:
        out, key = {}, None
        for line in p.splitlines():
            if line[:1] in (" ", "\t") and key:
                out[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                out[key] = value.strip()
        return out

    header = fields(paragraphs[0])
    owner = header.get("upstream-contact", "").splitlines()[0].strip() if header.get("upstream-contact") else None
    for p in paragraphs[1:]:
        f = fields(p)
        if "*" in f.get("files", "").split():
            lic = f.get("license", "").splitlines()[0].strip() if f.get("license") else ""
            if not owner and f.get("copyright"):
                owner = f["copyright"].splitlines()[0].strip() or None
            return lic, owner
    return "", owner


def render_man(data: bytes) -> str | None:
    """A roff manual page as plain text (groff when available, else a crude stripper)."""
    if data.lstrip().startswith(b".so "):  # a link to another page
        return None
    if shutil.which("groff"):
        try:
            proc = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-P-cbou", "-rHY=0", "-dAD=l"], input=data, capture_output=True,
                                  timeout=30, env={**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"})
            if proc.returncode == 0 and proc.stdout.strip():
                return _ANSI.sub("", proc.stdout.decode("utf-8", errors="replace"))
        except (subprocess.TimeoutExpired, OSError):
            return None
    text = data.decode("utf-8", errors="replace")
    lines = []
    for line in text.splitlines():
        if line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith("."):
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0] in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".TP", ".IP"):
                lines.append(parts[1].replace('"', ""))
            continue
        lines.append(re.sub(r"\\f[BIRP]|\\\(..|\\-|\\&|\\e", lambda m: "-" if m.group() == "\\-" else "", line))
    return "\n".join(lines)


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def iter_system(man_root: Path, doc_root: Path, dpkg_info: Path, stats: HarvestStats,
                max_file_bytes: int) -> Iterator[dict]:
    owners = _owners(dpkg_info)
    licenses: dict[str, tuple[str, str | None]] = {}

    def package_license(pkg: str) -> tuple[str, str | None]:
        if pkg not in licenses:
            cp = doc_root / pkg / "copyright"
            try:
                licenses[pkg] = parse_copyright(cp.read_text(errors="replace")) if cp.is_file() else ("", None)
            except OSError:
                licenses[pkg] = ("", None)
        return licenses[pkg]

    def record(path: Path, text: str) -> dict:
        pkg = owners.get(str(path)) or owners.get(os.path.realpath(path)) or "unknown"
        lic, owner = package_license(pkg) if pkg != "unknown" else ("", None)
        return {"doc_id": f"deb:{pkg}:{path}", "text": text, "source": f"deb:{pkg}", "license": lic,
                "license_classifiers": [], "owner": owner}

    pages = sorted(p for d in sorted(man_root.glob("man[1-9]*")) if d.is_dir() for p in d.iterdir() if p.is_file())

    def render(p: Path) -> str | None:
        try:
            raw = _read_maybe_gz(p)
        except (OSError, EOFError, gzip.BadGzipFile):
            stats.skipped_binary += 1
            return None
        if len(raw) > max_file_bytes:
            stats.skipped_large += 1
            return None
        return render_man(raw)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(pages), 32):  # rendered 4 at a time, yielded in order, lazily
            chunk = pages[start : start + 32]
            for p, text in zip(chunk, pool.map(render, chunk), strict=True):
                if text and text.strip():
                    yield record(p, text)
                elif text is not None:
                    stats.skipped_empty += 1
    for pkg_dir in sorted(d for d in doc_root.iterdir() if d.is_dir()) if doc_root.is_dir() else []:
        for p in sorted(pkg_dir.rglob("*")):
            if not p.is_file() or p.name.startswith(("copyright", "changelog")) or not _DOC_NAMES.match(p.name):
                continue
            try:
                data = _read_maybe_gz(p)
            except (OSError, EOFError, gzip.BadGzipFile):
                stats.skipped_binary += 1
                continue
            text = _decode(data, stats, max_file_bytes)
            if text is not None:
                yield record(p, text)


# ---------------------------------------------------------------------------- both


def iter_harvest(limit_bytes: int | None = None, *, python: bool = True, system: bool = True,
                 man_root: str = "/usr/share/man", doc_root: str = "/usr/share/doc",
                 dpkg_info: str = "/var/lib/dpkg/info", distributions=None, stats: HarvestStats | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[dict]:
    """Records {doc_id, text, source, license, license_classifiers, owner}, up to limit_bytes."""
    stats = stats if stats is not None else HarvestStats()
    streams = []
    if python:
        streams.append(iter_python(distributions, stats, max_file_bytes))
    if system:
        streams.append(iter_system(Path(man_root), Path(doc_root), Path(dpkg_info), stats, max_file_bytes))
    merged = (r for group in zip_longest(*streams) for r in group if r is not None) if limit_bytes else \
        (r for s in streams for r in s)
    for rec in merged:
        stats.documents += 1
        stats.bytes += len(rec["text"].encode("utf-8", "surrogatepass"))
        yield rec
        if limit_bytes is not None and stats.bytes >= limit_bytes:
            return
