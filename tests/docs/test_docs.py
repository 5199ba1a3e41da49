"""The documentation stays true: links resolve, the README stays a front page, the run-config table matches the
dataclasses, and every file or module the pages name exists."""
import re
from pathlib import Path

import pytest

import config_table

ROOT = config_table.ROOT
README_LIMIT = 12 * 1024  # bytes: a front page, not a reference

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")
# paths under the repository's own top-level directories, as written in prose or commands
REPO_PATH = re.compile(r"(?<![\w/.-])((?:launcher|model|data_pipeline|evidence|benchmarks|tests|slurm|ds_configs|docs)"
                       r"/[\w./-]*[\w/])")
MODULE = re.compile(r"python -m ((?:launcher|model|data_pipeline|evidence|benchmarks)(?:\.\w+)+)")
NARRATION = [(re.compile(r"load average", re.I), "a machine load average"),
             (re.compile(r"\bissue[s]? #?\d+", re.I), "an issue number")]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("*/README.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks (links and headings live outside them)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose(page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(root)}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: {path_part} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


def test_relative_links_resolve():
    problems = [p for page in pages() for p in broken_links(page)]
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


def linked_pages(page: Path) -> set[Path]:
    """The markdown pages (and directories' README.md) that ``page`` links to."""
    found = set()
    for target in LINK.findall(prose(page.read_text())):
        path_part = target.partition("#")[0]
        if not path_part or re.match(r"[a-z]+:", target):
            continue
        dest = (page.parent / path_part).resolve()
        dest = dest / "README.md" if dest.is_dir() else dest
        if dest.suffix == ".md" and dest.is_file():
            found.add(dest)
    return found


def unreachable(start: Path, wanted: list[Path]) -> list[Path]:
    """The pages of ``wanted`` that no chain of links from ``start`` reaches."""
    seen, todo = {start.resolve()}, [start.resolve()]
    while todo:
        for dest in linked_pages(todo.pop()) - seen:
            seen.add(dest)
            todo.append(dest)
    return [p for p in wanted if p.resolve() not in seen]


def test_every_docs_page_is_reachable_from_the_readme():
    missing = unreachable(ROOT / "README.md", sorted((ROOT / "docs").rglob("*.md")))
    assert not missing, ("pages no link from README.md leads to: " + ", ".join(str(p.relative_to(ROOT)) for p in missing)
                         + "; add a row to README.md's Documentation table (or link the page from a docs page)")


def test_readme_is_a_front_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, (f"README.md is {size} bytes, over {README_LIMIT}: move reference material to a "
                                  f"docs/ page and link it")


def test_no_narration():
    problems = [f"{page.relative_to(ROOT)}: {what}: {m.group(0)!r}" for page in pages()
                for pattern, what in NARRATION for m in pattern.finditer(page.read_text())]
    assert not problems, "the docs are reference, not a lab notebook:\n" + "\n".join(problems)


def test_named_files_and_modules_exist():
    problems = []
    for page in pages():
        text = page.read_text()
        for path in sorted(set(REPO_PATH.findall(text))):
            if not (ROOT / path).exists():
                problems.append(f"{page.relative_to(ROOT)}: {path} does not exist")
        for module in sorted(set(MODULE.findall(text))):
            base = ROOT / module.replace(".", "/")
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                problems.append(f"{page.relative_to(ROOT)}: python -m {module}: no such module")
    assert not problems, "the docs name things that are not there:\n" + "\n".join(problems)


def test_config_table_matches_the_dataclasses():
    page = config_table.PAGE
    current = config_table.page_block(page.read_text())
    assert current is not None, f"{page}: the config-table markers are missing"
    assert current == config_table.block(), (f"{page.relative_to(ROOT)}: the run-config table is out of date with "
                                             f"launcher/config.py; regenerate it: python tests/docs/config_table.py")


def test_config_table_names_every_field():
    """Independent of the generator: every dotted field of the run config appears as a row of the table."""
    from launcher.config import describe_fields
    names, section = [], ""
    for line in describe_fields().splitlines():
        key = line.split(":", 1)[0]
        if line.startswith("  "):
            names.append(f"{section}.{key.strip()}")
        elif line.rstrip().endswith(":"):
            section = key
        else:
            names.append(key)
    text = config_table.PAGE.read_text()
    missing = [n for n in names if f"| `{n}` |" not in text]
    assert names and not missing, f"docs/training.md has no row for {missing}"


@pytest.mark.parametrize("target,expected", [("[a](nowhere.md)", "nowhere.md does not exist"),
                                             ("[a](other.md#no-such-heading)", "no heading with anchor #no-such"),
                                             ("![a](img/missing.png)", "img/missing.png does not exist")])
def test_broken_link_is_reported(tmp_path, target, expected):
    (tmp_path / "other.md").write_text("# Other\n")
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nsee {target}, [fine](other.md#other) and [web](https://example.org/x.md)\n\n"
                    f"```\n[ignored](in-a-code-block.md)\n```\n")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 1 and expected in problems[0], problems


def test_anchors_follow_github(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("# Attention (`model.attention: auto | flash | sdpa`)\n## Faults\n## Faults\n"
                    "```\n# not a heading\n```\n")
    assert anchors(page) == {"attention-modelattention-auto--flash--sdpa", "faults", "faults-1"}


def test_unreachable_page_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("[a](docs/a.md)\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n[b](b.md#b)\n")
    (tmp_path / "docs" / "b.md").write_text("# B\n")
    (tmp_path / "docs" / "c.md").write_text("# C\n[a](a.md)\n")  # links out, but nothing links to it
    pages_ = sorted((tmp_path / "docs").glob("*.md"))
    assert unreachable(tmp_path / "README.md", pages_) == [tmp_path / "docs" / "c.md"]
