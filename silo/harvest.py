"""The embedded default corpus: license-labelled text read from the machine itself.

No network, no download: every machine that runs SILO has some. Two streams:

* **Python distributions** (`importlib.metadata`): each `.py` file listed in a
  distribution's RECORD (docstrings included), verbatim, and its README / long
  description. `source = "pypi:<normalized name>"`, `doc_id = "pypi:<name>/<path>"`
  (`pypi:<name>/README`). License: `License-Expression`, else the `License` field as
  found (it may be a whole license text), plus the trove `License ::` classifiers; owner:
  Maintainer, Author, or their e-mail fields. A name installed twice: the first on
  `sys.path` wins. SILO's own distribution (`silo-lm`) is left out: the corpus is text
  that no one here wrote.
* **System documentation** (Debian layout): English manual pages (`man_root/man[1-9]*/`,
  not the translations in `man_root/<lang>/`), rendered to plain text with groff (a small
  roff stripper where groff is missing), and READMEs / FAQs / `*.txt` / `*.md` / `*.rst`
  under `doc_root/<package>/` (changelogs and copyright files are not documents). Each
  file is mapped to the Debian package that owns it (`dpkg_info/*.list`);
  `source = "deb:<package>"` (`deb:unknown` when no package owns it),
  `doc_id = "deb:<package>:<path>"`. License: the first line of `License:` in the
  `Files: *` paragraph of that package's machine-readable (DEP-5) copyright file (the
  header's `License:` if there is no `Files: *`); "" — unknown, hence restricted — when
  the file is missing, free text, or not valid deb822. python-debian (`debian.copyright`)
  reads the file: paragraphs, continuation lines, comments, and whether it is DEP-5 at
  all (a `Format:` field in the first paragraph); which paragraph and line count is
  ours. Owner: `Upstream-Contact`, else the holder on the first `Copyright:` line of
  `Files: *`.

Records carry the license *as found*; :func:`silo.licenses.classify_license` turns it into
a tier when the corpus is written. Mostly permissive code for the LM, mostly restricted
English prose for the datastore — SILO's setting in miniature.

Order is fixed (distributions by name, files by path), so two harvests of one machine
are identical. Without a byte limit the Python stream comes first, then the system one;
with `limit_bytes` the two are merged so that each has yielded about as many bytes as
the other, so even a small harvest has both kinds of text, and iteration stops right
after the record that reaches the limit. Everything streams: nothing is held but the
current file (and a few manual pages being rendered ahead, in parallel).

Text handling: Python files, READMEs and package docs must be UTF-8 (anything else is
skipped as binary); manual pages go through groff's `preconv`, which reads UTF-8 and
falls back to Latin-1, and the pure-Python fallback does the same. Nothing else is
normalized: code keeps its whitespace exactly. Files that are empty, larger than
`max_file_bytes` (after decompression), unreadable, symbolic links (and `.so` manual
page links: the page they point to is harvested itself) are skipped and counted in
:class:`HarvestStats`.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import importlib.metadata as md
import io
import logging
import lzma
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from debian import copyright as dep5

from silo.corpus import CorpusWriter
from silo.progress import bar as progress_bar

# python-debian logs a warning for each deviation it tolerates ("Fixing Format URL",
# "format not known" for an old DEP-5 draft): advice to the package's maintainer, printed
# on stderr when nothing configured logging. A harvest reads hundreds of copyright files
# as they are; python-debian's errors still show.
logging.getLogger(dep5.__name__).setLevel(logging.ERROR)

MAX_FILE_BYTES = 1 << 20
RENDER_TIMEOUT_S = 30.0
SELF_DISTRIBUTION = "silo-lm"

_DOC_NAME = re.compile(r"^(readme|faq)([._-].*)?$|^.+\.(txt|md|markdown|rst)$", re.I)
_MAN_NAME = re.compile(r"^.+\.[1-9][a-z0-9_+-]*$", re.I)
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|.\x08")  # SGR sequences, overstrike (bold/underline)
_YEARS = re.compile(r"^(copyright\b\s*)?((\(c\)|©)\s*)?([\d\s,?/–-]+\b)?\s*(by\s+)?", re.I)


@dataclass
class HarvestStats:
    """Counters, updated as the harvest is iterated (pass one in to read them)."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the yielded texts
    python_documents: int = 0
    python_bytes: int = 0
    system_documents: int = 0
    system_bytes: int = 0
    skipped_binary: int = 0  # not UTF-8 (or NUL bytes, or a broken compressed file)
    skipped_large: int = 0  # larger than max_file_bytes
    skipped_empty: int = 0  # empty or whitespace only (also a page that renders to nothing)
    skipped_link: int = 0  # symbolic links and `.so` manual page links: the target is harvested
    skipped_error: int = 0  # unreadable, missing (listed but not there), render failed or timed out


