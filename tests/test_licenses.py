"""License -> OLC tier classification (silo.licenses): real-world spellings, SPDX
expressions, pasted license texts, trove classifiers, and the small tier helpers."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silo.licenses import (
    TIERS,
    TRAINABLE_TIERS,
    classify_license,
    license_obligation,
    parse_tiers,
    stricter,
)

PD, SW, BY, R = "pd", "sw", "by", "restricted"

# (license string as found in the wild, expected tier)
CASES: list[tuple[str | None, str]] = [
    # --- public domain ---------------------------------------------------------------
    ("Public Domain", PD),
    ("public domain", PD),
    ("public-domain", PD),  # Debian short name
    ("Public-Domain", PD),
    ("PD", PD),
    ("Public Domain (expired copyright)", PD),
    ("CC0", PD),
    ("CC0-1.0", PD),
    ("cc0-1.0", PD),
    ("CC0 1.0 Universal", PD),
    ("CC0 1.0 Universal (CC0 1.0) Public Domain Dedication", PD),
    ("Creative Commons Zero v1.0 Universal", PD),
    ("Unlicense", PD),
    ("The Unlicense", PD),
    ("PDDL-1.0", PD),
    ("CC-PDDC", PD),
    ("http://creativecommons.org/publicdomain/zero/1.0/", PD),
    ("CC0-1.0 OR GPL-3.0", PD),
    ("CC0-1.0 AND Unlicense", PD),
    # --- permissive software -----------------------------------------------------------
    ("MIT", SW),
    ("mit", SW),
    ("MIT License", SW),
    ("MIT license", SW),
    ("The MIT License", SW),
    ("The MIT License (MIT)", SW),
    ("License: MIT", SW),
    ('"MIT"', SW),
    ("MIT.", SW),
    ("Expat", SW),  # Debian's name for MIT
    ("expat", SW),
    ("MIT/X11", SW),
    ("X11", SW),
    ("MIT-0", SW),
    ("MIT-CMU", SW),
    ("0BSD", SW),
    ("WTFPL", SW),  # a license, not a dedication: sw, not pd
    ("BSD", SW),
    ("BSD License", SW),
    ("new BSD", SW),
    ("New BSD License", SW),
    ("3-clause BSD", SW),
    ("3-Clause BSD License", SW),
    ("Modified BSD License", SW),
    ("Revised BSD", SW),
    ("Simplified BSD", SW),
    ("BSD-3", SW),
    ("BSD 3-Clause License", SW),
    ("BSD (3 clause)", SW),
    ('BSD 3-Clause "New" or "Revised" License', SW),
    ("BSD-2-Clause", SW),
    ("bsd-2-clause", SW),
    ("BSD-3-clause", SW),  # Debian casing
    ("BSD-3-Clause-Clear", SW),
    ("BSD-2-Clause-FreeBSD", SW),  # deprecated SPDX id
    ("BSD-4-Clause", SW),
    ("Apache-2.0", SW),
    ("apache-2.0", SW),
    ("Apache 2.0", SW),
    ("Apache 2", SW),
    ("Apache-2", SW),
    ("Apache v2", SW),
    ("Apache License 2.0", SW),
    ("Apache License, Version 2.0", SW),
    ("Apache License Version 2.0", SW),
    ("Apache Software License", SW),
    ("Apache Software License 2.0", SW),
    ("Apache 2.0 License", SW),
    ("Apache License (2.0)", SW),
    ("ASL 2", SW),
    ("ASL 2.0", SW),
    ("Apache-1.1", SW),
    ("Apache License 2.0 or later", SW),
    ("Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0)", SW),
    ("http://www.apache.org/licenses/LICENSE-2.0", SW),
    ("https://opensource.org/licenses/MIT", SW),
    ("https://spdx.org/licenses/BSD-3-Clause.html", SW),
    ("ISC", SW),
    ("ISC License", SW),
    ("ISC license", SW),
    ("ISCL", SW),
    ("PSF", SW),
    ("PSF-2.0", SW),
    ("PSF License", SW),
    ("Python Software Foundation License", SW),
    ("Python-2.0", SW),
    ("Python", SW),  # Debian short name
    ("CNRI-Python", SW),
    ("Zlib", SW),
    ("zlib/libpng", SW),
    ("BSL-1.0", SW),
    ("Boost Software License 1.0", SW),
    ("Boost", SW),
    ("HPND", SW),
    ("Historical Permission Notice and Disclaimer (HPND)", SW),
    ("NCSA", SW),
    ("University of Illinois/NCSA Open Source License", SW),
    ("PostgreSQL", SW),
    ("PostgreSQL License", SW),
    ("Unicode-DFS-2016", SW),
    ("UPL-1.0", SW),
    ("ZPL-2.1", SW),
    ("curl", SW),
    ("APACHE-2-LLVM-EXCEPTIONS", SW),  # Debian short name
    # --- attribution --------------------------------------------------------------------
    ("CC-BY-4.0", BY),
    ("CC BY 4.0", BY),
    ("cc-by-4.0", BY),
    ("CC-BY", BY),
    ("CC-BY-3.0", BY),
    ("CC-BY-3.0-US", BY),
    ("CC BY-SA 4.0", BY),
    ("CC-BY-SA-4.0", BY),
    ("CC-BY-SA-3.0", BY),
    ("CC-BY-SA-3.0-Unported", BY),
    ("CC BY-SA 3.0 Unported", BY),
    ("Creative Commons Attribution 4.0 International", BY),
    ("Creative Commons Attribution 4.0 International Public License", BY),
    ("Creative Commons Attribution-ShareAlike 4.0 International", BY),
    ("Creative Commons Attribution-ShareAlike 2.0 Generic", BY),
    ("Attribution 4.0 International (CC BY 4.0)", BY),
    ("https://creativecommons.org/licenses/by/4.0/", BY),
    ("https://creativecommons.org/licenses/by-sa/3.0/legalcode", BY),
    ("https://creativecommons.org/licenses/by/4.0/deed.en", BY),
    ("https://creativecommons.org/licenses/by-nc-sa/4.0/deed.en", R),
    ("https://example.com/my-license.html", R),
    ("ODC-By-1.0", BY),
    ("CDLA-Permissive-2.0", BY),
    # --- restricted: copyleft -------------------------------------------------------------
    ("GPL", R),
    ("GPLv2", R),
    ("GPLv3", R),
    ("GPLv3+", R),
    ("GPL-3+", R),
    ("GPL-2+", R),
    ("GPL-2.0", R),  # deprecated SPDX id
    ("GPL-2.0+", R),
    ("GPL-2.0-only", R),
    ("GPL-3.0-or-later", R),
    ("GNU GPL v3", R),
    ("GNU General Public License v3 (GPLv3)", R),
    ("GNU General Public License v2 or later (GPLv2+)", R),
    ("LGPL", R),
    ("LGPLv2+", R),
    ("LGPL-2.1+", R),
    ("LGPL-2.1-or-later", R),
    ("LGPLv3+_or_GPLv2+", R),  # Debian
    ("GNU Lesser General Public License v2 or later (LGPLv2+)", R),
    ("AGPL-3.0", R),
    ("AGPLv3", R),
    ("MPL 2.0", R),
    ("MPL-2.0", R),
    ("Mozilla Public License 2.0 (MPL 2.0)", R),
    ("EPL-2.0", R),
    ("CDDL-1.0", R),
    ("EUPL-1.2", R),
    ("Artistic", R),  # Debian
    ("Artistic-2.0", R),
    ("Perl", R),
    ("GPL-1+ or Artistic", R),
    ("OFL-1.1", R),
    ("GFDL-1.3", R),
    ("GPL-2.0 WITH Classpath-exception-2.0", R),
    ("GPL-2+ with OpenSSL exception", R),
    ("GPL-3.0-or-later WITH GCC-exception-3.1", R),
    # --- restricted: NC / ND Creative Commons ---------------------------------------------
    ("CC BY-NC 4.0", R),
    ("CC-BY-NC-4.0", R),
    ("CC-BY-NC-SA-4.0", R),
    ("CC BY-NC-SA 4.0", R),
    ("CC-BY-ND-4.0", R),
    ("CC-BY-NC-ND-3.0", R),
    ("Creative Commons Attribution-NonCommercial 4.0 International", R),
    ("Creative Commons Attribution-NoDerivatives 4.0 International", R),
    ("Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International", R),
    ("https://creativecommons.org/licenses/by-nc/4.0/", R),
    ("CC-BY-4.0-NC", R),  # odd order: still NC
    ("CC-BY-SA-4.0 AND CC-BY-NC-4.0", R),
    # --- restricted: proprietary, unknown, vague ------------------------------------------
    ("Proprietary", R),
    ("Other/Proprietary License", R),
    ("All rights reserved", R),
    ("Copyright (c) 2020 Foo Inc. All rights reserved.", R),
    ("Commercial", R),
    ("LicenseRef-Proprietary", R),
    ("LicenseRef-MIT-style", R),
    ("DocumentRef-spdx-tool-1.2:LicenseRef-MIT-Style-2", R),
    ("UNKNOWN", R),
    ("unknown", R),
    ("NOASSERTION", R),
    ("NONE", R),
    ("None", R),
    ("n/a", R),
    ("N/A", R),
    ("", R),
    ("   ", R),
    (None, R),
    ("see LICENSE", R),
    ("see LICENSE file", R),
    ("LICENSE.txt", R),
    ("Dual License", R),
    ("Other", R),
    ("OSI Approved", R),
    ("GPL-compatible", R),
    ("BSD-like", R),  # resemblance, not terms: never promoted on a guess
    ("BSD-style", R),
    ("MIT-style", R),
    ("MIT-like", R),
    ("permissive", R),  # Debian catch-all: unknown wording
    ("Permissive", R),
    ("free", R),
    ("Freeware", R),
    ("Free for non-commercial use", R),
    ("Free for academic use", R),
    ("Creative Commons", R),  # which one? could be NC
    ("Unlicensed", R),  # NOT the Unlicense
    ("BSL", R),  # Boost? Business Source? don't guess
    ("BSL-1.1", R),  # Business Source License
    ("BUSL-1.1", R),
    ("SSPL-1.0", R),
    ("FooLicense-2.0", R),
    ("CC-BY-SA-2.0-IT", R),  # not an SPDX port we list: unknown
    ("This project is licensed under the terms of the MIT license, see LICENSE", R),
    ("MIT with restrictions", R),  # not an SPDX exception
    ("MIT with Commons Clause", R),
    ("public domain, Python, 2-Clause BSD, GPL 3 (see COPYING.txt)", R),  # comma = AND
    # --- expressions ------------------------------------------------------------------------
    ("MIT OR Apache-2.0", SW),
    ("Apache-2.0 OR MIT", SW),
    ("Apache-2.0 or MIT", SW),
    ("MIT/Apache-2.0", SW),
    ("MIT or Apache 2.0", SW),
    ("MIT | Apache-2.0", SW),
    ("Apache-2.0 AND MIT", SW),
    ("Apache-2.0 & MIT", SW),
    ("MIT, Apache-2.0", SW),
    ("BSL-1.0 and MIT", SW),
    ("MIT AND GPL-2.0", R),
    ("BSD-3-Clause AND GPL-2.0", R),
    ("MPL-2.0 AND MIT", R),
    ("GPL-2.0-or-later OR MIT", SW),
    ("GPL/BSD", SW),
    ("BSD-3-clause or GPL-2+", SW),
    ("BSD-3-clause and/or GPL-3+", SW),
    ("(MIT OR GPL-3.0) AND CC-BY-4.0", BY),
    ("(MIT AND GPL-3.0) OR CC-BY-4.0", BY),
    ("MIT AND (GPL-3.0 OR CC-BY-SA-4.0)", BY),
    ("MIT OR GPL-3.0 AND CC-BY-4.0", SW),  # AND binds tighter than OR
    ("GPL-3.0 AND MIT OR Apache-2.0", SW),
    ("((MIT))", SW),
    ("[MIT OR Apache-2.0]", SW),
    ("Apache-2.0 WITH LLVM-exception", SW),
    ("Apache License 2.0 with LLVM exceptions", SW),
    ("Apache-2.0 AND Apache-2.0 WITH LLVM-exception AND BSD-2-Clause AND BSL-1.0 AND MIT", SW),
    ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", SW),
    ("CC0-1.0 AND MIT", SW),
    ("CC-BY-4.0 AND MIT", BY),
    ("CC-BY-SA-4.0 OR CC0-1.0", PD),
    ("MIT OR LicenseRef-Proprietary", SW),
    ("MIT AND LicenseRef-Proprietary", R),
    ("MIT OR FooLicense", SW),  # a single unknown id is just a restricted option
    ("MIT AND FooLicense", R),
    ("MIT or see LICENSE file", R),  # unreadable prose: operators untrustworthy
    ("Other/Proprietary License OR MIT", SW),
    # --- malformed ---------------------------------------------------------------------------
    ("MIT AND (", R),
    ("MIT AND", R),
    ("OR MIT", R),
    ("(MIT", R),
    ("MIT)", R),
    ("()", R),
    ("MIT AND AND Apache-2.0", R),
    ("MIT WITH", R),
    ("WITH LLVM-exception", R),
]


@pytest.mark.parametrize(("license", "tier"), CASES)
def test_classify_real_world_spellings(license, tier):
    assert classify_license(license) == tier


def test_case_table_is_wide_and_covers_every_tier():
    assert len(CASES) >= 120
    assert {t for _, t in CASES} == set(TIERS)
    assert len({c for c, _ in CASES}) == len(CASES), "duplicate case"


# --- pasted license texts ---------------------------------------------------------------

MIT_TEXT = """MIT License

