"""The documentation runs as printed: every command in a code block of README.md and docs/*.md names a script of
the repository and only flags that script's `--help` lists, `bash demo.sh` only modes demo.sh has, every `pip
install -r FILE` a file of the repository and `pip install ".[extra]"` an extra of pyproject.toml, and every
relative link (and every docs/ file named in the text) leads to an existing file and, with #anchor, heading.

Commands are the lines of fenced code blocks that start with `python <script>.py`, `torchrun ... <script>.py`,
`bash demo.sh` or `bash test.sh` (line continuations joined, `# comments` dropped, placeholders such as <run> kept
as words). Each script's `--help` (and `<script> <subcommand> --help` for benchmark.py's subcommands) runs from the
repository root, in one process per script (a script that imports PyTorch pays for it once), the scripts in
parallel. CPU only; nothing here imports PyTorch (tests/conftest.py does).
"""
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
PYTHONS = re.compile(r"^python(3(\.\d+)?)?$|(^|/)\.venv/bin/python3?$")
FENCE = re.compile(r"^\s*(```|~~~)")
SEPARATORS = {"&&", "||", ";", "|"}
HELP_TIMEOUT = 120


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------------ reading the pages
def code_blocks(text: str):
    """(first line number, lines) of each fenced code block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def logical_lines(lines, start):
    """Lines with their `\\` continuations joined: (line number of the first, text)."""
    out, pending, first = [], "", start
    for number, line in enumerate(lines, start):
        if not pending:
            first = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    if pending:
        out.append((first, pending))
    return out


def split_words(text: str):
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in a line that is not a command
        return None


def commands_of(words):
    """The commands of one line: the words between `&&`, `;`, `|`, without leading VAR=value assignments."""
    current = []
    for word in words + [";"]:
        if word in SEPARATORS:
            while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                current.pop(0)
            if current:
                yield current
            current = []
        else:
            current.append(word)


def parse(words):
    """(kind, script, arguments) of a documented command, or None when it is not one we check.
    kind: "python" (a script, also under torchrun) or "bash" (demo.sh, test.sh)."""
    if not words:
        return None
    head = words[0]
    if PYTHONS.search(head):
        if len(words) > 1 and words[1].endswith(".py"):
            return "python", words[1], words[2:]
        return None  # python -m ..., python -c ...
    if head == "torchrun":
        for i, word in enumerate(words[1:], 1):
            if word.endswith(".py"):
                return "python", word, words[i + 1:]
        return None
    if head == "bash" and len(words) > 1 and words[1] in ("demo.sh", "test.sh"):
        return "bash", words[1], words[2:]
    return None


def documented_commands():
    found = []
    for page in PAGES:
        for start, lines in code_blocks(page.read_text(encoding="utf-8")):
            for number, text in logical_lines(lines, start):
                words = split_words(text)
                if words is None:
                    continue
                for command in commands_of(words):
                    parsed = parse(command)
                    if parsed:
                        found.append((f"{rel(page)}:{number}", text.strip(), *parsed))
    return found


COMMANDS = documented_commands()
PYTHON_COMMANDS = [c for c in COMMANDS if c[2] == "python"]
BASH_COMMANDS = [c for c in COMMANDS if c[2] == "bash"]


# --------------------------------------------------------------------------------------------- the scripts' help
def subcommand_of(arguments):
    """The first argument when it may be a subcommand (benchmark.py train ...): a bare word."""
    if arguments and re.match(r"^[A-Za-z][\w-]*$", arguments[0]):
        return arguments[0]
    return None


def is_subcommand_help(script, subcommand, help_text):
    """Whether `script subcommand --help` answered as a subparser does (`usage: script subcommand ...`)."""
    return bool(help_text) and help_text.startswith(f"usage: {Path(script).name} {subcommand} ")


def listed_flags(help_text: str) -> set:
    """The long options argparse lists: in the usage lines and at the start of each option line (not the
    description's prose, which may mention flags of other commands)."""
    flags, in_usage = set(), False
    for line in help_text.splitlines():
        if line.startswith("usage:"):
            in_usage = True
        elif in_usage and not line.strip():
            in_usage = False
        if in_usage:
            flags.update(re.findall(r"(?<![\w-])--[A-Za-z0-9][\w-]*", line))
            continue
        match = re.match(r"^\s+(-\w[\s,]|--)", line)
        if match:
            invocation = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            flags.update(re.findall(r"(?<![\w-])--[A-Za-z0-9][\w-]*", invocation))
    return flags


# Runs `<script> [<subcommand>] --help` for each variant in one process, as `python <script> ...` would run it
# (sys.argv, sys.path[0] the script's folder, __main__), so that a script importing PyTorch pays for it once; prints
# {variant: [status, stdout, stderr]} as JSON.
HELPER = r"""
import contextlib, io, json, os, runpy, sys, traceback
script, variants = sys.argv[1], json.loads(sys.argv[2])
sys.path[0] = os.path.dirname(os.path.abspath(script))
answers = {}
for variant in variants:
    sys.argv = [script] + ([variant] if variant else []) + ["--help"]
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            status = 1
    answers[variant or ""] = [status, out.getvalue(), err.getvalue()]
sys.__stdout__.write(json.dumps(answers))
"""


def run_helps(script: str, variants: list) -> dict:
    """variant (a subcommand or None) -> (help text, error) of `python <script> [<variant>] --help`, run from the
    repository root."""
    names = [v or "" for v in variants]
    env = dict(os.environ, COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")
    shown = lambda v: " ".join([script] + ([v] if v else []) + ["--help"])
    try:
        done = subprocess.run([sys.executable, "-c", HELPER, script, json.dumps(names)], cwd=ROOT,
                              capture_output=True, text=True, timeout=HELP_TIMEOUT, env=env)
        answers = json.loads(done.stdout)
    except subprocess.TimeoutExpired:
        return {v: (None, f"`{shown(v)}` took more than {HELP_TIMEOUT} s") for v in variants}
    except ValueError:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        return {v: (None, f"`{shown(v)}` (from {ROOT}) failed:\n{tail}") for v in variants}
    results = {}
    for v in variants:
        status, out, err = answers[v or ""]
        if status != 0:
            tail = "\n".join((err or out).strip().splitlines()[-5:])
            results[v] = (None, f"`{shown(v)}` (from {ROOT}) failed with status {status}:\n{tail}")
        else:
            results[v] = (out, None)
    return results


@pytest.fixture(scope="session")
def helps():
    """The --help of each documented command, keyed by (script, first argument): ((text, error), subcommand or
    None). One process per script, all in parallel; a first argument that may be a subcommand is tried as one."""
    wanted = {}
    for _, _, _, script, arguments in PYTHON_COMMANDS:
        if (ROOT / script).is_file():
            wanted.setdefault(script, {None}).add(subcommand_of(arguments))
    scripts = sorted(wanted)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        answers = dict(zip(scripts, pool.map(lambda s: run_helps(s, sorted(wanted[s], key=lambda v: v or "")),
                                             scripts)))
    results = {}
    for script, variants in wanted.items():
        for sub in variants:
            text = answers[script][sub][0] if sub is not None else None
            if sub is not None and is_subcommand_help(script, sub, text):
                results[(script, sub)] = (answers[script][sub], sub)
            else:
                results[(script, sub)] = (answers[script][None], None)
    return results


# ------------------------------------------------------------------------------------------------------ tests
def test_the_pages_hold_commands():
    assert PAGES[0].is_file() and len(PAGES) > 1, "README.md and docs/*.md"
    assert PYTHON_COMMANDS, "no `python <script>.py` command found in a code block"


def test_readme_gives_the_test_command():
    blocks = [line.strip() for _, lines in code_blocks(PAGES[0].read_text(encoding="utf-8")) for line in lines]
    assert any(line.split("#")[0].strip() == "bash test.sh" for line in blocks), \
        "README.md must show the test command `bash test.sh` in a code block"


@pytest.mark.parametrize("where, text, kind, script, arguments", PYTHON_COMMANDS,
                         ids=[c[0] for c in PYTHON_COMMANDS])
def test_python_command(helps, where, text, kind, script, arguments):
    assert (ROOT / script).is_file(), f"{where}: `{text}` runs {script}, which is not a file of the repository"
    (help_text, error), subcommand = helps[(script, subcommand_of(arguments))]
    assert error is None, f"{where}: {error}"
    if subcommand is None and re.search(r"^positional arguments:\s*\n\s+\{", help_text, re.M) and arguments \
            and not arguments[0].startswith("-"):
        pytest.fail(f"{where}: {script} has no subcommand {arguments[0]!r}")
    known = listed_flags(help_text)
    used = [word.split("=", 1)[0] for word in arguments if word.startswith("--") and len(word) > 2]
    unknown = [flag for flag in used if flag not in known]
    name = f"{script} {subcommand}" if subcommand else script
    assert not unknown, f"{where}: `{text}` uses {unknown}, which `{name} --help` does not list"


def demo_modes():
    text = (ROOT / "demo.sh").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_]+)\)\s*$", text, re.M))