_SKIP_FIELDS = {"binary": "skipped_binary", "large": "skipped_large", "empty": "skipped_empty",
                "link": "skipped_link", "error": "skipped_error"}


def _skip(stats: HarvestStats, reason: str) -> None:
    field = _SKIP_FIELDS[reason]
    setattr(stats, field, getattr(stats, field) + 1)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _check_text(text: str, max_file_bytes: int) -> str | None:
    """Why a decoded text is not a document (None when it is one)."""
    if "\x00" in text:
        return "binary"
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates (e.g. from the e-mail parser): not valid text
        return "binary"
    if n > max_file_bytes:
        return "large"
    if not text.strip():
        return "empty"
    return None


def _decode(data: bytes, max_file_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, skip reason) for the bytes of a file that must be UTF-8."""
    if len(data) > max_file_bytes:
        return None, "large"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "binary"
    reason = _check_text(text, max_file_bytes)
    return (None, reason) if reason else (text, None)


def _read(path: Path, max_file_bytes: int) -> bytes:
    """A file's bytes, decompressed by suffix; at most max_file_bytes + 1 (enough to say 'large')."""
    opener = _COMPRESSED.get(path.suffix)
    if opener is None:
        with open(path, "rb") as f:
            return f.read(max_file_bytes + 1)
    with opener(path, "rb") as f:  # bounded read: a decompression bomb costs nothing
        return f.read(max_file_bytes + 1)


_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, ValueError)  # BadGzipFile is an OSError


# ---------------------------------------------------------------------------- Python


def _dist_license(meta) -> tuple[str, list[str]]:
    license_ = (meta.get("License-Expression") or meta.get("License") or "").strip()
    classifiers = [c.strip() for c in (meta.get_all("Classifier") or []) if c.strip().startswith("License ::")]
    return license_, classifiers


def _dist_owner(meta) -> str | None:
    for key in ("Maintainer", "Author", "Maintainer-email", "Author-email"):
        value = (meta.get(key) or "").strip()
        if value and value.upper() not in ("UNKNOWN", "NONE"):
            return value
    return None


def _dist_readme(meta) -> str:
    body = meta.get_payload() if hasattr(meta, "get_payload") else None
    text = body if isinstance(body, str) and body.strip() else (meta.get("Description") or "")
    return "" if text.strip().upper() in ("UNKNOWN", "NONE") else text


def _named(distributions: Iterable | None) -> list[tuple[str, object, object]]:
    """(normalized name, distribution, metadata), sorted by name; first of a name wins."""
    out, seen = [], set()
    for dist in md.distributions() if distributions is None else distributions:
        try:
            meta = dist.metadata
            name = _norm((meta.get("Name") or "").strip()) if meta is not None else ""
        except (OSError, TypeError, ValueError):  # a broken .dist-info / .egg-info
            continue
        if name and name not in seen and name != SELF_DISTRIBUTION:
            seen.add(name)
            out.append((name, dist, meta))
    return sorted(out, key=lambda t: t[0])