Copyright (c) 2021 Example Corp

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
"""

BSD_TEXT = """Copyright (c) 2015, matplotlib project
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

* Redistributions of source code must retain the above copyright notice, this
  list of conditions and the following disclaimer.
"""

APACHE_TEXT = """
                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/

   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION
"""

APACHE_HEADER = ('Licensed under the Apache License, Version 2.0 (the "License"); you may not '
                 "use this file except in compliance with the License.")

GPL_TEXT = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007

 Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>
 Everyone is permitted to copy and distribute verbatim copies
"""

ISC_TEXT = """Copyright (c) 2013 Example

Permission to use, copy, modify, and/or distribute this software for any
purpose with or without fee is hereby granted, provided that the above
copyright notice and this permission notice appear in all copies.
"""

UNLICENSE_TEXT = """This is free and unencumbered software released into the public domain.

Anyone is free to copy, modify, publish, use, compile, sell, or
distribute this software, either in source code form or as a compiled binary.
"""

ZLIB_TEXT = """This software is provided 'as-is', without any express or implied
warranty.  In no event will the authors be held liable for any damages
arising from the use of this software.

Permission is granted to anyone to use this software for any purpose,
including commercial applications, and to alter it and redistribute it
freely, subject to the following restrictions:
"""

CC_BY_TEXT = """Attribution 4.0 International

Creative Commons Corporation ("Creative Commons") is not a law firm.

Creative Commons Attribution 4.0 International Public License

By exercising the Licensed Rights (defined below), You accept and agree
"""

