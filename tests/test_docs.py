"""Docs that cannot drift: every shell command and Python snippet in README.md and docs/*.md runs here.

Run alone with ``pytest tests/test_docs.py`` (or ``-m docs``; ``-m "not docs"`` leaves it out). One test per
fenced block, named ``FILE:LINE`` (the line of its opening fence), so a failure names the block.

What runs: blocks tagged ``sh``, ``bash``, ``console`` (its ``$ `` lines; the rest is output) and ``python``.
Other tags (``text``, ``json``, ``sql``, none) are samples, not commands. An HTML comment on the lines right
before a block (one directive per comment; several comments may be stacked) changes how it runs:

    <!-- doc-test: skip REASON -->             not run (a reason is required): `make`, network, GPU, clusters
    <!-- doc-test: replace "OLD" "NEW" -->     run with OLD replaced by NEW, e.g. fewer epochs or samples;
                                               a replace whose OLD is no longer in the block fails (stale)
    <!-- doc-test: env NAME=VALUE ... -->      extra environment variables for the block
    <!-- doc-test: timeout SECONDS -->         the block's time limit (default 120 s)
    <!-- doc-test: requires fashion-mnist -->  skipped where the Fashion-MNIST IDX files (or `curl`, or the
                                               `tritonclient` package) are missing
    <!-- doc-test: background URL -->          a server: started, waited on until URL answers 200, and stopped
                                               once the session ends (later blocks of the document call it)

Every document runs in its own temporary directory, blocks in document order: later blocks see the files
earlier ones wrote, and shell variables that earlier ``sh`` blocks assigned on lines of their own
(``L=.venv/bin/logitguard; T=data/fashion-mnist``); a Python block runs as a script of its own (files carry
over, variables do not). The directory holds a copy of the repository's ``data/`` (so a command that writes
into ``data/`` never touches the repository's) and ``.venv/bin``, a link to the running interpreter's folder:
``.venv/bin/logitguard``, ``logitguard``, ``logitguard-produce`` and ``python`` are those of the environment
running the tests, and ``PYTHONPATH`` points at this checkout. Selecting one block (``-k``) runs the earlier
blocks of its document first, once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
RUN_LANGS = {"sh", "bash", "console", "python"}
DEFAULT_TIMEOUT = 120.0
STDERR_TAIL = 3000
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
# A line that only assigns shell variables: `L=.venv/bin/logitguard; T=data/fashion-mnist  # comment`.
ASSIGNMENT = re.compile(r"""^\s*[A-Za-z_]\w*=("[^"]*"|'[^']*'|[^\s;'"#]*)"""
                        r"""(\s*;\s*[A-Za-z_]\w*=("[^"]*"|'[^']*'|[^\s;'"#]*))*\s*;?\s*(#.*)?$""")
REQUIREMENTS = {
    "fashion-mnist": lambda: Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()
    or Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte").is_file(),
    "curl": lambda: shutil.which("curl") is not None,
    "tritonclient": lambda: importlib.util.find_spec("tritonclient") is not None,  # the dev extra installs it
}


@dataclass
class Block:
    """One fenced block: where it is, its language, its text and the directives before it."""

    doc: str                      # path relative to the repository, e.g. "docs/tables.md"
    line: int                     # 1-based line of the opening fence; the code starts on line + 1
    lang: str
    code: str
    directives: list[tuple[str, str]] = field(default_factory=list)   # (verb, argument)
    carried: list[str] = field(default_factory=list)  # variable assignments of the document's earlier sh blocks

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"

    def directive(self, verb: str) -> list[str]:
        return [arg for v, arg in self.directives if v == verb]


