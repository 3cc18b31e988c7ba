"""The documentation: README.md is the short front door, docs/ holds the pages, and the two generated pages
(docs/settings.md, docs/api.md) are exactly what scripts/gen_docs.py writes from the code. Every relative link
points to a file that exists (and a heading that exists, where it names one), and `mkdocs build --strict` passes.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$', re.MULTILINE)


def gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are code, not links."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.DOTALL)


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings, as mkdocs (toc) and GitHub spell them."""
    found = set()
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE):
        words = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        found.add(re.sub(r"[-\s]+", "-", words))  # mkdocs' toc
        found.add(re.sub(r"\s", "-", words))  # GitHub
    return found


def test_generated_pages_are_current():
    """docs/settings.md and docs/api.md are what gen_docs writes from server.config.Settings and the app's OpenAPI
    document: a change to either must come with `python scripts/gen_docs.py`."""
    module = gen_docs()
    expected = module.pages()
    assert set(expected) == {DOCS / "settings.md", DOCS / "api.md"}
    stale = [path.relative_to(ROOT).as_posix() for path in module.stale(expected)]
    assert not stale, f"stale generated pages {stale}: run `python scripts/gen_docs.py`"


def test_generated_pages_cover_the_code():
    """Every setting has its row, and every route of the OpenAPI document its section."""
    module = gen_docs()
    from server.config import Settings
    from server.main import create_app

    settings = module.settings_page()
    for name in Settings.model_fields:
        assert f"| `PROMPTKD_{name.upper()}` |" in settings, name
    api = module.api_page()
    for path, item in create_app().openapi()["paths"].items():
        for method in item:
            if method in module.METHODS:
                assert f"### `{method.upper()} {path}`" in api, (method, path)
    assert module.api_page() == api and module.settings_page() == settings  # deterministic


def test_gen_docs_check_names_the_stale_page(tmp_path, monkeypatch, capsys):
    module = gen_docs()
    page = tmp_path / "settings.md"
    page.write_text("old\n")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "pages", lambda: {page: "new\n"})
    assert module.main(["--check"]) == 1
    assert "settings.md is stale" in capsys.readouterr().err
    assert page.read_text() == "old\n"  # --check writes nothing
    assert module.main([]) == 0 and page.read_text() == "new\n"
    assert module.main(["--check"]) == 0


def test_readme_is_the_short_front_door():
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n") + (not text.endswith("\n"))
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move text into docs/"
    # CI runs the README's test command (.ci/run -> scripts/test.sh): it must stay there, as must the demo's.
    assert "bash scripts/test.sh" in text and "bash scripts/demo.sh" in text


def test_relative_links_point_to_existing_files():
    broken = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        for target in LINK.findall(prose(text)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE) or target.startswith("//"):
                continue  # http(s):, mailto:
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} (no heading #{anchor})")
            elif page.parent == DOCS and DOCS not in dest.parents:
                broken.append(f"{where} (outside docs/: mkdocs --strict refuses it; use a code span)")
        for included in SNIPPET.findall(text):
            if not (ROOT / included).is_file():
                broken.append(f"{page.relative_to(ROOT)}: snippet {included} (no such file)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs" and config["site_dir"] == "site"

    def walk(entries):
        for entry in entries:
            for value in (entry.values() if isinstance(entry, dict) else [entry]):
                yield from (walk(value) if isinstance(value, list) else [value])

    listed = list(walk(config["nav"]))
    assert sorted(listed) == sorted(p.name for p in DOCS.glob("*.md")), "mkdocs.yml's nav must list every page once"


def test_mkdocs_build_strict(tmp_path):
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install mkdocs-material)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert "Threat model" in (tmp_path / "site" / "security" / "index.html").read_text(encoding="utf-8")