CC_BY_NC_TEXT = CC_BY_TEXT.replace("Attribution 4.0", "Attribution-NonCommercial 4.0")

NON_COMMERCIAL_HPND = """Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, for non-commercial
purposes only.
"""


@pytest.mark.parametrize(
    ("text", "tier"),
    [
        (MIT_TEXT, SW),
        (MIT_TEXT.replace("\n", "\r\n"), SW),
        (BSD_TEXT, SW),
        (APACHE_TEXT, SW),
        (APACHE_HEADER, SW),
        (ISC_TEXT, SW),
        (ZLIB_TEXT, SW),
        (UNLICENSE_TEXT, PD),
        (CC_BY_TEXT, BY),
        (GPL_TEXT, R),
        (CC_BY_NC_TEXT, R),
        (NON_COMMERCIAL_HPND, R),
        (MIT_TEXT + "\nThe bundled foo/ directory is under the GNU GPL v3.\n", R),  # any GPL: restricted
        (MIT_TEXT + "\n" + BSD_TEXT, SW),
        (UNLICENSE_TEXT + "\n" + CC_BY_TEXT, BY),  # several grants: all apply
        ("Copyright (c) 2001-2002 Enthought, Inc.\nAll rights reserved.\n", R),
        ("Some custom terms\nwritten by the author\n", R),
        ("GPL-2+\n On Debian systems, the full text of the GNU General Public\n License "
         "version 2 can be found in /usr/share/common-licenses/GPL-2.", R),
        ("Expat\n" + MIT_TEXT, SW),
        ("Apache-2.0\n On Debian systems the text is in /usr/share/common-licenses/Apache-2.0.", SW),
        ("LicenseRef-Foo\n free text\n", R),
        ("Permission is hereby granted, free of charge, to any person obtaining", R),  # truncated
    ],
)
def test_full_license_text(text, tier):
    assert classify_license(text) == tier