def parse(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the `doc-test` directives on the lines right before it."""
    doc = str(path.relative_to(REPO))
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        directives = []
        j = start - 1
        while j >= 0 and (DIRECTIVE.match(lines[j]) or (not lines[j].strip() and j == start - 1)):
            d = DIRECTIVE.match(lines[j])
            if d:
                verb, _, arg = d.group(1).partition(" ")
                directives.insert(0, (verb, arg.strip()))
            j -= 1
        blocks.append(Block(doc, start + 1, lang, "\n".join(body), directives))
    carried: list[str] = []
    for block in blocks:
        block.carried = list(carried)
        if block.lang in ("sh", "bash"):
            carried += [line.strip() for line in block.code.splitlines() if ASSIGNMENT.match(line)]
    return blocks


ALL_BLOCKS = [b for path in DOCS for b in parse(path)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in RUN_LANGS]


def prepared_code(block: Block) -> str:
    """The block's code after its `replace` directives; a replace that matches nothing fails (stale)."""
    code = block.code
    for arg in block.directive("replace"):
        try:
            old, new = shlex.split(arg)
        except ValueError:
            pytest.fail(f"{block.name}: malformed directive `replace {arg}` (want: replace \"OLD\" \"NEW\")")
        if old not in code:
            pytest.fail(f"{block.name}: stale directive: `replace {arg}` but {old!r} is not in the block")
        code = code.replace(old, new)
    return code


def script_for(block: Block, code: str) -> str:
    """A script whose line numbers are the Markdown file's: tracebacks and $LINENO name FILE:LINE directly."""
    body = code.splitlines()
    if block.lang == "console":   # `$ cmd` (and its `\` continuations) run; output lines become blank lines
        out, continued = [], False
        for line in body:
            if line.startswith("$ ") or continued:
                out.append(line[2:] if line.startswith("$ ") and not continued else line)
                continued = line.rstrip().endswith("\\")
            else:
                out.append("")
        body = out
    if block.lang == "python":
        head = [""] * block.line
    else:
        head = ["set -eo pipefail; trap 'echo \"doc-test: failed at line $LINENO\" >&2' ERR", *block.carried]
        head += [""] * (block.line - len(head))
        if len(head) > block.line:   # cannot happen: carried lines come from earlier lines of the file
            raise AssertionError(f"{block.name}: too many carried assignments")
    return "\n".join(head + body) + "\n"


def command_at(block: Block, code: str, line: int) -> str:
    """The logical command (with its `\\` continuations) of the block that covers Markdown line `line`."""
    lines = code.splitlines()
    idx = line - block.line - 1
    if not 0 <= idx < len(lines):
        return code
    start = idx
    while start > 0 and lines[start - 1].rstrip().endswith("\\"):
        start -= 1
    end = idx
    while end < len(lines) - 1 and lines[end].rstrip().endswith("\\"):
        end += 1
    return "\n".join(lines[start:end + 1])


@dataclass
class Result:
    returncode: int | None     # None: timed out
    stdout: str
    stderr: str
    seconds: float


class DocRun:
    """One document's temporary working directory and what its blocks did there."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.results: dict[int, Result] = {}
        self.servers: list[subprocess.Popen] = []
        self.ready = False

    def prepare(self) -> None:
        if self.ready:
            return
        shutil.copytree(REPO / "data", self.workdir / "data", symlinks=True)
        (self.workdir / ".venv").mkdir()
        (self.workdir / ".venv" / "bin").symlink_to(BIN, target_is_directory=True)
        self.ready = True

    def env(self, block: Block) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("OMP_NUM_THREADS", "1")
        env["MPLBACKEND"] = "Agg"
        for arg in block.directive("env"):
            for pair in shlex.split(arg):
                name, sep, value = pair.partition("=")
                if not sep:
                    pytest.fail(f"{block.name}: malformed directive `env {arg}` (want NAME=VALUE)")
                env[name] = value
        return env

    def command(self, block: Block, code: str) -> list[str]:
        suffix = "py" if block.lang == "python" else "sh"
        script = self.workdir / f"{block.doc.replace('/', '_')}-{block.line}.{suffix}"
        script.write_text(script_for(block, code), encoding="utf-8")
        return [sys.executable, str(script)] if block.lang == "python" else ["bash", str(script)]

    def run(self, block: Block, code: str) -> Result:
        self.prepare()
        timeout = float(block.directive("timeout")[-1]) if block.directive("timeout") else DEFAULT_TIMEOUT
        started = time.perf_counter()
        proc = subprocess.Popen(self.command(block, code), cwd=self.workdir, env=self.env(block), text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            code_ = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            code_ = None
        return Result(code_, out, err, time.perf_counter() - started)

    def start_server(self, block: Block, code: str, url: str) -> Result:
        """Start a background block and wait until `url` answers 200 (or the block dies, or times out)."""
        self.prepare()
        timeout = float(block.directive("timeout")[-1]) if block.directive("timeout") else 60.0
        log = self.workdir / f".doc-test-server-{block.line}.log"
        if answers(url):
            return Result(1, "", f"something already answers at {url} before this block started", 0.0)
        started = time.perf_counter()
        with open(log, "w") as sink:
            proc = subprocess.Popen(self.command(block, code), cwd=self.workdir, env=self.env(block),
                                    stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.servers.append(proc)
        while time.perf_counter() - started < timeout:
            if proc.poll() is not None:
                return Result(proc.returncode, "", log.read_text(), time.perf_counter() - started)
            if answers(url):
                return Result(0, "", "", time.perf_counter() - started)
            time.sleep(0.3)
        return Result(None, "", log.read_text(), time.perf_counter() - started)

    def stop(self) -> None:
        servers, self.servers = self.servers, []
        for proc in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def skip_reason(block: Block) -> str | None:
    """Why the block is not run here, or None."""
    for reason in block.directive("skip"):
        return reason
    for need in block.directive("requires"):
        if need not in REQUIREMENTS:
            pytest.fail(f"{block.name}: unknown requirement {need!r} (known: {', '.join(REQUIREMENTS)})")
        if not REQUIREMENTS[need]():
            return f"needs {need}, not available here"
    return None


@pytest.fixture(scope="session")
def doc_runs(tmp_path_factory):
    runs: dict[str, DocRun] = {}

    def get(doc: str) -> DocRun:
        for other, run in runs.items():   # a document's servers stop when another document starts
            if other != doc:
                run.stop()
        if doc not in runs:
            runs[doc] = DocRun(tmp_path_factory.mktemp(doc.replace("/", "_").removesuffix(".md")))
        return runs[doc]

    yield get
    for run in runs.values():
        run.stop()


def execute(block: Block, run: DocRun) -> Result | None:
    """Run `block` once (None when skipped); its document's earlier runnable blocks run first."""
    if block.line in run.results:
        return run.results[block.line]
    for earlier in RUNNABLE:
        if earlier.doc == block.doc and earlier.line < block.line and earlier.line not in run.results:
            execute(earlier, run)
    if skip_reason(block) is not None:
        return None
    code = prepared_code(block)
    urls = block.directive("background")
    result = run.start_server(block, code, urls[0]) if urls else run.run(block, code)
    run.results[block.line] = result
    return result


def failure_report(block: Block, result: Result, run: DocRun) -> str:
    code = prepared_code(block)
    where = block.name
    line = re.findall(r"doc-test: failed at line (\d+)", result.stderr)
    if line:
        where = f"{block.doc}:{line[-1]}"
    else:
        tb = re.findall(rf"{re.escape(block.doc.replace('/', '_'))}-{block.line}\.py\", line (\d+)", result.stderr)
        if tb:
            where = f"{block.doc}:{tb[-1]}"
    command = command_at(block, code, int(where.rsplit(":", 1)[1])) if where != block.name else code
    status = f"timed out after {result.seconds:.0f} s" if result.returncode is None \
        else f"exit status {result.returncode}"
    earlier = [f"{block.doc}:{n}" for n, r in run.results.items() if n < block.line and r.returncode != 0]
    note = f"\n(earlier blocks of this document failed: {', '.join(earlier)})" if earlier else ""
    replaced = " (after its doc-test replace directives)" if block.directive("replace") else ""
    tail = result.stderr[-STDERR_TAIL:] or result.stdout[-STDERR_TAIL:]
    return (f"{where}: {block.lang} block of {block.name} failed, {status}{note}\ncommand{replaced}:\n"
            f"{command}\n--- stderr (tail) ---\n{tail}")


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_doc_block(block: Block, doc_runs) -> None:
    reason = skip_reason(block)
    if reason is not None:
        pytest.skip(f"{block.name}: {reason}")
    run = doc_runs(block.doc)
    result = execute(block, run)
    if result is None or result.returncode != 0:
        pytest.fail(failure_report(block, result, run), pytrace=False)


def test_directives_are_valid() -> None:
    """Every directive is known, every skip says why, and directives stand only before runnable blocks."""
    known = {"skip", "replace", "env", "timeout", "requires", "background"}
    problems = []
    for block in ALL_BLOCKS:
        for verb, arg in block.directives:
            if verb not in known:
                problems.append(f"{block.name}: unknown directive {verb!r}")
            if verb == "skip" and not arg:
                problems.append(f"{block.name}: `doc-test: skip` needs a reason")
            if verb == "timeout" and not re.fullmatch(r"\d+(\.\d+)?", arg):
                problems.append(f"{block.name}: timeout {arg!r} is not a number of seconds")
        if block.directives and block.lang not in RUN_LANGS:
            problems.append(f"{block.name}: doc-test directives before a ```{block.lang or '(plain)'} block, "
                            "which never runs")
    assert not problems, "\n".join(problems)


def test_skips_are_few() -> None:
    """Skipping is for what cannot run in CI (make itself, the network, a GPU, a cluster), not for drift."""
    skipped = [b.name for b in RUNNABLE if b.directive("skip")]
    assert len(skipped) <= max(3, len(RUNNABLE) // 4), f"{len(skipped)} of {len(RUNNABLE)} blocks skipped: {skipped}"


def test_parser_reads_fences_directives_and_assignments(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    doc = tmp_path / "x.md"
    doc.write_text("# t\n\n```sh\nL=bin/x; T=data/y  # tools\n$L run $T\n```\n\n"
                   "<!-- doc-test: skip needs a GPU -->\n<!-- doc-test: env A=1 -->\n```python\nprint(1)\n```\n"
                   "```json\n{}\n```\n")
    first, second, third = parse(doc)
    assert (first.doc, first.line, first.lang, first.carried) == ("x.md", 3, "sh", [])
    assert (second.line, second.lang, second.directives) == (10, "python", [("skip", "needs a GPU"), ("env", "A=1")])
    assert second.carried == ["L=bin/x; T=data/y  # tools"]
    assert third.lang == "json" and third.directives == []
    script = script_for(second, second.code).splitlines()
    assert script[10] == "print(1)"   # line 11 of the script is line 11 of the file
    assert script_for(first, "$L run $T").splitlines()[3] == "$L run $T"
