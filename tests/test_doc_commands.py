"""Every shell command the docs show parses with today's code: a renamed flag or script breaks this test, not a
reader's copy-paste. ``lora2 glue`` lines also build their GlueArgs; ``benchmarks/glue.py run`` lines dry-run."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "examples").glob("*.md"))]
sys.path.insert(0, str(REPO / "benchmarks"))


def commands(path: Path) -> list[str]:
    """The command lines of a document's ```bash blocks: continuations joined, comments and a trailing & cut."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words.pop(0)
            if words and words[-1] == "&":
                words.pop()
            if words:
                out.append(" ".join(shlex.quote(w) for w in words))
    return out


ALL = [(p.relative_to(REPO).as_posix(), c) for p in DOCS for c in commands(p)]


def test_the_docs_show_the_commands_this_test_checks():
    shown = {c.split()[0] + " " + c.split()[1] for _, c in ALL}
    assert {"lora2 glue", "lora2 export", "python benchmarks/glue.py", "python benchmarks/speed.py", "make test"} <= shown


@pytest.mark.parametrize(("doc", "command"), ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_documented_command_parses(doc, command, tmp_path, monkeypatch, capsys):
    words = shlex.split(command)
    monkeypatch.chdir(REPO)
    if words[0] == "make":
        targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))
        assert set(words[1:]) <= targets, f"{doc}: no Makefile target {set(words[1:]) - targets}"
    elif words[0] == "lora2":
        from lora2.cli import build_parser, glue_args_from_namespace

        ns = build_parser().parse_args(words[1:])
        if ns.command == "glue":
            glue_args_from_namespace(ns)
    elif words[:2] == ["python", "benchmarks/glue.py"]:
        import glue

        argv = words[2:]
        ns = glue.build_parser().parse_args(argv)
        if ns.command == "run":  # a dry run on an empty results directory: every option is accepted
            argv = [a for i, a in enumerate(argv) if a != "--workers" and (i == 0 or argv[i - 1] != "--workers")]
            if "--results-dir" in argv:
                argv[argv.index("--results-dir") + 1] = str(tmp_path / "res")
            else:
                argv = ["--results-dir", str(tmp_path / "res"), *argv]
            assert glue.main([*argv, "--dry-run"]) == 0, capsys.readouterr()
    elif words[:2] == ["python", "benchmarks/speed.py"]:
        import speed

        speed.parse_args(words[2:])
    elif words[0] == "torchrun":
        script = next(w for w in words[1:] if w.endswith(".py"))
        assert (REPO / script).is_file(), f"{doc}: {script} does not exist"
    else:
        pytest.fail(f"{doc}: a command this test does not know how to check: {command}")