def test_long_single_line_expression_is_still_an_expression():
    expr = " OR ".join(["GPL-2.0-or-later"] * 30 + ["MIT"])
    assert len(expr) > 200
    assert classify_license(expr) == SW


# --- trove classifiers ----------------------------------------------------------------------

CLASSIFIER_CASES = [
    ("License :: OSI Approved :: MIT License", SW),
    ("License :: OSI Approved :: BSD License", SW),
    ("License :: OSI Approved :: Apache Software License", SW),
    ("License :: OSI Approved :: ISC License (ISCL)", SW),
    ("License :: OSI Approved :: Python Software Foundation License", SW),
    ("License :: OSI Approved :: zlib/libpng License", SW),
    ("License :: OSI Approved :: MIT No Attribution License (MIT-0)", SW),
    ("License :: OSI Approved :: Boost Software License 1.0 (BSL-1.0)", SW),
    ("License :: OSI Approved :: University of Illinois/NCSA Open Source License", SW),
    ("License :: OSI Approved :: Historical Permission Notice and Disclaimer (HPND)", SW),
    ("License :: OSI Approved :: Universal Permissive License (UPL)", SW),
    ("License :: Public Domain", PD),
    ("License :: CC0 1.0 Universal (CC0 1.0) Public Domain Dedication", PD),
    ("License :: OSI Approved :: The Unlicense (Unlicense)", PD),
    ("License :: OSI Approved :: GNU General Public License v3 (GPLv3)", R),
    ("License :: OSI Approved :: GNU General Public License v2 or later (GPLv2+)", R),
    ("License :: OSI Approved :: GNU General Public License (GPL)", R),
    ("License :: OSI Approved :: GNU Library or Lesser General Public License (LGPL)", R),
    ("License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)", R),
    ("License :: OSI Approved :: GNU Affero General Public License v3", R),
    ("License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)", R),
    ("License :: OSI Approved :: Eclipse Public License 2.0 (EPL-2.0)", R),
    ("License :: OSI Approved :: European Union Public Licence 1.2 (EUPL 1.2)", R),
    ("License :: OSI Approved :: SIL Open Font License 1.1 (OFL-1.1)", R),
    ("License :: OSI Approved :: Artistic License", R),
    ("License :: Other/Proprietary License", R),
    ("License :: OSI Approved", R),  # too vague
    ("License :: DFSG approved", R),
    ("License :: Freely Distributable", R),
    ("License :: Freeware", R),
    ("License :: Free For Educational Use", R),
    ("License :: Free for non-commercial use", R),
    ("License :: Free To Use But Restricted", R),
    ("License :: Aladdin Free Public License (AFPL)", R),
]


