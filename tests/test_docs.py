"""The docs are tests: every fenced ```python and ```bash block of README.md and docs/*.md runs, offline.

Each block runs on its own, in a fresh temporary folder laid out like the repository root (copies of
`scripts/`, `benchmarks/`, `tests/`, an empty `docs/img/`, and `../shared` pointing at the real shared
data when it exists), with this checkout's `vitkit` (PYTHONPATH) and the test's virtual environment first
on PATH (so `vitkit ...` and `python` are the venv's), and HF_HUB_OFFLINE=1. A block passes when it exits 0
and, where the docs quote what it prints, when the figures it prints are those quoted.

Marker convention (also in docs/architecture.md, "Docs are tests"):

* ```` ```python ```` / ```` ```bash ```` (or `sh`, `shell`) blocks run; any other fence (yaml, text, plain
  ```` ``` ````) is illustrative and never runs.
* `# needs the hub` (a comment anywhere in the block): the block loads from the model hub; offline it must
  fail with the documented message (`... the model hub is unreachable ...`), which is what is checked.
* `# slow` (a comment line starting with `slow`, e.g. `# slow: about 1 min on 2 cores`): the test is
  marked `pytest.mark.slow` (still run in CI).
* `# continues the block above` (a comment on the block's first line): the previous block of the same
  language on the same page runs first, in the same process (its own continuation included).
* `<!-- docs-test: skip REASON -->` on the line before the fence: not run (the README's setup commands,
  an hour-long training run); reported as skipped with the reason. `<!-- docs-test: slow -->` there is
  the same as a `# slow` comment, for blocks where a visible comment would distract a reader.
* Quoted output: a plain ```` ``` ```` (or `text`/`console`) block separated from a runnable block by blank
  lines only is what that block prints. Every line of it that holds a figure must appear, in order, in
  what the block prints, with the same figures; timings (`12.3 s`, `(64 s)`, `1 min 12 s`, `img/s`) and
  the folders of absolute paths are not compared. Such a block runs with OMP_NUM_THREADS=1: training
  figures depend on the thread count (a doc that quotes them shows the pin in its command).
* A non-runnable block whose first line is `# NAME.yaml` (or .yml/.json/.txt/.csv) is written to NAME in
  the folder of every later block of the same page (so a recipe shown in YAML is the file the next
  command reads).
* A block that mentions `../shared` (itself or a file of the page it reads) is skipped when the shared data
  folder is absent.

Python blocks start from a fork of one interpreter that has imported vitkit (and so torch and timm) once, with
the environment a block gets: importing them took ~4 s of each of the ~50 blocks. The forked child then behaves
as `python block.py` in the block's folder would (its own `__main__`, cwd, environment, stdout/stderr files,
exit code, atexit handlers); nothing of one block reaches another. `VITKIT_DOCS_FRESH=1` runs every block in a
fresh interpreter instead.
"""
from __future__ import annotations

