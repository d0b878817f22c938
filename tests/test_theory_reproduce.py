"""Smoke test of the theory reproduction: quick mode writes theory.md and every plot it links."""

import re

from klalign.theory.reproduce import main


def test_reproduce_quick_writes_markdown_and_plots(tmp_path, capsys):
    main(["--out", str(tmp_path), "--quick"])
    markdown = (tmp_path / "theory.md").read_text()
    assert capsys.readouterr().out.strip() == markdown.strip()
    for heading in ("Best-of-N", "tilted optimum", "Nash-MP", "KL-regularised UCB"):
        assert heading in markdown
    plots = re.findall(r"\]\(([^)]+\.png)\)", markdown)
    assert len(plots) == 5
    for plot in plots:
        assert (tmp_path / plot).stat().st_size > 1000