@pytest.mark.parametrize(("classifier", "tier"), CLASSIFIER_CASES)
def test_single_classifier(classifier, tier):
    assert classify_license(None, [classifier]) == tier
    assert classify_license("", [classifier]) == tier
    assert classify_license("UNKNOWN", (classifier,)) == tier


MIT_C = "License :: OSI Approved :: MIT License"
BSD_C = "License :: OSI Approved :: BSD License"
APACHE_C = "License :: OSI Approved :: Apache Software License"
GPL_C = "License :: OSI Approved :: GNU General Public License v3 (GPLv3)"
PD_C = "License :: Public Domain"
VAGUE_C = "License :: OSI Approved"


@pytest.mark.parametrize(
    ("license", "classifiers", "tier"),
    [
        # several license classifiers: offered under each -> OR (least restrictive)
        (None, [MIT_C, GPL_C], SW),
        (None, [GPL_C, PD_C], PD),
        (None, [VAGUE_C, MIT_C], SW),
        (None, [VAGUE_C], R),
        # non-license classifiers are ignored
        (None, ["Programming Language :: Python :: 3", "Topic :: Utilities"], R),
        ("MIT", ["Programming Language :: Python :: 3"], SW),
        (None, ["Programming Language :: Python :: 3", MIT_C], SW),
        ("MIT", ["Intended Audience :: Developers", "License :: OSI Approved :: MIT License"], SW),
        # unreadable string -> classifiers decide
        ("Dual License", [BSD_C, APACHE_C], SW),
        ("UNKNOWN", [BSD_C], SW),
        ("see LICENSE", [MIT_C], SW),
        ("BSD-like", [BSD_C], SW),
        ("MIT-style", [MIT_C], SW),
        ("FooLicense-2", [MIT_C], SW),
        ("", [GPL_C], R),
        # both readable: the stricter wins (conflict -> restrictive)
        ("MIT", [MIT_C], SW),
        ("MIT", [MIT_C, GPL_C], SW),
        ("GPL-3.0", [MIT_C], R),
        ("GPLv3", [MIT_C, BSD_C], R),
        ("MIT", [GPL_C], R),
        ("Public Domain", [MIT_C], SW),
        ("CC0-1.0", [PD_C], PD),
        ("CC-BY-4.0", [MIT_C], BY),
        ("MIT OR GPL-3.0", [GPL_C], R),
        ("MIT", [VAGUE_C], R),  # the only classifier says nothing usable
        # an explicit restriction in the string is a signal, not "unknown"
        ("Proprietary", [MIT_C], R),
        ("Other/Proprietary License", [MIT_C], R),
        ("GPL-compatible", [MIT_C], R),
        ("All rights reserved", [BSD_C], R),
        ("LicenseRef-Custom", [MIT_C], R),
        ("MIT AND (", [MIT_C], R),  # malformed expression: explicit but broken
        ("Unlicensed", [MIT_C], R),
        ("Free for academic use only", [MIT_C], R),
        ("CC BY-NC 4.0", [MIT_C], R),
        ("MIT AND FooLicense", [MIT_C], R),
        # pasted texts
        (BSD_TEXT, [BSD_C], SW),
        (GPL_TEXT, [MIT_C], R),
        ("Some custom terms\nwritten by the author\n", [MIT_C], SW),
    ],
)
def test_license_with_classifiers(license, classifiers, tier):
    assert classify_license(license, classifiers) == tier


def test_classifier_argument_forms():
    assert classify_license(None, MIT_C) == SW  # a lone string, not its characters
    assert classify_license(None, iter([MIT_C])) == SW
    assert classify_license(None, None) == R  # type: ignore[arg-type]
    assert classify_license(None, ()) == R
    assert classify_license(None, [" License  ::  OSI Approved  ::  MIT License "]) == SW


@pytest.mark.parametrize(
    ("license", "tier"),
    [
        (MIT_C, SW),
        (PD_C, PD),
        (GPL_C, R),
        (VAGUE_C, R),
        ("License :: Other/Proprietary License", R),
    ],
)
def test_classifier_given_as_the_license_string(license, tier):
    assert classify_license(license) == tier


def test_vague_classifier_string_is_no_signal():
    assert classify_license(VAGUE_C, [BSD_C]) == SW
    assert classify_license(GPL_C, [BSD_C]) == R


def test_non_string_license_is_not_trusted():
    assert classify_license(123) == R  # type: ignore[arg-type]
    assert classify_license(float("nan")) == R  # type: ignore[arg-type]