import os
import re
import json
import resource
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
OUTPUT = {"", "text", "console", "output"}
COPIED = ("scripts", "benchmarks", "tests")
HUB_MESSAGE = "the model hub is unreachable"
TIMEOUT_S = 900

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<what>skip|slow)\b\s*(?P<reason>.*?)\s*-->")
SLOW = re.compile(r"^\s*#\s*slow\b", re.M)
DURATION = re.compile(r"about (\d+) (s|min)\b")  # in a slow note: the longest blocks are started first
HUB = re.compile(r"#.*\bneeds the hub\b")
CONTINUES = re.compile(r"^\s*#\s*continues the block above\b")
FILE = re.compile(r"^\s*#\s*(?P<name>[\w.-]+\.(?:ya?ml|json|txt|csv))\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    output: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # files written by earlier blocks of the page
    previous: "Block | None" = None  # for `# continues the block above`
    slow: bool = False  # `<!-- docs-test: slow -->` before the fence
    slow_note: str = ""  # that marker's text (`about 70 s`: how long, so the longest blocks start first)

    def __repr__(self) -> str:
        return f"Block({self.id}, {self.lang})"

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def kind(self) -> str:
        return RUNNABLE[self.lang]

    def source(self) -> str:
        """The code run for this block: the chain of blocks it continues, then its own."""
        if CONTINUES.match(self.code):
            if self.previous is None:
                raise ValueError(f"{self.id}: `# continues the block above` but no {self.lang} block precedes it")
            return self.previous.source() + "\n" + self.code
        return self.code


def parse(page: Path) -> list[Block]:
    """Every fenced block of a page, with its markers, quoted output and the files named before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    raw, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m["indent"]), m["fence"], m["lang"].lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[i + 1:j])
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.search(before)
        raw.append((i + 1, j + 1, lang, body + "\n", marker))
        i = j + 1
    blocks, files, last = [], {}, {}
    for n, (start, end, lang, body, marker) in enumerate(raw):
        if lang in RUNNABLE:
            block = Block(page, start, lang, body, files=dict(files), previous=last.get(RUNNABLE[lang]))
            if marker and marker["what"] == "skip":
                block.skip = marker["reason"] or "marked skip"
            block.slow = bool(marker and marker["what"] == "slow")
            block.slow_note = marker["reason"] if block.slow else ""
            nxt = raw[n + 1] if n + 1 < len(raw) else None
            if nxt and nxt[2] in OUTPUT and all(not s.strip() for s in _page_lines(page)[end:nxt[0] - 1]):
                block.output = nxt[3]
            blocks.append(block)
            last[block.kind] = block
        else:
            first = body.splitlines()[0] if body.strip() else ""
            m = FILE.match(first)
            if m:
                files[m["name"]] = body
    return blocks


_LINES: dict[Path, list[str]] = {}


def _page_lines(page: Path) -> list[str]:
    if page not in _LINES:
        _LINES[page] = page.read_text(encoding="utf-8").splitlines()
    return _LINES[page]


def collect() -> list:
    params = []
    for page in PAGES:
        for block in parse(page):
            marks = []
            comment = SLOW.search(block.source())
            if block.slow or comment:
                note = block.slow_note + (block.source()[comment.start():].split("\n", 1)[0] if comment else "")
                seconds = DURATION.search(note)
                marks.append(pytest.mark.slow(seconds=int(seconds[1]) * (60 if seconds[2] == "min" else 1)
                                              if seconds else 0))
            if block.skip:
                marks.append(pytest.mark.skip(reason=f"docs-test skip: {block.skip}"))
            elif any("../shared" in text for text in (block.source(), *block.files.values())) and not SHARED.is_dir():
                marks.append(pytest.mark.skip(reason=f"shared data folder not found: {SHARED}"))
            params.append(pytest.param(block, id=block.id, marks=marks))
    return params


# ---- comparing quoted output ------------------------------------------------------------------------------

NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", re.I)
TIMING = re.compile(r"(?:\d+ min )?\d[\d,]*(?:\.\d+)?\s*(?:img/s|/s|ms|s|min)\b|\(\d+ s\)")
ABSDIR = re.compile(r"(?<![\w./])/(?:[\w.-]+/)+")


def _normalise(line: str) -> str:
    line = ABSDIR.sub("<dir>/", line)
    return TIMING.sub("<t>", line)


def _skeleton(line: str) -> str:
    return " ".join(NUMBER.sub("#", line).split())


def compare_output(quoted: str, printed: str) -> list[str]:
    """Problems (empty: none): each quoted line with a figure must be printed, in order, with its figures."""
    printed_lines = [_normalise(s) for s in printed.splitlines()]
    problems, pos = [], 0
    for want in quoted.splitlines():
        norm = _normalise(want)
        figures = NUMBER.findall(norm)
        if not figures:
            continue
        skeleton = _skeleton(norm)
        hit = next((k for k in range(pos, len(printed_lines)) if _skeleton(printed_lines[k]) == skeleton), None)
        if hit is None:
            problems.append(f"quoted line not printed: {want.strip()!r}")
            continue
        got = NUMBER.findall(printed_lines[hit])
        if got != figures:
            problems.append(f"figures differ: docs {want.strip()!r} / printed {printed_lines[hit].strip()!r}")
        pos = hit + 1
    return problems


# ---- running a block ---------------------------------------------------------------------------------------

def workspace(tmp_path: Path, block: Block) -> Path:
    """A folder laid out like the repository root, next to `shared`, with the page's named files."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in COPIED:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "cells", "*.pyc"))
    (root / "docs" / "img").mkdir(parents=True)
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    for name, text in block.files.items():
        (root / name).write_text(text)
    return root


def block_env() -> dict:
    """The environment every block runs in."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", MPLBACKEND="Agg", COLUMNS="120",
               PYTHONWARNINGS=env.get("PYTHONWARNINGS", "default"))
    return env


# The fork server: imports vitkit once, then runs each request `{"cwd", "script", "env", "out", "err"}` in a
# forked child, answering {"pid"} when the child starts and {"rc", "cpu_s"} when it ends. It runs no tensor code
# itself, so the children start with no OpenMP thread pool to inherit.
SERVER = textwrap.dedent("""
    import atexit, json, os, runpy, sys, threading, traceback, resource
    import vitkit, torch
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                os.chdir(req["cwd"])
                os.environ.clear()
                os.environ.update(req["env"])
                for fd, path in ((1, req["out"]), (2, req["err"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                os.dup2(null, 0)
                sys.stdin = open(os.devnull)
                if os.environ.get("OMP_NUM_THREADS"):
                    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
                sys.argv, sys.path[0] = [req["script"]], req["cwd"]
                try:
                    runpy.run_path(req["script"], run_name="__main__")
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                    if not isinstance(e.code, (int, type(None))):
                        print(e.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
                threading._shutdown()
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        proto.write(json.dumps({"pid": pid}) + "\\n")
        _, status, usage = os.wait4(pid, 0)
        proto.write(json.dumps({"rc": os.waitstatus_to_exitcode(status),
                                "cpu_s": usage.ru_utime + usage.ru_stime}) + "\\n")
""")


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=block_env(), text=True, bufsize=1)
        self.buffer = b""

    def _line(self, timeout: float) -> dict:
        """The server's next answer (read from the raw pipe: a buffered reader could hold a line select can't see)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the docs fork server exited ({self.proc.poll()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, cwd: Path, script: str, env: dict) -> tuple[int, str, str, float]:
        out, err = cwd / ".stdout", cwd / ".stderr"
        self.proc.stdin.write(json.dumps({"cwd": str(cwd), "script": script, "env": env, "out": str(out),
                                          "err": str(err)}) + "\n")
        pid = self._line(120)["pid"]
        try:
            done = self._line(TIMEOUT_S)
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            self._line(60)
            raise subprocess.TimeoutExpired(script, TIMEOUT_S)
        return done["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"), done["cpu_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


_SERVER: list = []


@pytest.fixture(scope="session")
def fork_server():
    if os.environ.get("VITKIT_DOCS_FRESH") == "1" or not hasattr(os, "fork"):
        yield None
        return
    yield _SERVER
    for server in _SERVER:
        server.close()


def run_block(block: Block, cwd: Path, server: list | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `block` in `cwd`: (its completed process, CPU seconds it used)."""
    env = block_env()
    if block.output is not None:  # quoted figures of a training run depend on the thread count
        env["OMP_NUM_THREADS"] = "1"
    if block.kind == "python":
        script, cmd = cwd / "block.py", [sys.executable, "block.py"]
    else:
        script, cmd = cwd / "block.sh", ["bash", "-eo", "pipefail", "block.sh"]
    script.write_text(block.source())
    if block.kind == "python" and server is not None:
        if not server or server[0].proc.poll() is not None:
            server[:] = [ForkServer()]
        rc, out, err, cpu = server[0].run(cwd, "block.py", env)
        return subprocess.CompletedProcess(cmd, rc, out, err), cpu
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime


@pytest.mark.parametrize("block", collect())
def test_docs_block(block: Block, tmp_path: Path, request, fork_server):
    proc, cpu_s = run_block(block, workspace(tmp_path, block), fork_server)
    request.node.user_properties.append(("cpu_s", round(cpu_s, 1)))
    printed = proc.stdout + proc.stderr
    tail = "\n".join(printed.splitlines()[-25:])
    if HUB.search(block.source()):
        assert proc.returncode != 0 and HUB_MESSAGE in printed, (
            f"{block.id} is marked `# needs the hub`: offline it should fail with {HUB_MESSAGE!r}; "
            f"exit {proc.returncode}, printed:\n{tail}")
        return
    assert proc.returncode == 0, f"{block.id} failed (exit {proc.returncode}):\n{tail}"
    if block.output is not None:
        problems = compare_output(block.output, proc.stdout + proc.stderr)
        assert not problems, f"{block.id}: output differs from the docs:\n" + "\n".join(problems) + f"\n---\n{tail}"


# ---- the harness itself ------------------------------------------------------------------------------------

def test_harness_parses_markers(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs-test: skip setup -->\n```bash\nbash setup.sh\n```\n\n"
        "```yaml\n# r.yaml\na: 1\n```\n<!-- docs-test: slow -->\n"
        "```python\n# slow\nx = 1\nprint(x, '2.5 s')\n```\n\n```\n1 9.0 s\n```\n"
        "```python\n# continues the block above\nprint(x + 1)\n```\n"
        "  ```bash\n  echo hi\n  ```\n")
    b = parse(page)
    assert [x.line for x in b] == [2, 11, 20, 24], [x.line for x in b]
    assert b[0].skip == "setup" and b[1].skip is None and not b[0].slow and b[1].slow
    assert SLOW.search(b[1].code) and b[1].output == "1 9.0 s\n" and b[0].files == {}
    assert b[1].files == b[2].files == {"r.yaml": "# r.yaml\na: 1\n"}
    assert b[2].source() == b[1].code + "\n" + b[2].code
    assert b[3].code == "echo hi\n" and b[3].previous is b[0]


@pytest.mark.parametrize("quoted, printed, ok", [
    ("│ lora │ 0.670 │ 25,866 │ 105.5 KiB │ 5.8 s │ 675 img/s │",
     "noise\n│ lora │ 0.670 │ 25,866 │ 105.5 KiB │ 11.6 s │ 315 img/s │", True),
    ("│ lora │ 0.670 │ 25,866 │ 105.4 KiB │ 5.8 s │", "│ lora │ 0.670 │ 25,866 │ 105.5 KiB │ 5.8 s │", False),
    ("demo (64 s)\nresults: /work/main/vitkit-demo (a.json)", "demo (113 s)\nresults: /tmp/x/vitkit-demo (a.json)", True),
    ("top-1 0.5475", "top-1 0.5470", False),
    ("a 1\nb 2", "b 2\na 1", False),  # order matters
    ("only text", "", True),  # nothing to compare
])
def test_harness_compares_figures(quoted, printed, ok):
    assert (compare_output(quoted, printed) == []) is ok, compare_output(quoted, printed)


def test_a_forked_block_behaves_like_python_block_py(tmp_path: Path, fork_server):
    if fork_server is None:
        pytest.skip("VITKIT_DOCS_FRESH=1: no fork server")
    code = ("import atexit, os, sys\natexit.register(lambda: print('bye'))\nprint(os.getcwd(), os.environ['X'], "
            "__name__, sys.argv)\nprint('oops', file=sys.stderr)\nimport torch\nprint(torch.get_num_threads())\n"
            "sys.exit(3)\n")
    block = Block(tmp_path / "page.md", 1, "python", code, output="")  # quoted output: one thread
    os.environ["X"] = "x-value"
    try:
        forked, _ = run_block(block, tmp_path, fork_server)
        fresh, _ = run_block(block, tmp_path, None)
    finally:
        del os.environ["X"]
    assert forked.returncode == fresh.returncode == 3
    assert forked.stdout == fresh.stdout == f"{tmp_path} x-value __main__ ['block.py']\n1\nbye\n"
    assert forked.stderr == fresh.stderr == "oops\n"
    failing = Block(tmp_path / "page.md", 1, "python", "raise ValueError('no')\n")
    forked, _ = run_block(failing, tmp_path, fork_server)
    assert forked.returncode == 1 and forked.stderr.rstrip().endswith("ValueError: no")