def iter_python(distributions: Iterable | None, stats: HarvestStats,
                max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[dict]:
    """One record per `.py` file of each distribution, plus one for its README."""
    for name, dist, meta in _named(distributions):
        license_, classifiers = _dist_license(meta)
        labels = {"source": f"pypi:{name}", "license": license_, "owner": _dist_owner(meta)}

        def record(doc_id: str, text: str, labels=labels, classifiers=classifiers) -> dict:
            return {"doc_id": doc_id, "text": text, **labels, "license_classifiers": list(classifiers)}

        readme = _dist_readme(meta)
        if readme:
            reason = _check_text(readme, max_file_bytes)
            if reason:
                _skip(stats, reason)
            else:
                yield record(f"pypi:{name}/README", readme)
        try:
            files = dist.files or []
        except (OSError, ValueError):
            files = []
        for f in sorted({str(f) for f in files if str(f).endswith(".py")}):
            if os.path.basename(f).startswith("__editable__"):  # generated by pip for editable installs
                continue
            try:
                data = _read(Path(dist.locate_file(f)), max_file_bytes)
            except _READ_ERRORS:
                _skip(stats, "error")
                continue
            text, reason = _decode(data, max_file_bytes)
            if reason:
                _skip(stats, reason)
            else:
                yield record(f"pypi:{name}/{f}", text)


# ---------------------------------------------------------------------------- Debian


def package_owners(dpkg_info: str | os.PathLike) -> dict[str, str]:
    """Path -> owning package, from dpkg's `<package>[:<arch>].list` files (first list wins)."""
    owners: dict[str, str] = {}
    info = Path(dpkg_info)
    if not info.is_dir():
        return owners
    for lst in sorted(info.glob("*.list")):
        pkg = lst.name[: -len(".list")].split(":")[0]
        try:
            with open(lst, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    path = line.rstrip("\n")
                    if path:
                        owners.setdefault(path, pkg)
        except OSError:
            continue
    return owners


def _first_line(value: str | None) -> str:
    return next((line.strip() for line in (value or "").splitlines() if line.strip()), "")


def _field(paragraph: dep5.Header | dep5.FilesParagraph, name: str) -> str:
    """First line of a field, read raw: python-debian's typed `license` rejects a License
    continued with a tab (legal deb822) and an empty first line, where we want the line."""
    try:
        return _first_line(paragraph[name])
    except KeyError:
        return ""


def _holder(copyright_line: str) -> str:
    """'2001-2024 Jane Roe <j@x.org>' -> 'Jane Roe <j@x.org>' (the years and '(c)' dropped)."""
    holder = _YEARS.sub("", copyright_line, count=1).strip(" ,")
    return holder or copyright_line


def parse_copyright(text: str) -> tuple[str, str | None]:
    """(license, owner) from a Debian machine-readable (DEP-5) copyright file.

    license: first line of `License:` in the `Files: *` paragraph (else the header's),
    "" when the file is not machine-readable. owner: `Upstream-Contact`, else the holder
    of the first `Copyright:` line of `Files: *`; None when neither is there.
    """
    try:
        # strict=False: real files break rules that do not matter here (a Files paragraph
        # without Copyright, a repeated Comment); strict, 13 of 480 on a Debian 12 fail.
        parsed = dep5.Copyright(io.StringIO(text.lstrip("\ufeff")), strict=False)
    except (dep5.Error, ValueError):  # no Format header (free text), not deb822 at all, or
        return "", None  # a repeated header field (rejected even when not strict): unknown
    owner = next(iter(parsed.header.upstream_contact or ()), None)
    for paragraph in parsed.all_files_paragraphs():
        if "*" in paragraph.files:
            holder = _field(paragraph, "Copyright")
            return _field(paragraph, "License"), owner or (_holder(holder) if holder else None)
    return _field(parsed.header, "License"), owner


_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?(\d|\(\d\d|\[\d+\])"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string interpolation (unknown here)
    (re.compile(r"\\[hvwlLkoxbDNXYZ]'[^']*'"), ""),  # motions, widths, drawing
    (re.compile(r"\\[&|^%c:,/]|\\[dur]"), ""),  # zero-width, break points, italic corrections
    (re.compile(r"\\\((em|en|hy|mi)|\\\[(em|en|hy|mi)\]"), lambda m: "\u2014" if "em" in m.group() else "-"),
    (re.compile(r"\\\((aq|cq|oq)|\\\[(aq|cq|oq)\]"), "'"),
    (re.compile(r"\\\((dq|lq|rq)|\\\[(dq|lq|rq)\]"), '"'),
    (re.compile(r"\\\((bu)|\\\[bu\]"), "\u2022"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[-~ 0]"), lambda m: "-" if m.group() == "\\-" else " "),
    (re.compile(r"\\[e\\]"), "\\\\"),
]
_ALTERNATING = {".BR", ".BI", ".IB", ".IR", ".RB", ".RI"}
_TEXT_MACROS = {".SH", ".SS", ".B", ".I", ".SM", ".SB", ".UR", ".MT", ".Nm", ".Nd", ".Sh", ".Ss"}
_BREAK_MACROS = {".PP", ".LP", ".P", ".sp", ".br", ".TP", ".IP", ".SH", ".SS", ".Sh", ".Ss", ".Pp"}


def _roff_args(rest: str) -> list[str]:
    return [a[1:-1] if len(a) > 1 and a.startswith('"') and a.endswith('"') else a
            for a in re.findall(r'"[^"]*"|\S+', rest)]


def strip_roff(source: str) -> str:
    """A crude roff -> text conversion (for machines without groff): macros and escapes removed."""
    lines: list[str] = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"', "\\\"")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line.partition(" ")
            name = "." + name[1:]
            if name in _BREAK_MACROS and (not lines or lines[-1]):
                lines.append("")
            args = _roff_args(rest)
            if name in _ALTERNATING:
                lines.append("".join(args))
            elif name == ".IP" and args:  # .IP tag indent
                lines.append(args[0])
            elif name in _TEXT_MACROS and name != ".TP" and args:  # .TP's argument is an indent
                lines.append(" ".join(args))
            continue
        lines.append(line)
    text = "\n".join(lines)
    for pattern, repl in _ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _is_so_link(data: bytes) -> bool:
    for line in data.splitlines():
        line = line.strip()
        if not line or line.startswith((b".\\\"", b"'\\\"")):
            continue
        return line.startswith(b".so ")
    return False


def _groff_command(data: bytes) -> list[str]:
    cmd = ["groff", "-k", "-t", "-man", "-Tutf8", "-P-cbou", "-rLL=78n", "-rHY=0"]
    hint = re.match(rb"^['.]\\\"\s*([egprtv]+)\s*$", data[:80].split(b"\n", 1)[0])  # '\" te: preprocessors
    if hint:
        cmd += [{"r": "-R"}.get(c, "-" + c) for c in sorted(set(hint.group(1).decode()) - {"t"})]
    return cmd


def render_man(data: bytes, *, groff: bool | None = None, timeout: float = RENDER_TIMEOUT_S) -> str | None:
    """A roff manual page as plain text; None for a `.so` link or when rendering failed.

    groff (with `preconv`: UTF-8, else Latin-1; tbl; no hyphenation, ragged right, 78
    columns, no bold/underline) when it is installed and `groff` is not False; the
    pure-Python :func:`strip_roff` otherwise.
    """
    if _is_so_link(data):
        return None
    if groff is None:
        groff = shutil.which("groff") is not None
    if groff:
        env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"}
        try:
            proc = subprocess.run(_groff_command(data), input=b".ad l\n" + data,  # ragged right
                                  capture_output=True, timeout=timeout, env=env)
        except (subprocess.TimeoutExpired, OSError):
            return None
        if proc.returncode != 0:
            return None
        return _CONTROL.sub("", proc.stdout.decode("utf-8", errors="replace"))
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError:
        source = data.decode("latin-1")
    return strip_roff(source)


def _walk(root: Path, stats: HarvestStats) -> Iterator[Path]:
    """Regular files under root, sorted by path, symbolic links skipped (and counted)."""
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: symlinked dirs are not entered
        stats.skipped_link += sum(os.path.islink(os.path.join(dirpath, d)) for d in dirnames)
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_symlink():
                stats.skipped_link += 1
            elif path.is_file():
                yield path


def _man_pages(man_root: Path, stats: HarvestStats) -> Iterator[Path]:
    if not man_root.is_dir():
        return
    for section in sorted(man_root.glob("man[1-9]*")):
        if section.is_dir() and not section.is_symlink():
            for path in _walk(section, stats):
                if _MAN_NAME.match(path.name[: -len(path.suffix)] if path.suffix in _COMPRESSED else path.name):
                    yield path


def _doc_files(doc_root: Path, stats: HarvestStats) -> Iterator[Path]:
    if not doc_root.is_dir():
        return
    for path in _walk(doc_root, stats):
        name = path.name[: -len(path.suffix)] if path.suffix in _COMPRESSED else path.name
        if not name.lower().startswith(("copyright", "changelog")) and _DOC_NAME.match(name):
            yield path


def iter_system(man_root: str | os.PathLike, doc_root: str | os.PathLike, dpkg_info: str | os.PathLike,
                stats: HarvestStats, max_file_bytes: int = MAX_FILE_BYTES,
                workers: int | None = None) -> Iterator[dict]:
    """Manual pages (rendered `workers` at a time, in order), then package docs."""
    man_root, doc_root = Path(os.path.abspath(man_root)), Path(os.path.abspath(doc_root))
    owners = package_owners(dpkg_info)
    licenses: dict[str, tuple[str, str | None]] = {}

    def record(path: Path, text: str) -> dict:
        pkg = owners.get(str(path)) or owners.get(os.path.realpath(path)) or "unknown"
        if pkg not in licenses:
            try:
                cp = doc_root / pkg / "copyright"
                licenses[pkg] = parse_copyright(cp.read_text(encoding="utf-8", errors="replace")) \
                    if pkg != "unknown" and cp.is_file() else ("", None)
            except OSError:
                licenses[pkg] = ("", None)
        license_, owner = licenses[pkg]
        return {"doc_id": f"deb:{pkg}:{path}", "text": text, "source": f"deb:{pkg}", "license": license_,
                "license_classifiers": [], "owner": owner}

    def render(path: Path) -> tuple[str | None, str | None]:  # in a worker thread: no shared state
        try:
            data = _read(path, max_file_bytes)
        except _READ_ERRORS:
            return None, "error"
        if len(data) > max_file_bytes:
            return None, "large"
        if b"\x00" in data:
            return None, "binary"
        if _is_so_link(data):
            return None, "link"
        text = render_man(data)
        if text is None:
            return None, "error"
        reason = _check_text(text, max_file_bytes)
        return (None, reason) if reason else (text, None)

    workers = workers or max(4, min(8, os.cpu_count() or 4))  # groff pipelines wait on I/O too
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="man")
    try:
        ahead: collections.deque[tuple[Path, Future]] = collections.deque()
        pages = _man_pages(man_root, stats)
        while True:  # a sliding window: at most 4 x workers pages rendered ahead of the consumer
            while len(ahead) < 4 * workers and (path := next(pages, None)) is not None:
                ahead.append((path, pool.submit(render, path)))
            if not ahead:
                break
            path, future = ahead.popleft()
            text, reason = future.result()
            if reason:
                _skip(stats, reason)
            else:
                yield record(path, text)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for path in _doc_files(doc_root, stats):
        try:
            data = _read(path, max_file_bytes)
        except _READ_ERRORS:
            _skip(stats, "error")
            continue
        text, reason = _decode(data, max_file_bytes)
        if reason:
            _skip(stats, reason)
        else:
            yield record(path, text)


# ---------------------------------------------------------------------------- both


def iter_harvest(limit_bytes: int | None = None, *, python: bool = True, system: bool = True,
                 man_root: str = "/usr/share/man", doc_root: str = "/usr/share/doc",
                 dpkg_info: str = "/var/lib/dpkg/info", distributions=None, stats: HarvestStats | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES) -> Iterator[dict]:
    """Records `{doc_id, text, source, license, license_classifiers, owner}` from this machine.

    Stops right after the record whose text brings the total UTF-8 bytes to `limit_bytes`
    (None: everything). With a limit, the Python and system streams are merged so that
    each has yielded about as many bytes as the other. `stats` is updated as records are
    yielded and files skipped.
    """
    stats = stats if stats is not None else HarvestStats()
    if limit_bytes is not None and limit_bytes <= 0:
        return
    streams: dict[str, Iterator[dict]] = {}
    if python:
        streams["python"] = iter_python(distributions, stats, max_file_bytes)
    if system:
        streams["system"] = iter_system(man_root, doc_root, dpkg_info, stats, max_file_bytes)
    done = 0
    sent = dict.fromkeys(streams, 0)
    try:
        while streams:
            # no limit: one stream after the other; a limit: the stream that has given fewer bytes
            kind = next(iter(streams)) if limit_bytes is None else min(streams, key=lambda k: sent[k])
            rec = next(streams[kind], None)
            if rec is None:
                del streams[kind]
                continue
            n = len(rec["text"].encode("utf-8"))
            sent[kind] += n
            done += n
            stats.documents += 1
            stats.bytes += n
            setattr(stats, f"{kind}_documents", getattr(stats, f"{kind}_documents") + 1)
            setattr(stats, f"{kind}_bytes", getattr(stats, f"{kind}_bytes") + n)
            yield rec
            if limit_bytes is not None and done >= limit_bytes:
                return
    finally:
        for stream in streams.values():
            stream.close()  # stops the man page renderers at once


def harvest_corpus(out: str | os.PathLike, limit_bytes: int | None = None, *, python: bool = True,
                   system: bool = True, overwrite: bool = False, progress: bool = True):
    """`silo corpus harvest` (and the demo's first stage): this machine's text into a corpus
    folder, written atomically; returns the corpus writer's statistics."""
    with CorpusWriter(out, overwrite=overwrite) as writer:
        bar = progress_bar(desc="harvest", unit="B", unit_scale=True, total=limit_bytes, progress=progress)
        for record in iter_harvest(limit_bytes, python=python, system=system):
            writer.add(record)
            bar.update(len(record["text"].encode("utf-8", "surrogatepass")))
        bar.close()
    return writer.stats