def test_classification_returns_a_tier_name():
    for license, _ in CASES:
        assert classify_license(license) in TIERS


# --- SPDX normalization -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    ["GPL-2.0", "GPL-2.0+", "GPL-2.0-only", "GPL-2.0-or-later", "gpl-2.0-or-later", "GPLv2",
     "GPL v2", "GPL-2", "GPL-2+", "GPLv2+", "GPL version 2", "GPL v2 or later",
     "GNU GPL version 2 or any later version", "GNU General Public License v2.0"],
)
def test_gpl_spellings_all_restricted(spelling):
    assert classify_license(spelling) == R


@pytest.mark.parametrize("spelling", ["MIT", "mit", "Mit", "MIT License", "MIT LICENSE",
                                      "The MIT License", "mit license", "MIT Licence"])
def test_case_and_license_word_insensitive(spelling):
    assert classify_license(spelling) == SW


@pytest.mark.parametrize(
    "exception",
    ["Classpath-exception-2.0", "GCC-exception-3.1", "LLVM-exception", "Linux-syscall-note",
     "Autoconf-exception-3.0", "Bison-exception-2.2"],
)
def test_with_keeps_the_base_tier(exception):
    assert classify_license(f"Apache-2.0 WITH {exception}") == SW
    assert classify_license(f"GPL-2.0-or-later WITH {exception}") == R
    assert classify_license(f"MIT OR (GPL-2.0-only WITH {exception})") == SW


def test_with_binds_tighter_than_and_and_or():
    assert classify_license("GPL-2.0 WITH Classpath-exception-2.0 OR MIT") == SW
    assert classify_license("MIT AND GPL-2.0 WITH Classpath-exception-2.0") == R


# --- what license-expression (SPDX index, grammar) now reads for us --------------------------


@pytest.mark.parametrize(
    ("license", "tier"),
    [
        # "+": or later
        ("Apache-2.0+", SW),
        ("GPL-2.0+", R),
        ("LGPL-2.1+ OR MIT", SW),
        ("MIT AND GPL-3.0+", R),
        # deprecated SPDX ids, resolved by the index
        ("GPL-2.0 OR GPL-3.0", R),
        ("BSD-2-Clause-NetBSD", SW),
        ("Nunit", SW),  # deprecated for zlib-acknowledgement
        # WITH: an SPDX exception keeps the license's tier, in any case
        ("GPL-2.0-only WITH Classpath-exception-2.0", R),
        ("apache-2.0 with llvm-exception", SW),
        ("MIT WITH GPL-CC-1.0", SW),  # an SPDX exception without the word "exception"
        ("MIT WITH Commons-Clause", R),  # not an SPDX exception: a restriction
        ("MIT WITH LicenseRef-scancode-commons-clause", R),
        # LicenseRef-: restricted, even where the library's index aliases it to a license
        ("LicenseRef-Apache", R),
        ("LicenseRef-MIT-Bootstrap", R),
        ("LicenseRef-Apache OR MIT", SW),
        ("DocumentRef-x:LicenseRef-Apache", R),
        # malformed, although boolean.py would let it through: still restricted
        ("MIT AND Apache-2.0 AND", R),
        ("MIT OR Apache-2.0 OR", R),
        ("MIT (X11) Apache-2.0", R),
        ("Apache-2.0 WITH LLVM-exception (MIT)", R),
        ("(MIT OR Apache-2.0) WITH LLVM-exception", R),  # WITH takes one license
        ("MIT AND ()", R),
        ("MIT AND ( AND Apache-2.0", R),
    ],
)
def test_spdx_expressions_read_by_the_library(license, tier):
    assert classify_license(license) == tier


def test_licenseref_and_malformed_are_signals_not_unknown():
    mit = "License :: OSI Approved :: MIT License"
    assert classify_license("LicenseRef-Apache", [mit]) == R
    assert classify_license("MIT AND Apache-2.0 AND", [mit]) == R
    assert classify_license("NOASSERTION", [mit]) == SW  # no claim: the classifier decides


@pytest.mark.parametrize(
    ("license", "obligation"),
    [
        ("GPL-2.0+ OR MIT", "keep copyright and license notice (MIT)"),
        ("GPL-2.0 OR BSD-2-Clause-FreeBSD",
         "keep copyright and license notice (BSD-2-Clause-Views)"),
        ("Nunit", "keep copyright and license notice (zlib-acknowledgement)"),
        ("apache-2.0 WITH llvm-exception",
         "keep copyright and license notice (Apache-2.0 WITH LLVM-exception)"),
    ],
)
def test_obligation_names_the_current_spdx_id(license, obligation):
    assert license_obligation(license) == obligation


def test_spdx_index_is_offline(monkeypatch):
    """get_spdx_licensing() reads the index inside the wheel: no network needed."""
    import socket

    import license_expression

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    licensing = license_expression.get_spdx_licensing()
    assert licensing.parse("GPL-2.0+").render() == "GPL-2.0-or-later"
    assert licensing.parse("MIT WITH Linux-syscall-note").exception_symbol.is_exception


