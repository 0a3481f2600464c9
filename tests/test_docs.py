"""Every fenced Python block of README.md and docs/*.md runs, exactly as the reader sees it.

A document's blocks run in order in one namespace (later blocks use what earlier ones
defined), in a scratch working directory, so the files they write land there. Only the
data is made small: the IDX reader returns the first samples of each split, so an example
that trains on Fashion-MNIST takes seconds. A block that fails names its document and line
in the traceback (``README.md:36``).
"""

import glob
import os
import re

import pytest

from mtz_tf import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
SAMPLES = {"train": 3000, "test": 1000}
"""Samples per split that the examples see."""

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(path: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced ``python`` block of a Markdown file (relative to the
    checkout), ``line`` the 1-based line of its first code line."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def test_the_docs_have_examples_to_run():
    counts = {path: len(python_blocks(path)) for path in DOCUMENTS}
    assert counts["README.md"] >= 1 and sum(counts.values()) >= 6, counts


def test_block_extraction_keeps_code_and_line_numbers(tmp_path):
    text = "# t\n\n```python\nx = 1\n```\n\n```sh\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    (tmp_path / "doc.md").write_text(text)
    assert python_blocks(str(tmp_path / "doc.md")) == [(4, "x = 1\n"), (11, "y = 2\nz = 3\n")]


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if python_blocks(d)])
def test_examples_run(document, tmp_path, monkeypatch):
    blocks = python_blocks(document)
    code = "".join(block for _, block in blocks)
    # Paths like ../shared/data/... are relative to the checkout, as a reader runs them.
    work = tmp_path / "checkout"
    work.mkdir()
    for name in re.findall(r"\.\./([\w.-]+)/", code):
        target = os.path.join(ROOT, "..", name)
        if not os.path.exists(target):
            pytest.skip(f"{document} reads ../{name}/, which this machine does not have")
        if not os.path.lexists(tmp_path / name):
            os.symlink(target, tmp_path / name)
    load_idx = data.load_idx

    def first_samples(data_dir, split="train"):
        images, labels = load_idx(data_dir, split)
        return images[: SAMPLES[split]], labels[: SAMPLES[split]]

    monkeypatch.setattr(data, "load_idx", first_samples)
    monkeypatch.chdir(work)
    namespace = {"__name__": "__main__"}
    for line, block in blocks:
        # Blank lines before the block keep tracebacks on the document's own line numbers.
        source = "\n" * (line - 1) + block
        exec(compile(source, os.path.join(ROOT, document), "exec"), namespace)
