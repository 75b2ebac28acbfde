"""License string -> Open License Corpus tier, table-driven and conservative.

Tiers (Open License Corpus, SILO paper, Min et al. 2023), least to most restrictive:

``pd``
    Public domain: expired copyright, "Public Domain", and public-domain *dedications*
    (CC0-1.0, Unlicense, PDDL-1.0, CC-PDDC, CC-PDM, NIST-PD, SQLite's blessing).
``sw``
    Permissive software licenses: MIT (Expat), MIT-0, X11, BSD (any clause count, also
    4-clause: the advertising clause does not bind a trained model), 0BSD, Apache 1.x/2.0,
    ISC, PSF/Python/CNRI-Python, Zlib, BSL-1.0 (Boost), HPND, NCSA, PostgreSQL, Unicode,
    UPL, W3C, Zope, ... WTFPL goes here rather than in ``pd``: it is a license granted by
    a copyright holder, not a dedication to the public domain.
``by``
    Attribution licenses: CC-BY-* and CC-BY-SA-* (OLC puts BY-SA here too), ODC-By,
    and the permissive data licenses CDLA-Permissive and OGL-UK-3.0.
``restricted``
    Everything else: copyleft (GPL/LGPL/AGPL/MPL/EPL/CDDL/EUPL/Artistic/OFL/GFDL...),
    Creative Commons NC or ND, proprietary text, and anything we cannot read ("",
    None, "UNKNOWN", "see LICENSE", "BSD-like", "MIT-style", "permissive",
    "GPL-compatible", "Dual License", "OSI Approved", "Unlicensed"). Unknown is always
    restricted: nothing is promoted to a trainable tier on a guess.

How a license string is read (:func:`classify_license`):

1. **SPDX expressions and free-text names.** The SPDX grammar is license-expression's
   (ScanCode's SPDX expression library, with the SPDX license index it ships, so no
   network): AND / OR / WITH, precedence WITH > AND > OR, parentheses, syntax errors, ids
   in any case, deprecated ids (``GPL-2.0`` is ``GPL-2.0-only``, ``BSD-2-Clause-FreeBSD``
   is ``BSD-2-Clause-Views``), ``+`` (or later), and which ids are SPDX exceptions. What it
   parses is ours to judge: ``A OR B`` -> the least restrictive (the user may choose);
   ``A AND B`` -> the most restrictive; ``X WITH exc`` -> the tier of ``X`` when ``exc``
   is an SPDX exception (they only add permissions) or free text naming an exception
   ("OpenSSL exception"), otherwise restricted ("MIT with restrictions", "MIT with
   Commons Clause"). Free text is first rewritten into SPDX syntax (ours too): ``/``,
   ``|`` and the word "or" are OR; ``,``, ``;``, ``&`` and "and" are AND (a comma list
   might mean a dual license, but we read it the safe way); "and/or" is OR. ``Name
   (ABBR)`` reads the parenthesis as an annotation: the two together are looked up first,
   otherwise both must hold (AND). Each name is looked up in the tables below, ignoring
   case, punctuation, ``-or-later``, ``+``, "or any later version", ``-only``, "v3",
   ".0", "Licence", "License", "Version" and "the"; known license URLs (opensource.org,
   spdx.org, apache.org, creativecommons.org) are read.
   ``LicenseRef-*`` (whatever the library's index aliases it to: a LicenseRef means what
   its document defines) and unknown ids are restricted; a multi-word phrase we do not
   recognize poisons the whole expression (restricted), because then we cannot trust
   where the operators are. Malformed expressions ("MIT AND (", "MIT AND BSD AND") are
   restricted. A name mentioning NC / NonCommercial / ND / NoDerivatives is restricted
   whatever the tables say.
2. **Full license text** pasted into the field (it has several lines, contains a grant
   phrase, or is a long phrase we could not read as a name): any copyleft /
   non-commercial / proprietary marker anywhere makes it restricted; otherwise the
   grant phrases of MIT, BSD, Apache-2.0, ISC/HPND, Zlib, PSF, Boost, Unlicense, CC0
   and CC BY(-SA) 4.0 are recognized (several grants found: all apply, AND). Failing
   that, the first line is read as a name (Debian's ``License: short-name`` + text).
3. **Python trove classifiers** (``License :: ...``; other classifiers are ignored).
   Several license classifiers on one package mean it is offered under each of them,
   so they combine with OR (least restrictive). Vague ones (``License :: OSI Approved``,
   ``License :: DFSG approved``, ``Freely Distributable``) are restricted.

Combining the license string with classifiers (legal safety first: when two signals
conflict, the more restrictive wins):

* the string says nothing we understand (empty, None, "UNKNOWN", "see LICENSE",
  "Dual License", "BSD-like", "MIT-style", an unknown id such as "FooLicense-2")
  -> the classifiers decide;
* otherwise -> ``stricter(string tier, OR of classifier tiers)``: "MIT" with an MIT
  classifier is ``sw``; "GPL-3.0" with an MIT classifier is ``restricted``; "MIT" with
  only a GPL classifier is ``restricted``. A string that names something restrictive
  ("Proprietary", "GPL-compatible", "All rights reserved", "LicenseRef-foo", a malformed
  expression) counts as a signal.

:func:`stricter` treats an unrecognized tier name as ``restricted`` (a corrupted tier
column must never loosen anything); :func:`license_obligation` turns a license string
into the short text a citation shows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import license_expression

TIERS: tuple[str, ...] = ("pd", "sw", "by", "restricted")
"""All tiers, from least to most restrictive."""

TRAINABLE_TIERS = frozenset({"pd", "sw", "by"})
"""Tiers the parametric LM may ever be trained on (the datastore may hold any tier)."""

PD, SW, BY, RESTRICTED = TIERS
_RANK = {t: i for i, t in enumerate(TIERS)}

# ---------------------------------------------------------------------------------------
# Tables. Keys of _KNOWN are canonical labels (SPDX ids where one exists); _ALIASES maps
# spellings found in the wild to those labels. Both are matched after _canon(), which
# ignores case, punctuation, "license", "version", "the", "v", ".0", "+", "-only", ...
# ---------------------------------------------------------------------------------------

_PD_IDS = (
    "CC0-1.0", "Unlicense", "PDDL-1.0", "CC-PDDC", "CC-PDM-1.0", "NIST-PD",
    "NIST-PD-fallback", "blessing", "SAX-PD", "public domain",
)
_SW_IDS = (
    "MIT", "MIT-0", "MIT-CMU", "MIT-Modern-Variant", "X11", "Expat", "MIT/X11",
    "0BSD", "BSD", "BSD-1-Clause", "BSD-2-Clause", "BSD-2-Clause-FreeBSD",
    "BSD-2-Clause-NetBSD", "BSD-2-Clause-Patent", "BSD-2-Clause-Views", "BSD-3-Clause",
    "BSD-3-Clause-Clear", "BSD-3-Clause-LBNL", "BSD-3-Clause-Modification",
    "BSD-3-Clause-Attribution", "BSD-3-Clause-Open-MPI", "BSD-4-Clause", "BSD-4-Clause-UC",
    "BSD-Source-Code", "Apache", "Apache-1.0", "Apache-1.1", "Apache-2.0", "ISC",
    "PSF-2.0", "Python-2.0", "Python-2.0.1", "CNRI-Python", "Zlib", "zlib-acknowledgement",
    "Libpng", "libpng-2.0", "BSL-1.0", "HPND", "HPND-sell-variant", "NCSA", "PostgreSQL",
    "Unicode", "Unicode-DFS-2015", "Unicode-DFS-2016", "Unicode-3.0", "UPL-1.0", "W3C",
    "W3C-20150513", "ZPL-2.0", "ZPL-2.1", "AFL-1.1", "AFL-1.2", "AFL-2.0", "AFL-2.1",
    "AFL-3.0", "ECL-2.0", "EFL-2.0", "MirOS", "Xnet", "NTP", "curl", "FTL", "OpenSSL",
    "BlueOak-1.0.0", "MulanPSL-2.0", "CECILL-B", "FSFAP", "FSFUL", "FSFULLR", "Jam",
    "OLDAP-2.8", "TCL", "WTFPL", "AAL",
)
_BY_IDS = (
    "CC-BY", "CC-BY-1.0", "CC-BY-2.0", "CC-BY-2.5", "CC-BY-2.5-AU", "CC-BY-3.0",
    "CC-BY-3.0-AT", "CC-BY-3.0-AU", "CC-BY-3.0-DE", "CC-BY-3.0-IGO", "CC-BY-3.0-NL",
    "CC-BY-3.0-US", "CC-BY-4.0", "CC-BY-SA", "CC-BY-SA-1.0", "CC-BY-SA-2.0",
    "CC-BY-SA-2.0-UK", "CC-BY-SA-2.1-JP", "CC-BY-SA-2.5", "CC-BY-SA-3.0", "CC-BY-SA-3.0-AT",
    "CC-BY-SA-3.0-DE", "CC-BY-SA-3.0-IGO", "CC-BY-SA-4.0", "ODC-By-1.0",
    "CDLA-Permissive-1.0", "CDLA-Permissive-2.0", "OGL-UK-3.0",
)
# Listed so they count as a (restrictive) signal and get a clean label; anything not in
# any table is restricted anyway.
_RESTRICTED_IDS = (
    "GPL-1.0", "GPL-2.0", "GPL-3.0", "LGPL-2.0", "LGPL-2.1", "LGPL-3.0", "AGPL-1.0",
    "AGPL-3.0", "GPL", "LGPL", "AGPL", "MPL-1.0", "MPL-1.1", "MPL-2.0",
    "MPL-2.0-no-copyleft-exception", "EPL-1.0", "EPL-2.0", "CDDL-1.0", "CDDL-1.1",
    "EUPL-1.0", "EUPL-1.1", "EUPL-1.2", "CPL-1.0", "IPL-1.0", "Artistic-1.0",
    "Artistic-2.0", "Artistic", "Perl", "GFDL-1.1", "GFDL-1.2", "GFDL-1.3", "OSL-3.0",
    "MS-PL", "MS-RL", "SSPL-1.0", "BUSL-1.1", "OFL-1.1", "LPPL-1.3c", "CECILL-2.1",
    "CECILL-C", "APSL-2.0", "QPL-1.0", "Sleepycat", "JSON", "Vim", "NPL-1.1", "RPL-1.5",
    "SISSL", "SPL-1.0", "ODbL-1.0", "CDLA-Sharing-1.0", "proprietary", "unlicensed",
    "all rights reserved", "commercial",
)

_KNOWN: dict[str, str] = {
    **{k: PD for k in _PD_IDS},
    **{k: SW for k in _SW_IDS},
    **{k: BY for k in _BY_IDS},
    **{k: RESTRICTED for k in _RESTRICTED_IDS},
}

_ALIASES: dict[str, str] = {
    # public domain
    "PD": "public domain", "public-domain": "public domain", "publicdomain": "public domain",
    "public domain dedication": "public domain", "public domain mark": "CC-PDM-1.0",
    "Public Domain Mark 1.0": "CC-PDM-1.0", "expired copyright": "public domain",
    "copyright expired": "public domain", "CC0": "CC0-1.0", "CC-0": "CC0-1.0",
    "CC zero": "CC0-1.0", "Creative Commons Zero": "CC0-1.0", "Creative Commons CC0": "CC0-1.0",
    "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0",
    "Creative Commons Zero v1.0 Universal": "CC0-1.0", "CC0 1.0 Universal": "CC0-1.0",
    "CC0 Universal": "CC0-1.0", "unlicense.org": "Unlicense",
    "Open Data Commons Public Domain Dedication and License": "PDDL-1.0", "ODC-PDDL": "PDDL-1.0",
    # MIT family
    "MIT/Expat": "MIT", "MIT Expat": "MIT", "MIT-X11": "MIT/X11", "MIT X": "MIT/X11",
    "MIT No Attribution": "MIT-0", "MIT No Attribution License (MIT-0)": "MIT-0",
    "CMU License (MIT-CMU)": "MIT-CMU",
    # BSD family
    "BSD-2": "BSD-2-Clause", "BSD2": "BSD-2-Clause", "2-clause BSD": "BSD-2-Clause",
    "two-clause BSD": "BSD-2-Clause", "simplified BSD": "BSD-2-Clause",
    "FreeBSD": "BSD-2-Clause-FreeBSD", 'BSD 2-Clause "Simplified" License': "BSD-2-Clause",
    "BSD-3": "BSD-3-Clause", "BSD3": "BSD-3-Clause", "3-clause BSD": "BSD-3-Clause",
    "three-clause BSD": "BSD-3-Clause", "new BSD": "BSD-3-Clause", "BSD new": "BSD-3-Clause",
    "revised BSD": "BSD-3-Clause", "modified BSD": "BSD-3-Clause",
    'BSD 3-Clause "New" or "Revised" License': "BSD-3-Clause",
    "BSD-4": "BSD-4-Clause", "4-clause BSD": "BSD-4-Clause", "original BSD": "BSD-4-Clause",
    "0-clause BSD": "0BSD", "zero-clause BSD": "0BSD", "BSD Zero Clause": "0BSD",
    "BSD-0-Clause": "0BSD",
    # Apache
    "ASL": "Apache", "Apache Software": "Apache", "Apache Software Foundation": "Apache",
    "Apache 2": "Apache-2.0", "Apache2": "Apache-2.0", "ASL 2": "Apache-2.0",
    "ASL2": "Apache-2.0", "AL 2": "Apache-2.0", "AL2": "Apache-2.0",
    "Apache Software 2.0": "Apache-2.0", "Apache 2.0 (ASL 2.0)": "Apache-2.0",
    "Apache Software 1.1": "Apache-1.1", "ASL 1.1": "Apache-1.1",
    "APACHE-2-LLVM-EXCEPTIONS": "Apache-2.0 WITH LLVM-exception",
    # Python
    "PSF": "PSF-2.0", "PSFL": "PSF-2.0", "PSF-2": "PSF-2.0",
    "Python Software Foundation": "PSF-2.0", "Python Software Foundation 2": "PSF-2.0",
    "Python": "Python-2.0", "CNRI": "CNRI-Python", "CNRI Python": "CNRI-Python",
    "Python License (CNRI Python License)": "CNRI-Python",
    # other permissive
    "ISCL": "ISC", "ISC License (ISCL)": "ISC", "zlib/libpng": "Zlib",
    "zlib/libpng License": "Zlib", "Boost": "BSL-1.0", "Boost Software": "BSL-1.0",
    "Boost Software 1.0": "BSL-1.0", "Boost-1.0": "BSL-1.0", "Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "Historical Permission Notice and Disclaimer": "HPND",
    "Historical Permission Notice and Disclaimer (HPND)": "HPND",
    "University of Illinois/NCSA Open Source": "NCSA",
    "University of Illinois/NCSA": "NCSA", "UIUC": "NCSA", "Universal Permissive": "UPL-1.0",
    "UPL": "UPL-1.0", "Universal Permissive License (UPL)": "UPL-1.0",
    "Zope Public": "ZPL-2.1", "Zope": "ZPL-2.1", "ZPL": "ZPL-2.1",
    "Academic Free": "AFL-3.0", "AFL": "AFL-3.0", "Eiffel Forum": "EFL-2.0", "EFL": "EFL-2.0",
    "Educational Community License 2.0": "ECL-2.0", "X.Net": "Xnet",
    "Unicode Terms of Use": "Unicode", "Unicode DFS": "Unicode-DFS-2016",
    "Blue Oak Model": "BlueOak-1.0.0", "Blue Oak Model License (BlueOak-1.0.0)": "BlueOak-1.0.0",
    "Mulan Permissive Software License v2 (MulanPSL-2.0)": "MulanPSL-2.0",
    "Attribution Assurance": "AAL", "OpenLDAP-2.8": "OLDAP-2.8",
    "Do What The F*ck You Want To Public License": "WTFPL",
    # attribution
    "Open Data Commons Attribution": "ODC-By-1.0", "ODC-BY": "ODC-By-1.0",
    "Open Government Licence v3.0": "OGL-UK-3.0",
    # restricted (recognized, so they count as a signal)
    "Other/Proprietary": "proprietary", "Other/Proprietary License": "proprietary",
    "closed source": "proprietary", "closed": "proprietary", "EULA": "proprietary",
    "Unlicenced": "unlicensed", "no license": "unlicensed", "not licensed": "unlicensed",
    "GNU Library or Lesser General Public License (LGPL)": "LGPL",
    "GPL-1+ or Artistic": "Perl", "Artistic or GPL-1+": "Perl",
}

# Python trove classifiers (the part after "License :: "). Unlisted ones are read from
# their last segment as a license name; vague ones are listed as restricted.
_CLASSIFIERS: dict[str, str] = {
    "Public Domain": "public domain",
    "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication": "CC0-1.0",
    "OSI Approved :: The Unlicense (Unlicense)": "Unlicense",
    "OSI Approved :: MIT License": "MIT",
    "OSI Approved :: MIT No Attribution License (MIT-0)": "MIT-0",
    "OSI Approved :: CMU License (MIT-CMU)": "MIT-CMU",
    "OSI Approved :: BSD License": "BSD",
    "OSI Approved :: Apache Software License": "Apache",
    "OSI Approved :: ISC License (ISCL)": "ISC",
    "OSI Approved :: Python Software Foundation License": "PSF-2.0",
    "OSI Approved :: Python License (CNRI Python License)": "CNRI-Python",
    "OSI Approved :: zlib/libpng License": "Zlib",
    "OSI Approved :: Boost Software License 1.0 (BSL-1.0)": "BSL-1.0",
    "OSI Approved :: Historical Permission Notice and Disclaimer (HPND)": "HPND",
    "OSI Approved :: University of Illinois/NCSA Open Source License": "NCSA",
    "OSI Approved :: PostgreSQL License": "PostgreSQL",
    "OSI Approved :: Universal Permissive License (UPL)": "UPL-1.0",
    "OSI Approved :: W3C License": "W3C",
    "OSI Approved :: Zope Public License": "ZPL-2.1",
    "OSI Approved :: Academic Free License (AFL)": "AFL-3.0",
    "OSI Approved :: Eiffel Forum License": "EFL-2.0",
    "OSI Approved :: Blue Oak Model License (BlueOak-1.0.0)": "BlueOak-1.0.0",
    "OSI Approved :: MirOS License (MirOS)": "MirOS",
    "OSI Approved :: X.Net License": "Xnet",
    "OSI Approved :: Mulan Permissive Software License v2 (MulanPSL-2.0)": "MulanPSL-2.0",
    "OSI Approved :: Attribution Assurance License": "AAL",
    "CeCILL-B Free Software License Agreement (CECILL-B)": "CECILL-B",
    "Other/Proprietary License": "proprietary",
    "OSI Approved :: GNU Library or Lesser General Public License (LGPL)": "LGPL",
    "OSI Approved": "",  # too vague: restricted, no label
    "DFSG approved": "",
    "Freely Distributable": "",
    "Freeware": "",
}

# Whole license texts pasted into a License field: distinctive grant phrases.
_TEXT_GRANTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.I | re.S), label)
    for p, label in (
        (r"permission is hereby granted,? free of charge,? to any person obtaining a copy"
         r".{0,600}?without restriction", "MIT"),
        (r"redistribution and use in source and binary forms,? with or without\s+"
         r"modification,? are permitted", "BSD"),
        (r"apache\s+license,?\s+version\s+2\.0", "Apache-2.0"),
        (r"permission to use,? copy,? modify,? (?:and/or |and )?distribute this\s+software"
         r"(?: and its\s+documentation)? for any\s+purpose", "ISC"),
        (r"permission is granted to anyone to use this software for any purpose,?\s+"
         r"including commercial applications", "Zlib"),
        (r"python software foundation license\s+version 2", "PSF-2.0"),
        (r"boost software license\s*-?\s*version 1\.0", "BSL-1.0"),
        (r"this is free and unencumbered software released into the public domain",
         "Unlicense"),
        (r"\bcc0 1\.0 universal", "CC0-1.0"),
        (r"creative commons attribution 4\.0 international public license", "CC-BY-4.0"),
        (r"creative commons attribution-sharealike 4\.0 international public license",
         "CC-BY-SA-4.0"),
    )
)

# In a pasted text, any of these makes the whole field restricted.
_TEXT_RESTRICTIVE = re.compile(
    r"\bgnu\b|general public licen[cs]e|\b[al]?gpl|lesser general|mozilla public"
    r"|eclipse public|common development and distribution|european union public"
    r"|artistic licen[cs]e|non-?commercial|no-?deriv|proprietary|server side public"
    r"|business source licen|commons clause|free documentation licen"
    r"|not for commercial|personal use only|may not be (?:sold|used|redistributed)",
    re.I,
)

# An unrecognized name matching this is still a (restrictive) signal, not "no info".
_RESTRICTIVE_HINT = re.compile(
    r"gpl|general public|\bgnu\b|\bmpl\b|mozilla|\bepl\b|eclipse|cddl|eupl|european union"
    r"|artistic|copyleft|proprietary|commercial|all rights reserved|\bnc\b|\bnd\b"
    r"|no-?deriv|sspl|\bbusl\b|business source|commons clause|gfdl|free documentation"
    r"|\bcpl\b|\bosl\b|cecill|\bqpl\b|sleepycat|\bofl\b|open font|\blppl\b|\bapsl\b"
    r"|reciprocal|\bms-[pr]l\b|confidential|restricted|internal use|personal|academic"
    r"|research|educational|evaluation|non-?profit|\bonly\b|not for|may not|do not"
    r"|unlicen[cs]ed|not licen[cs]ed|no licen[cs]e|\beula\b|terms of (?:use|service)",
    re.I,
)

# NonCommercial / NoDerivatives anywhere in a name: restricted, whatever the tables say.
_NC_ND = re.compile(r"non-?\s?commercial|no-?\s?deriv|\bnc\b|\bnd\b", re.I)

_URL = re.compile(r"^(?:https?://)?(?:www\.)?([a-z0-9.-]+\.[a-z]{2,})(/\S*)?$", re.I)


# ---------------------------------------------------------------------------------------
# Canonical keys and lookup
# ---------------------------------------------------------------------------------------

_CANON_SUBS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"licence", "license"),
        (r"creative\s*commons", "cc"),
        (r"(?:international|unported)\s+public\s+license", ""),
        (r"attribution", "by"),
        (r"share[\s_-]*alike", "sa"),
        (r"non[\s_-]*commercial", "nc"),
        (r"no[\s_-]*deriv(?:ative)?s?", "nd"),
        (r"[\s_-]*(?:or|and)[\s_-]*(?:any[\s_-]*)?(?:later|newer|greater|above)"
         r"(?:[\s_-]*versions?)?", "+"),
        (r"(\d)[\s_-]*(?:international|unported|generic)\b", r"\1"),  # CC "4.0 International"
        (r"\b(?:the|license|licensed|version|ver|only)\b", " "),
        (r"v(?=\d)", ""),
        (r"[^a-z0-9.+]", ""),
        (r"(?<![\d.])(\d+)(?:\.0)+(?![\d.])", r"\1"),
        (r"\+", ""),
    )
)


def _canon(name: str) -> str:
    """Lookup key: 'GNU GPL v3.0 or later' and 'gpl-3.0+' -> the same string."""
    s = name.lower()
    for pattern, repl in _CANON_SUBS:
        s = pattern.sub(repl, s)
    return s.strip(".")


def _label_tier(label: str) -> str:
    if " WITH " in label:  # an alias onto an expression, e.g. Debian's APACHE-2-LLVM-...
        return _KNOWN[label.split(" WITH ")[0]]
    return _KNOWN[label]


def _build_lookup() -> dict[str, str]:
    spellings: list[tuple[str, str]] = [(label, label) for label in _KNOWN]
    spellings += [(label.removeprefix("CC-"), label) for label in _BY_IDS]  # "BY-SA 4.0"
    spellings += list(_ALIASES.items())
    table: dict[str, str] = {}
    for spelling, label in spellings:
        key = _canon(spelling)
        first = table.setdefault(key, label)
        if _label_tier(first) != _label_tier(label):  # a canonical collision across tiers
            raise AssertionError(f"{spelling!r} -> {label!r} collides with {first!r}")
    return table


_LOOKUP = _build_lookup()
_CLASSIFIER_LOOKUP = {_canon(k): v for k, v in _CLASSIFIERS.items()}


@dataclass(frozen=True)
class _Eval:
    """What a (sub)expression allows: tier, the terms chosen, and how sure we are."""

    tier: str
    label: str = ""
    share_alike: bool = False
    known: bool = False  # at least one name in it was recognized (a signal)
    poison: bool = False  # an unrecognized multi-word phrase: operators untrustworthy


_UNKNOWN = _Eval(RESTRICTED)


def _known(label: str) -> _Eval:
    tier = _label_tier(label)
    return _Eval(tier, label, tier == BY and "-SA" in label, known=True)


def _lookup_url(url: str) -> _Eval | None:
    m = _URL.match(url.rstrip("/.)"))
    if not m:
        return None
    host, path = m.group(1).lower(), (m.group(2) or "").lower().rstrip("/")
    path = re.sub(r"(?:/legalcode)?(?:\.[a-z]{2,4})?$", "", path)
    parts = [p for p in path.split("/") if p and not p.startswith(("deed", "legalcode"))]
    if host.endswith("creativecommons.org") and len(parts) >= 3:
        if parts[:2] == ["publicdomain", "zero"]:
            return _known("CC0-1.0")
        if parts[:2] == ["publicdomain", "mark"]:
            return _known("CC-PDM-1.0")
        if parts[0] == "licenses":
            return _atom(f"CC-{parts[1]}-{'-'.join(parts[2:])}")
    if host == "apache.org" and parts[:1] == ["licenses"] and len(parts) == 2:
        return _atom(parts[1].replace("license-", "Apache-"))
    if host in ("opensource.org", "spdx.org") and len(parts) == 2 and parts[0] == "licenses":
        return _atom(parts[1].removesuffix("-license"))
    if host == "unlicense.org":
        return _known("Unlicense")
    if _RESTRICTIVE_HINT.search(url):
        return _Eval(RESTRICTED, url, known=True)
    return None


def _atom(text: str) -> _Eval:
    """One license name (no operators)."""
    raw = text.strip()
    if not raw:
        return _UNKNOWN
    if _NC_ND.search(raw):
        return _Eval(RESTRICTED, raw, known=True)
    if "://" in raw or raw.lower().startswith("www."):
        return _lookup_url(raw) or _Eval(RESTRICTED, raw)
    label = _LOOKUP.get(_canon(raw))
    if label is not None:
        return _known(label)
    if re.match(r"(?:DocumentRef-[^:]+:)?LicenseRef-", raw, re.I) or _RESTRICTIVE_HINT.search(raw):
        return _Eval(RESTRICTED, raw, known=True)
    return _Eval(RESTRICTED, raw, poison=len(raw.split()) > 1)


# ---------------------------------------------------------------------------------------
# Expressions. license-expression (ScanCode) parses them: the SPDX grammar (AND, OR, WITH,
# precedence WITH > AND > OR, parentheses, syntax errors) and the SPDX index it ships
# (ids in any case, deprecated ids such as GPL-2.0 -> GPL-2.0-only, "+" -> -or-later, which
# ids are exceptions). Free text it does not read ("MIT/Apache 2.0", "The MIT License
# (MIT)", URLs), so _to_spdx first rewrites a field into SPDX syntax; the tree it returns
# is then read against our tables by _evaluate.
# ---------------------------------------------------------------------------------------

_SPDX = license_expression.get_spdx_licensing()  # offline: the index is inside the wheel
_SPDX.parse("MIT")  # builds its tokenizer once, at import, rather than on a first call


# Free-text lexemes: a URL (kept whole: it has "/" in it), a bracket, a separator, a word.
_LEXEME = re.compile(
    r"(?P<url>https?://[^\s()\[\]<>,;]+|www\.[^\s()\[\]<>,;/]+\.[a-z]{2,}[^\s()\[\]<>,;]*)"
    r"|(?P<lp>[(\[])|(?P<rp>[)\]])|(?P<or>\|\||\||/)|(?P<and>&&|&|,|;)|(?P<ws>\s+)"
    r"|(?P<word>[^\s()\[\]|/&,;]+)",
    re.I,
)
_SPDX_TOKEN = {"lp": "(", "rp": ")", "or": "OR", "and": "AND"}
_OPERATOR_WORDS = {"or": "OR", "and": "AND", "with": "WITH"}

# A name handed to the library as it is: one SPDX-shaped id, "+" allowed. Anything else
# travels as a placeholder that our tables read: the library would split "The MIT License"
# around the id it knows inside, it rejects "/" and quotes, and its index maps some
# LicenseRef- ids onto SPDX licenses (LicenseRef-Apache -> Apache-2.0), whereas a
# LicenseRef means what the document using it defines, so here it never promotes anything.
_SPDX_ID = re.compile(r"(?!(?:licenseref|documentref)-)[a-z0-9][a-z0-9.-]*\+?", re.I)
_PLACEHOLDER = "LicenseRef-silo-{}"


def _to_spdx(text: str) -> tuple[str, dict[str, str]] | None:
    """Free text -> (SPDX expression, {placeholder: the name it stands for}); None when
    it is malformed in a way that boolean.py would let through.

    "/" and "|" are OR; "," ";" "&" are AND; "[ ]" are parentheses; the words "or", "and",
    "with" are operators; adjacent words make one name. Operands side by side: "Name
    (ABBR)" is one name when the two together are a name we know; otherwise a name with
    notes after it ("GPL-3.0 (see LICENSE)") and a group with more after it ("(MIT)
    Apache") are an AND of all (the safe reading). A name after a note ("X (Y) Z"),
    anything after an exception ("X WITH e (Y)") and an operator at the end are malformed;
    other syntax errors are the parser's to find.
    """
    items: list[tuple[str, str]] = []  # (kind, text); kind: "name", "(", ")", AND, OR, WITH
    for m in _LEXEME.finditer(text):
        kind, value = m.lastgroup or "", m.group()
        if kind == "ws":
            continue
        if kind == "word" and value.lower() in _OPERATOR_WORDS:
            items.append((_OPERATOR_WORDS[value.lower()], value))
        elif kind in ("word", "url"):
            if items and items[-1][0] == "name":
                items[-1] = ("name", f"{items[-1][1]} {value}")
            else:
                items.append(("name", value))
        else:
            items.append((_SPDX_TOKEN[kind], value))
    i = 0
    while i + 3 < len(items):
        (k0, name), (k1, _), (k2, note), (k3, _) = items[i:i + 4]
        merged = f"{name} {note}"
        if (k0, k1, k2, k3) == ("name", "(", "name", ")") and _canon(merged) in _LOOKUP \
                and not _NC_ND.search(merged):
            items[i:i + 4] = [("name", merged)]  # "The MIT License (MIT)", "Apache (2.0)"
        else:
            i += 1
    out: list[str] = []
    phrases: dict[str, str] = {}
    runs = [""]  # per open group: the kind of operand that began the current run side by side
    previous = ""
    for kind, value in items:
        if kind in ("name", "(") and previous in ("name", ")"):
            if runs[-1] == "WITH" or (kind == "name" and runs[-1] == "name"):
                return None  # "X (Y) Z", "X WITH e (Y)": boolean.py would take them as ANDs
            out.append("AND")
        elif kind in ("name", "("):
            runs[-1] = "WITH" if previous == "WITH" else kind
        if kind == "(":
            runs.append("")
        elif kind == ")" and len(runs) > 1:
            runs.pop()
        if kind != "name":
            out.append(kind)
        elif _SPDX_ID.fullmatch(value):
            out.append(value)
        else:
            phrases[key := _PLACEHOLDER.format(len(phrases))] = value
            out.append(key)
        previous = kind
    if previous in _OPERATOR_WORDS.values():
        return None  # boolean.py reads "MIT AND BSD AND" as "MIT AND BSD": a cut-off field
    return " ".join(out), phrases


def _parse(text: str) -> _Eval | None:
    """A license expression or a free-text list of names, read; None when malformed."""
    converted = _to_spdx(text)
    if converted is None:
        return None
    expression, phrases = converted
    try:
        tree = _SPDX.parse(expression)
    except Exception:
        # license-expression raises ExpressionError for most syntax errors, but some
        # garbage fails deeper down ("()": IndexError; "MIT AND ( AND X": an assertion in
        # boolean.py): whatever it raises, the field could not be read.
        return None
    return None if tree is None else _evaluate(tree, phrases)


def _evaluate(node: object, phrases: dict[str, str]) -> _Eval:
    """Our reading of a tree parsed by license-expression (placeholders: see _to_spdx)."""
    if isinstance(node, license_expression.LicenseWithExceptionSymbol):
        base = _evaluate(node.license_symbol, phrases)
        exception = phrases.get(node.exception_symbol.key, node.exception_symbol.key)
        label = f"{base.label} WITH {exception}"
        # An SPDX exception only adds permissions, so the license's tier holds; free text
        # must say it is an exception ("OpenSSL exception"): "MIT with Commons Clause" or
        # "MIT with restrictions" are restrictions.
        if node.exception_symbol.is_exception or "exception" in exception.lower():
            return _Eval(base.tier, label, base.share_alike, base.known, base.poison)
        return _Eval(RESTRICTED, label, known=True, poison=base.poison)
    if isinstance(node, license_expression.LicenseSymbol):
        return _atom(phrases.get(node.key, node.key))
    if isinstance(node, license_expression.OR):
        return _any_of([_evaluate(arg, phrases) for arg in node.args])
    if isinstance(node, license_expression.AND):
        return _all_of([_evaluate(arg, phrases) for arg in node.args])
    return _Eval(RESTRICTED, known=True)  # nothing else comes out of a parse: never trust it


def _any_of(options: list[_Eval]) -> _Eval:
    """OR: the user may pick any option, so the least restrictive one counts."""
    if len(options) == 1:
        return options[0]
    best = min(options, key=lambda e: (_RANK[e.tier], e.share_alike))
    return _Eval(best.tier, best.label, best.share_alike, any(o.known for o in options),
                 any(o.poison for o in options))


def _all_of(parts: list[_Eval]) -> _Eval:
    """AND: every part applies, so the most restrictive one counts."""
    if len(parts) == 1:
        return parts[0]
    tier = max((p.tier for p in parts), key=_RANK.__getitem__)
    labels = list(dict.fromkeys(p.label for p in parts))
    return _Eval(tier, " AND ".join(labels), any(p.share_alike for p in parts),
                 any(p.known for p in parts), any(p.poison for p in parts))


# ---------------------------------------------------------------------------------------
# Reading a whole license field
# ---------------------------------------------------------------------------------------

_PRE_SUBS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.I), r)
    for p, r in (
        (r"^\s*licen[cs]e\s*[:=]\s*", ""),  # "License: MIT"
        (r"\band\s*/\s*or\b", " or "),
        (r"\s*,?\s*\b(?:or|and)\s+(?:any\s+)?(?:later|newer|greater|higher)"
         r"(?:\s+versions?)?(?:\s+of\s+the\s+licen[cs]e)?\b", "+"),
        (r",\s*(?=(?:version|ver\.?|v)\s*\d)", " "),  # "Apache License, Version 2.0"
        (r"_or_", " or "),  # Debian: LGPLv3+_or_GPLv2+
        (r"[\s.,;:]+$", ""),
        (r"^[\"'`]+|[\"'`]+$", ""),
    )
)


@dataclass(frozen=True)
class _Verdict:
    tier: str
    label: str
    share_alike: bool
    signal: bool  # the string told us something (permission or an explicit restriction)


def _from_eval(e: _Eval) -> _Verdict:
    if e.poison:
        return _Verdict(RESTRICTED, "", False, e.known)
    return _Verdict(e.tier, e.label, e.share_alike, e.known)


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch in "([") - (ch in ")]")
        if depth < 0:
            return False
    return depth == 0


def _read_name(s: str) -> _Verdict:
    for pattern, repl in _PRE_SUBS:
        s = pattern.sub(repl, s)
    s = s.strip()
    if not s:
        return _Verdict(RESTRICTED, "", False, False)
    label = _LOOKUP.get(_canon(s)) if _balanced(s) else None
    if label is not None and not _NC_ND.search(s):
        return _from_eval(_known(label))
    parsed = _parse(s)
    if parsed is None:
        return _Verdict(RESTRICTED, "", False, True)  # malformed: an explicit, broken claim
    return _from_eval(parsed)


@functools.lru_cache(maxsize=8192)
def _read(license: str) -> _Verdict:
    if re.match(r"\s*licen[cs]e\s*::", license, re.I):  # a trove classifier as the string
        return _read_classifier(license.strip()) or _Verdict(RESTRICTED, "", False, False)
    grants = [label for pattern, label in _TEXT_GRANTS if pattern.search(license)]
    lines = license.strip().splitlines()
    if not grants and len(lines) <= 1:
        name = _read_name(license)
        if name.signal or len(license) <= 200:
            return name
    # a pasted license text (or a long phrase we could not read as a name)
    if _TEXT_RESTRICTIVE.search(license):
        return _Verdict(RESTRICTED, "", False, True)
    if grants:
        return _from_eval(_all_of([_known(g) for g in dict.fromkeys(grants)]))
    if len(lines) > 1:  # Debian layout: short name on the first line, then the text
        first = _read_name(lines[0])
        if first.signal:
            return first
    return _read_name(" ".join(license.split()))


def _read_classifier(classifier: str) -> _Verdict | None:
    """One trove classifier; None when it is not a `License ::` classifier."""
    segments = [p.strip() for p in classifier.split("::")]
    if len(segments) < 2 or segments[0].lower() not in ("license", "licence"):
        return None
    label = _CLASSIFIER_LOOKUP.get(_canon(" :: ".join(segments[1:])))
    if label == "":  # listed as too vague
        return _Verdict(RESTRICTED, "", False, False)
    if label is not None:
        e = _known(label)
        return _Verdict(e.tier, e.label, e.share_alike, True)
    return _read(segments[-1])


def _read_classifiers(classifiers: tuple[str, ...]) -> str | None:
    """OR of the tiers of the `License ::` classifiers; None when there are none."""
    verdicts = [v for v in map(_read_classifier, classifiers) if v is not None]
    return min((v.tier for v in verdicts), key=_RANK.__getitem__) if verdicts else None


def _as_str(license: object) -> str:
    return "" if license is None else license if isinstance(license, str) else str(license)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def classify_license(license: str | None, classifiers: Iterable[str] = ()) -> str:
    """The OLC tier of text under `license` (SPDX id/expression, free text, or a pasted
    license text) and optional Python trove `classifiers`. Unknown -> 'restricted'."""
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    verdict = _read(_as_str(license))
    classifiers = () if classifiers is None else classifiers
    from_classifiers = _read_classifiers(tuple(str(c) for c in classifiers))
    if from_classifiers is None:
        return verdict.tier
    if not verdict.signal:
        return from_classifiers
    return stricter(verdict.tier, from_classifiers)


def parse_tiers(spec: str) -> tuple[str, ...]:
    """'pd,sw' -> ('pd', 'sw'); 'all' -> every tier. Result is in TIERS order, deduplicated.

    Raises ValueError (naming the valid tiers) for an empty spec or an unknown name.
    """
    names = [n.strip().lower() for n in str(spec or "").split(",") if n.strip()]
    if not names:
        raise ValueError(f"no tiers given: name some of {', '.join(TIERS)} (or 'all')")
    if "all" in names:
        return TIERS
    unknown = [n for n in names if n not in _RANK]
    if unknown:
        raise ValueError(
            f"unknown tier{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            f"valid tiers are {', '.join(TIERS)} (or 'all')")
    return tuple(t for t in TIERS if t in names)


def stricter(a: str, b: str) -> str:
    """The more restrictive of two tiers; an unrecognized tier name counts as 'restricted'."""
    ra, rb = _RANK.get(a, _RANK[RESTRICTED]), _RANK.get(b, _RANK[RESTRICTED])
    return TIERS[max(ra, rb)]


def license_obligation(license: str | None) -> str:
    """What the license asks of someone reusing the text, in a few words (for citations).

    'none (public domain)', 'keep copyright and license notice (MIT)',
    'attribution required (CC-BY-4.0)', 'attribution + share-alike (CC-BY-SA-4.0)', or
    'not licensed for reuse' for restricted and unknown licenses. For `A OR B` the
    obligation of the least restrictive option is given.
    """
    v = _read(_as_str(license))
    if v.tier == PD:
        return "none (public domain)"
    if v.tier == SW:
        return f"keep copyright and license notice ({v.label})"
    if v.tier == BY:
        kind = "attribution + share-alike" if v.share_alike else "attribution required"
        return f"{kind} ({v.label})"
    return "not licensed for reuse"