# --- properties of expressions ---------------------------------------------------------------

REPRESENTATIVE = {
    PD: ["CC0-1.0", "Unlicense", "PDDL-1.0", "Public Domain"],
    SW: ["MIT", "Apache-2.0", "BSD-3-Clause", "ISC", "Zlib", "BSL-1.0", "PSF-2.0", "0BSD"],
    BY: ["CC-BY-4.0", "CC-BY-SA-4.0", "CC-BY-3.0", "ODC-By-1.0"],
    R: ["GPL-3.0-only", "LGPL-2.1-or-later", "MPL-2.0", "CC-BY-NC-4.0", "LicenseRef-Foo",
        "EPL-2.0", "AGPL-3.0-only"],
}
ID_TIER = [(i, t) for t, ids in REPRESENTATIVE.items() for i in ids]
RANK = {t: n for n, t in enumerate(TIERS)}


def _max(tiers):
    return max(tiers, key=RANK.__getitem__)


def _min(tiers):
    return min(tiers, key=RANK.__getitem__)


@pytest.mark.parametrize(("license", "tier"), ID_TIER)
def test_representative_ids(license, tier):
    assert classify_license(license) == tier


def test_and_or_of_every_pair():
    for (a, ta), (b, tb) in itertools.product(ID_TIER, repeat=2):
        assert classify_license(f"{a} AND {b}") == _max([ta, tb]), (a, b)
        assert classify_license(f"{a} OR {b}") == _min([ta, tb]), (a, b)
        assert classify_license(f"({a}) and ({b})") == _max([ta, tb]), (a, b)


_leaf = st.sampled_from(ID_TIER)


@settings(max_examples=200, deadline=None)
@given(st.lists(_leaf, min_size=1, max_size=6))
def test_property_and_is_max_or_is_min(parts):
    ids = [i for i, _ in parts]
    tiers = [t for _, t in parts]
    assert classify_license(" AND ".join(ids)) == _max(tiers)
    assert classify_license(" OR ".join(ids)) == _min(tiers)


def _expr(draw_tree: tuple) -> tuple[str, str]:
    """Render a nested ('and'|'or', [children]) tree; return (expression, expected tier)."""
    if isinstance(draw_tree[0], str) and draw_tree[0] in ("and", "or"):
        op, children = draw_tree
        rendered = [_expr(c) for c in children]
        text = f" {op.upper()} ".join(f"({e})" for e, _ in rendered)
        tiers = [t for _, t in rendered]
        return text, (_max(tiers) if op == "and" else _min(tiers))
    return draw_tree


_tree = st.recursive(
    _leaf,
    lambda kids: st.tuples(st.sampled_from(["and", "or"]), st.lists(kids, min_size=1, max_size=3)),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(_tree)
def test_property_nested_expressions(tree):
    text, expected = _expr(tree)
    assert classify_license(text) == expected


def test_random_mixed_spellings_and_separators():
    """Free-text spellings and separators follow the same AND=max / OR=min rule."""
    spellings = {
        PD: ["Public Domain", "CC0", "Unlicense"],
        SW: ["MIT License", "Apache 2.0", "new BSD", "ISC license", "Expat", "PSF"],
        BY: ["CC BY 4.0", "CC BY-SA 4.0"],
        R: ["GPLv3", "LGPL-2.1+", "MPL 2.0", "CC BY-NC 4.0", "Proprietary"],
    }
    pool = [(s, t) for t, ss in spellings.items() for s in ss]
    rng = random.Random(1234)
    for _ in range(300):
        parts = rng.sample(pool, rng.randint(2, 4))
        tiers = [t for _, t in parts]
        and_sep = rng.choice([" AND ", " and ", " & ", ", "])
        or_sep = rng.choice([" OR ", " or ", " / ", "/"])
        assert classify_license(and_sep.join(s for s, _ in parts)) == _max(tiers), parts
        assert classify_license(or_sep.join(s for s, _ in parts)) == _min(tiers), parts


def test_never_promoted_by_noise_around_restricted():
    """Decorating a restricted license never makes it trainable."""
    for lic in ["GPL-3.0", "CC-BY-NC-4.0", "Proprietary", "MPL-2.0"]:
        for wrap in ["{}", "({})", "License: {}", "{} License", "{}.", '"{}"', "{} AND MIT",
                     "MIT AND {}", "{} WITH Foo", "{} (see LICENSE)"]:
            assert classify_license(wrap.format(lic)) == R, wrap.format(lic)


# --- parse_tiers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("pd,sw", ("pd", "sw")),
        ("pd", ("pd",)),
        ("sw,pd", ("pd", "sw")),  # canonical order
        ("pd, sw ,by", ("pd", "sw", "by")),
        ("PD,SW", ("pd", "sw")),
        ("pd,pd,sw", ("pd", "sw")),
        ("restricted", ("restricted",)),
        ("all", TIERS),
        ("ALL", TIERS),
        ("pd,all", TIERS),
        ("pd,sw,by,restricted", TIERS),
        ("pd,sw,", ("pd", "sw")),
    ],
)
def test_parse_tiers(spec, expected):
    assert parse_tiers(spec) == expected


