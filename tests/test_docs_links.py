"""The pages' relative links resolve, and measurements/README.md indexes every raw file."""

import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MEASUREMENTS = os.path.join(ROOT, "measurements")
INDEX = os.path.join(MEASUREMENTS, "README.md")
PAGES = [os.path.join(ROOT, "README.md"), INDEX] + sorted(
    os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(page):
    """The targets of the page's Markdown links and images that point into the repository."""
    with open(page, encoding="utf-8") as f:
        text = _FENCE.sub("", f.read())
    text = _CODE.sub(lambda m: "code" if "](" in m.group(2) else m.group(0), text)
    out = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor of the same page
        out.append(target.split("#", 1)[0])
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    base = os.path.dirname(page)
    broken = [t for t in relative_links(page) if not os.path.exists(os.path.normpath(os.path.join(base, t)))]
    assert not broken, f"{os.path.relpath(page, ROOT)}: links to missing files {broken}"


def test_every_measurement_is_indexed():
    linked = {os.path.normpath(os.path.join(MEASUREMENTS, t)) for t in relative_links(INDEX)}
    files = {os.path.normpath(os.path.join(d, f)) for d, _, fs in os.walk(MEASUREMENTS) for f in fs}
    missing = sorted(os.path.relpath(p, MEASUREMENTS) for p in files - linked - {os.path.normpath(INDEX)})
    assert not missing, f"measurements/README.md does not list {missing}"