@pytest.mark.parametrize("where, text, kind, script, arguments", BASH_COMMANDS,
                         ids=[c[0] for c in BASH_COMMANDS])
def test_bash_command(where, text, kind, script, arguments):
    assert (ROOT / script).is_file(), f"{where}: {script} is missing"
    if script == "demo.sh":
        assert len(arguments) <= 1, f"{where}: demo.sh takes one mode at most: `{text}`"
        if arguments:
            modes = demo_modes() | {"dinomaly"}  # the default branch (*) is Dinomaly
            assert arguments[0] in modes, f"{where}: demo.sh has no mode {arguments[0]!r} (it has {sorted(modes)})"



def pip_installs():
    """(where, text, requirement files, extras) of each `pip install` line of the pages' code blocks: the files of
    its `-r FILE` and the extras of its `.[a,b]` (or `"dinomaly[a,b]"`)."""
    found = []
    for page in PAGES:
        for start, lines in code_blocks(page.read_text(encoding="utf-8")):
            for number, text in logical_lines(lines, start):
                for command in commands_of(split_words(text) or []):
                    if command[:2] != ["pip", "install"]:
                        continue
                    files = [b for a, b in zip(command, command[1:]) if a in ("-r", "--requirement")]
                    groups = [g for word in command for g in re.findall(r"^(?:\.|dinomaly)\[([^\]]+)\]$", word)]
                    extras = [e.strip() for group in groups for e in group.split(",")]
                    found.append((f"{rel(page)}:{number}", text.strip(), files, extras))
    return found


