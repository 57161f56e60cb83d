"""The documentation holds together: a short README, links and anchors that resolve, commands that exist.

Pure file reads (no subprocess, no import of the package's modules): a moved module or a renamed
heading breaks a link or a ``python -m`` command silently otherwise.
"""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
DOC_FILES = [ROOT / name for name in ("README.md", "CONTRIBUTING.md", "SECURITY.md", "EXPERIMENTS.md",
                                      "deploy/README.md", "benchmarks/README.md")]
DOC_FILES += sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of brackets
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, ...
# `python -m <module>`, also broken over a line; the packages this repository runs as modules
COMMAND = re.compile(r"\bpython3?\s+-m\s+((?:meduniverse_flwr|simulation|deploy)(?:\.[A-Za-z_]\w*)*)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings there are not Markdown)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation but hyphens dropped, spaces to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_targets(text: str) -> list[str]:
    """The targets of the Markdown links and images outside code."""
    targets = []
    for line in prose_lines(text):
        targets += LINK.findall(CODE_SPAN.sub("", line))
    return targets


def broken_links(path: Path) -> list[str]:
    """One line per relative link of ``path`` whose file, directory or heading anchor does not exist."""
    problems = []
    for target in link_targets(path.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = unquote(target).partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                            f"link '{target}': no such file or directory")
        elif anchor and resolved.suffix == ".md" and resolved.is_file() and anchor not in anchors(resolved):
            problems.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                            f"link '{target}': no heading '#{anchor}' in {resolved.name}")
    return problems


def module_exists(module: str) -> bool:
    """``python -m module`` would find it: ``module.py`` or a package with ``__main__.py``."""
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def missing_modules(path: Path) -> list[str]:
    """Every ``python -m`` command in ``path`` (prose and code blocks) whose module does not exist."""
    commands = COMMAND.findall(path.read_text(encoding="utf-8"))
    return sorted({module for module in commands if not module_exists(module)})


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------ the real files


def test_the_readme_stays_a_short_guide():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"


def test_the_docs_folder_has_pages_to_check():
    assert len(DOC_FILES) > 6 and all(path.is_file() for path in DOC_FILES)


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_every_python_m_command_names_a_module_that_exists(path):
    assert missing_modules(path) == []


def test_the_readme_keeps_the_two_commands_and_the_fast_tier():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in text  # .ci/run runs the README's test command, verbatim
    assert 'pip install -e ".[sim]"' in text and "flwr run ." in text
    assert 'python -m pytest -m "not deployment"' in text


# ------------------------------------------------------------------ the checkers find what they must


@pytest.fixture
def pages(tmp_path):
    """A tiny documentation tree: a page with headings, a folder, an image."""
    (tmp_path / "guide.md").write_text(
        "# Guide\n\n## Reading `results.json`\n\n## Watching a run: the log, TensorBoard\n\n"
        "## Steps\n\n## Steps\n\n```bash\n# not a heading\n```\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "figure.png").write_bytes(b"\x89PNG")
    return tmp_path


GOOD_LINKS = [
    "[g](guide.md)", "[g](guide.md#reading-resultsjson)", "[g](guide.md#watching-a-run-the-log-tensorboard)",
    "[g](guide.md#steps-1)", "[folder](sub/)", "![fig](figure.png)", "[self](#local)",
    "[web](https://example.org/missing.md)", "[mail](mailto:someone@example.org)",
    "`[in code](nowhere.md)`", "```\n[in a fence](nowhere.md)\n```",
    "[`code` in the text](guide.md)",
]
BAD_LINKS = [
    ("[g](missing.md)", "no such file"),
    ("![fig](missing.png)", "no such file"),
    ("[g](sub/missing/)", "no such file"),
    ("[g](guide.md#reading-results-json)", "no heading '#reading-results-json'"),
    ("[g](guide.md#not-a-heading)", "no heading '#not-a-heading'"),
    ("[g](guide.md#steps-2)", "no heading '#steps-2'"),
    ("[self](#elsewhere)", "no heading '#elsewhere'"),
    ("see [the `guide`](../nowhere/guide.md) there", "no such file"),
]


@pytest.mark.parametrize("link", GOOD_LINKS)
def test_a_link_that_resolves_passes(pages, link):
    page = pages / "page.md"
    page.write_text(f"# Page\n\n## Local\n\n{link}\n", encoding="utf-8")
    assert broken_links(page) == []


@pytest.mark.parametrize("link, problem", BAD_LINKS)
def test_a_planted_broken_link_is_named(pages, link, problem):
    page = pages / "page.md"
    page.write_text(f"# Page\n\n## Local\n\nSome text, {link}, more text.\n", encoding="utf-8")
    found = broken_links(page)
    assert len(found) == 1 and problem in found[0], found


def test_a_planted_missing_module_is_named(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `python -m meduniverse_flwr.report` and\n"
                    "```bash\npython -m meduniverse_flwr.pretrain --epochs 1\n```\n"
                    "then `python -m\nmeduniverse_flwr.tools.export`, or python3 -m meduniverse_flwr.no_such.thing.\n",
                    encoding="utf-8")
    assert missing_modules(page) == ["meduniverse_flwr.no_such.thing", "meduniverse_flwr.pretrain"]


@pytest.mark.parametrize("heading, anchor", [
    ("Reading `results.json`", "reading-resultsjson"),
    ("Real data: MedMNIST, any .npz, image folders, DICOM", "real-data-medmnist-any-npz-image-folders-dicom"),
    ("Scale on paper: 100 sites x ViT-B/16 at 224 px on GPUs", "scale-on-paper-100-sites-x-vit-b16-at-224-px-on-gpus"),
    ("GPU: the ClientApp's fine-tuning vs a bare timm loop", "gpu-the-clientapps-fine-tuning-vs-a-bare-timm-loop"),
    ("`arrival2`: the answer (test splits, seeds 0-7)", "arrival2-the-answer-test-splits-seeds-0-7"),
    ("A [linked](x.md) heading", "a-linked-heading"),
])
def test_anchors_follow_githubs_rules(heading, anchor):
    assert slug(heading) == anchor