@pytest.mark.parametrize("spec", ["", "   ", ",", " , "])
def test_parse_tiers_empty(spec):
    with pytest.raises(ValueError, match="pd, sw, by, restricted"):
        parse_tiers(spec)


@pytest.mark.parametrize("spec", ["pd,xx", "permissive", "pdsw", "pd;sw", "cc-by"])
def test_parse_tiers_unknown_names_the_valid_tiers(spec):
    with pytest.raises(ValueError) as info:
        parse_tiers(spec)
    message = str(info.value)
    for tier in TIERS:
        assert tier in message
    assert "unknown" in message


def test_tier_constants():
    assert TIERS == ("pd", "sw", "by", "restricted")
    assert frozenset({"pd", "sw", "by"}) == TRAINABLE_TIERS
    assert "restricted" not in TRAINABLE_TIERS
    assert set(TRAINABLE_TIERS) < set(TIERS)


# --- stricter --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("pd", "sw", "sw"),
        ("sw", "pd", "sw"),
        ("sw", "by", "by"),
        ("by", "restricted", "restricted"),
        ("pd", "restricted", "restricted"),
        ("pd", "pd", "pd"),
        ("by", "by", "by"),
        ("sw", "bogus", "restricted"),  # an unrecognized tier never loosens anything
        ("bogus", "pd", "restricted"),
        ("", "sw", "restricted"),
    ],
)
def test_stricter(a, b, expected):
    assert stricter(a, b) == expected


def test_stricter_is_max_of_tier_order():
    for a, b in itertools.product(TIERS, repeat=2):
        assert stricter(a, b) == stricter(b, a) == TIERS[max(TIERS.index(a), TIERS.index(b))]
        assert stricter(a, a) == a


# --- license_obligation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("license", "obligation"),
    [
        ("CC-BY-4.0", "attribution required (CC-BY-4.0)"),
        ("CC BY 4.0", "attribution required (CC-BY-4.0)"),
        ("Creative Commons Attribution 4.0 International", "attribution required (CC-BY-4.0)"),
        ("CC-BY-SA-4.0", "attribution + share-alike (CC-BY-SA-4.0)"),
        ("CC BY-SA 3.0", "attribution + share-alike (CC-BY-SA-3.0)"),
        ("CC-BY-SA-4.0 OR CC-BY-4.0", "attribution required (CC-BY-4.0)"),
        ("CC-BY-SA-4.0 AND MIT", "attribution + share-alike (CC-BY-SA-4.0 AND MIT)"),
        ("Public Domain", "none (public domain)"),
        ("CC0-1.0", "none (public domain)"),
        ("Unlicense", "none (public domain)"),
        ("MIT", "keep copyright and license notice (MIT)"),
        ("MIT License", "keep copyright and license notice (MIT)"),
        ("Apache 2.0", "keep copyright and license notice (Apache-2.0)"),
        ("Apache License, Version 2.0", "keep copyright and license notice (Apache-2.0)"),
        ("new BSD", "keep copyright and license notice (BSD-3-Clause)"),
        ("BSD", "keep copyright and license notice (BSD)"),
        ("PSF", "keep copyright and license notice (PSF-2.0)"),
        ("MIT OR GPL-3.0", "keep copyright and license notice (MIT)"),
        ("GPL-3.0 OR MIT", "keep copyright and license notice (MIT)"),
        ("Apache-2.0 AND MIT", "keep copyright and license notice (Apache-2.0 AND MIT)"),
        ("Apache-2.0 WITH LLVM-exception",
         "keep copyright and license notice (Apache-2.0 WITH LLVM-exception)"),
        (MIT_TEXT, "keep copyright and license notice (MIT)"),
        ("GPL-3.0", "not licensed for reuse"),
        ("CC-BY-NC-4.0", "not licensed for reuse"),
        ("UNKNOWN", "not licensed for reuse"),
        ("", "not licensed for reuse"),
        (None, "not licensed for reuse"),
        ("MIT AND GPL-2.0", "not licensed for reuse"),
        ("BSD-like", "not licensed for reuse"),
    ],
)
def test_license_obligation(license, obligation):
    assert license_obligation(license) == obligation


def test_obligation_agrees_with_tier():
    prefixes = {
        PD: ("none (",),
        SW: ("keep copyright and license notice (",),
        BY: ("attribution required (", "attribution + share-alike ("),
        R: ("not licensed for reuse",),
    }
    for license, tier in CASES:
        assert license_obligation(license).startswith(prefixes[tier]), license