PIP_INSTALLS = pip_installs()


@pytest.mark.parametrize("where, text, files, extras", PIP_INSTALLS, ids=[p[0] for p in PIP_INSTALLS])
def test_pip_install(where, text, files, extras):
    """A documented `pip install -r FILE` names a file of the repository, and `.[extra]` an extra of pyproject.toml."""
    import tomllib
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for name in files:
        assert (ROOT / name).is_file(), f"{where}: `{text}` installs {name}, which is not in the repository"
    for extra in extras:
        assert extra in declared, f"{where}: `{text}`: pyproject.toml has no extra {extra!r} (it has {sorted(declared)})"


# ------------------------------------------------------------------------------------------------------ links
def without_code(text: str) -> str:
    """The page without its fenced code blocks and inline code (no links there)."""
    kept, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            kept.append("")
            continue
        kept.append("" if inside else re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    found, counts = set(), {}
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside and re.match(r"^#{1,6} ", line):
            base = slug(line.lstrip("#"))
            n = counts.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            counts[base] = n + 1
    return found


def links():
    found = []
    for page in PAGES:
        for number, line in enumerate(without_code(page.read_text(encoding="utf-8")).splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    found.append((f"{rel(page)}:{number}", page, target))
    return found


LINKS = links()


@pytest.mark.parametrize("where, page, target", LINKS, ids=[f"{w} {t}" for w, _, t in LINKS])
def test_link_resolves(where, page, target):
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    assert resolved.exists(), f"{where}: the link {target} leads to {resolved}, which does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), \
            f"{where}: {rel(resolved)} has no heading whose anchor is #{anchor}"


def test_docs_files_named_in_the_text_exist():
    """`docs/<name>` named anywhere (code blocks and inline code too) is a file of the repository."""
    missing = []
    for page in PAGES:
        for name in set(re.findall(r"(?<![\w./-])docs/[\w.-]+\.\w+", page.read_text(encoding="utf-8"))):
            if not (ROOT / name).exists():
                missing.append(f"{rel(page)}: {name}")
    assert not missing, missing


def test_every_docs_page_is_in_the_readme_map():
    readme = PAGES[0].read_text(encoding="utf-8")
    unlisted = [rel(p) for p in PAGES[1:] if f"]({rel(p)})" not in readme]
    assert not unlisted, f"docs pages the README does not link: {unlisted}"
