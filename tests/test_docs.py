"""The docs stay true: the configuration page is TrainConfig's, ARCHITECTURE.md names every module and only names that
exist, every relative link in the Markdown files resolves, and README.md's commands run as typed.

README.md's shell blocks (```bash / ```sh) are read command by command (continuation lines joined, comments dropped,
`a && b` split; `[--flag value]` is notation for an optional part). Every command's flags are parsed by the parser of
the program it runs (a peft-agnews command, `accelerate launch`, torchrun; launch scripts: the training flags they
pass on), and the files it runs (scripts, `--config`) must exist. Then, in a scratch copy of the checkout (the repo's
folders linked in, `../shared` too where it exists), each block runs command after command, as typed, except:

- training runs with `--dry_run true` appended (a full run is long); one whose model is not a local folder (a Hub id)
  or whose data is a Hub dataset is checked for its flags only, as are commands that need a GPU launch config,
  W&B's server (`wandb sweep/agent/sync/login`, `--report_to online`) or the Hub (`--push_to_hub`);
- input files a command names that are missing are stood in for by small synthetic files of the same format, and a
  missing `--adapter_dir`/`--run_dir` by a copy of the suite's tiny trained run (`trained_adapter_run`);
- installs (`pip`, `python -m venv`), `python -m pytest`, `cd`, `export` and `.` are not run (a `pip install -e .[x]`
  must name an extra that pyproject.toml declares).

```python blocks are compiled (they need trained adapters, the Hub or W&B to run).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, synthetic_rows, write_canonical_csv

PACKAGE = REPO / "peft_agnews"
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "yml", "safetensors", "bin", "csv", "txt", "png", "sh", "sbatch",
                 "toml", "parquet", "pt", "wandb", "lock", "cfg"}
SKIPPED_DIRS = {".git", ".venv", "venv", "outputs", "node_modules", "wandb", "__pycache__", ".pytest_cache"}


# --- docs/configuration.md ------------------------------------------------------------------------------------

def test_configuration_page_is_generated_from_train_config():
    sys.path.insert(0, str(REPO / "docs"))
    import make_configuration  # docs/make_configuration.py

    page = make_configuration.PAGE
    assert page.is_file() and page.read_text(encoding="utf-8") == make_configuration.render(), (
        "docs/configuration.md differs from TrainConfig: run `python docs/make_configuration.py` and commit the page")
    from peft_agnews.config import TrainConfig

    text = page.read_text(encoding="utf-8")
    assert all(f"| `--{f.name}` |" in text for f in dataclasses.fields(TrainConfig))


# --- ARCHITECTURE.md ------------------------------------------------------------------------------------------

def package_modules() -> list[str]:
    """Every module of the package as ARCHITECTURE.md names it: `train.py`, `speed/dropout.py`, `speed/`."""
    names = []
    for file in sorted(PACKAGE.rglob("*.py")):
        relative = file.relative_to(PACKAGE).as_posix()
        if relative == "__init__.py":
            names.append("peft_agnews/__init__.py")
        else:
            names.append(relative.removesuffix("__init__.py"))
    return names


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def test_architecture_names_every_module():
    named = set(backticked((REPO / "ARCHITECTURE.md").read_text()))
    missing = [module for module in package_modules() if module not in named]
    assert missing == [], f"ARCHITECTURE.md does not name {missing}: give each a row in its table"


def dotted_references(text: str) -> list[str]:
    """`module.name` references (inside backticks) whose first part is a module of the package, e.g.
    `model.replace_head`, `speed.apply`, `checkpointing.Checkpointer.load`; file names such as `train.py` are not."""
    modules = {m.removesuffix(".py").removesuffix("/").split("/")[0] for m in package_modules()}
    found = []
    for span in backticked(text):
        for ref in re.findall(r"(?<![\w/.-])([a-z_]+(?:\.[A-Za-z_]\w*)+)", span):
            parts = ref.removeprefix("peft_agnews.").split(".")
            if parts[0] in modules and parts[-1] not in FILE_SUFFIXES:
                found.append(ref.removeprefix("peft_agnews."))
    return found


def resolves(reference: str) -> bool:
    """The longest importable module prefix of `reference` defines (or lists in `__all__`) its next name, and the
    rest are attributes of that (`model.HEADS` does not resolve because model.py imports HEADS from heads.py)."""
    parts = reference.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            target = importlib.import_module("peft_agnews." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        if parts[cut] not in defined_names(target) | set(getattr(target, "__all__", ())):
            return False
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def defined_names(module) -> set[str]:
    """The names a module's own top level defines: functions, classes, assignments (not imports)."""
    names = set()
    for node in ast.parse(Path(module.__file__).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_every_module_name_reference_in_architecture_exists():
    references = dotted_references((REPO / "ARCHITECTURE.md").read_text())
    assert "speed.apply" in references and "cli.COMMANDS" in references  # the reader finds them
    assert [ref for ref in references if not resolves(ref)] == []


def test_the_architecture_checks_can_fail():
    assert not resolves("model.HEADS") and not resolves("speed.nothing") and resolves("heads.HEADS")
    assert dotted_references("`train.py` and `metrics.jsonl`, `cfg.seed`, `heads.HEADS`") == ["heads.HEADS"]


# --- relative links -------------------------------------------------------------------------------------------

def markdown_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.md") if not SKIPPED_DIRS & set(p.relative_to(REPO).parts))


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings (lower case, punctuation dropped, spaces to hyphens, -1, -2, ...
    for repeats)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", without_code(markdown), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def without_code(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def broken_links(file: Path) -> list[str]:
    broken = []
    text = without_code(file.read_text(encoding="utf-8"))
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (file.parent / path).resolve() if path else file
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{target} (no such heading)")
    return broken


def test_every_relative_link_in_the_markdown_files_resolves():
    files = markdown_files()
    assert REPO / "README.md" in files and REPO / "docs" / "configuration.md" in files
    broken = {str(f.relative_to(REPO)): links for f in files if (links := broken_links(f))}
    assert broken == {}


def test_the_link_check_sees_a_broken_link_and_a_missing_heading(tmp_path):
    (tmp_path / "b.md").write_text("# Some `code` heading\n\n## Again, here!\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md) [ok](b.md#some-code-heading) [ok](b.md#again-here) [web](https://x.org/y)\n"
                    "[gone](c.md) [no heading](b.md#nope)\n```\n[in code](d.md)\n```\n")
    assert broken_links(page) == ["c.md", "b.md#nope (no such heading)"]


# --- README.md's commands -------------------------------------------------------------------------------------

@dataclass
class Block:
    line: int  # of the opening fence
    commands: list[tuple[int, str]]  # (line, command as typed)


def shell_blocks(markdown: str) -> list[Block]:
    blocks, current, pending, start = [], None, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and current is None:
            current = Block(number, []) if fence.group(1) in ("bash", "sh", "shell") else Block(-number, [])
            continue
        if fence:
            if current.line > 0:
                blocks.append(current)
            current = None
            continue
        if current is None or current.line < 0:
            continue
        text = strip_comment(line)
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        command = (pending + text).strip()
        pending = ""
        current.commands += [(start, part) for part in split_commands(command)]
    return blocks


def scan(text: str):
    """(index, char, at top level) over `text`: outside quotes and $( ... )."""
    quote, depth = None, 0
    for i, ch in enumerate(text):
        top = quote is None and depth == 0
        yield i, ch, top
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif text.startswith("$(", i):
            depth += 1
        elif ch == ")" and depth:
            depth -= 1


def strip_comment(line: str) -> str:
    for i, ch, top in scan(line):
        if top and ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def split_commands(command: str) -> list[str]:
    parts, last = [], 0
    for i, ch, top in scan(command):
        if top and (command.startswith("&&", i) or ch == ";") and i >= last:
            parts.append(command[last:i])
            last = i + (2 if ch == "&" else 1)
    parts.append(command[last:])
    return [p.strip() for p in parts if p.strip()]


def readme_blocks() -> list[Block]:
    return shell_blocks((REPO / "README.md").read_text(encoding="utf-8"))


def expand(command: str, cwd: Path) -> list[str]:
    """The words bash makes of `command` (quotes, $VARS, $(...)), as the user's shell would."""
    done = subprocess.run(["bash", "-c", f"set -- {command}\nprintf '%s\\0' \"$@\""], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=offline_env())
    assert done.returncode == 0, f"bash could not expand {command!r}: {done.stderr}"
    return done.stdout.split("\0")[:-1]


def offline_env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}


def without_optional(words: list[str]) -> tuple[list[str], list[str]]:
    """(the words with `[...]` parts dropped, the words inside them)."""
    kept, optional, depth = [], [], 0
    for word in words:
        depth += word.count("[") if word.startswith("[") else 0
        (optional if depth else kept).append(word.strip("[]") if depth else word)
        depth -= word.count("]") if word.endswith("]") and depth else 0
    return kept, optional


@dataclass
class Plan:
    """What the test does with one command."""

    command: str  # 'train', 'evaluate', ... for a peft-agnews command; else the program
    args: list[str]  # the command's own options
    run: bool
    why: str = ""


PEFT_AGNEWS = {"train", "evaluate", "predict", "export", "plot", "ensemble"}
NOT_RUN = {"pip": "installs", "cd": "shell", "export": "shell", ".": "shell", "source": "shell"}
NEEDS_SERVER = {"sweep", "agent", "sync", "login"}


def plan(words: list[str], cwd: Path) -> Plan:
    """Which program `words` runs, with which options, and whether the test runs it."""
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        words = words[1:]  # VAR=value prefixes: the environment of the command
    program, rest = words[0], words[1:]
    if program in NOT_RUN:  # named apart from peft-agnews commands (`export` is both)
        return Plan(f"{program} ({NOT_RUN[program]})", rest, run=False, why=NOT_RUN[program])
    if program == "peft-agnews":
        assert rest and rest[0] in PEFT_AGNEWS, f"unknown peft-agnews command {rest[:1]}"
        return Plan(rest[0], rest[1:], run=True)
    if program == "peft-agnews-train":
        return Plan("train", rest, run=True)
    if program == "accelerate":
        assert rest[:1] == ["launch"], f"accelerate {rest[:1]} is not a launch"
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(rest[1:])  # unknown launcher flags exit here
        script = Path(launch.training_script)
        assert (cwd / script).is_file(), f"accelerate launch runs {script}, which does not exist"
        why = launch_needs(launch, cwd)
        return Plan(module_of(script), launch.training_script_args, run=not why, why=why)
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        launch = get_args_parser().parse_args(rest)
        return Plan(module_of(Path(launch.training_script)), launch.training_script_args, run=False,
                    why="a multi-process launcher")
    if program in ("python", "python3"):
        if rest[:1] == ["-c"]:
            compile(rest[1], "<README>", "exec")
            return Plan("python -c", [], run=True)
        if rest[:2] in (["-m", "venv"], ["-m", "pytest"]):
            return Plan(f"python {' '.join(rest[:2])}", rest[2:], run=False, why="installs / runs this suite")
        if rest[:1] == ["-m"]:
            assert rest[1].startswith("peft_agnews."), f"python -m {rest[1]}"
            return Plan(rest[1].removeprefix("peft_agnews."), rest[2:], run=True)
        assert (cwd / rest[0]).is_file(), f"python runs {rest[0]}, which does not exist"
        return Plan(module_of(Path(rest[0])), rest[1:], run=rest[0].startswith("peft_agnews/"))
    if program in ("bash", "sbatch"):
        script = next(w for w in rest if w.endswith((".sh", ".sbatch")))
        assert (cwd / script).is_file(), f"{program} runs {script}, which does not exist"
        args = rest[rest.index(script) + 1:]
        args = args[1:] if script.endswith("train_local.sh") else args  # its first argument: an Accelerate config
        return Plan("train", args, run=False, why="a launch script (its training flags are checked)")
    if program == "wandb":
        assert rest and rest[0] in NEEDS_SERVER, f"wandb {rest[:1]}"
        if rest[0] == "sweep":
            assert (cwd / rest[-1]).is_file(), f"wandb sweep {rest[-1]}: no such file"
        return Plan("wandb", rest, run=False, why="W&B's server")
    raise AssertionError(f"README.md runs {program!r}, which this test does not know: teach `plan` what it needs")


def launch_needs(launch, cwd: Path) -> str:
    """What an `accelerate launch` needs that a CPU machine lacks ('' if nothing): GPUs or several machines."""
    import yaml

    config = yaml.safe_load((cwd / launch.config_file).read_text()) if launch.config_file else {}
    assert isinstance(config, dict), f"{launch.config_file} is not an Accelerate config"
    gpus = not config.get("use_cpu", False) and (config.get("gpu_ids") is not None or config.get(
        "distributed_type", "NO") in ("MULTI_GPU", "FSDP", "DEEPSPEED"))
    if gpus or launch.multi_gpu or launch.use_fsdp or launch.use_deepspeed or launch.gpu_ids:
        return "GPUs (its launch config)"
    return "several machines" if max(config.get("num_machines", 1), launch.num_machines or 1) > 1 else ""


def module_of(script: Path) -> str:
    return script.stem if script.parent.name == "peft_agnews" else script.as_posix()


class Parsed(Exception):
    """Raised by the parse-only stand-in for `cli.parse_args`: the options parsed, nothing ran."""


def check_options(command: str, args: list[str], cwd: Path, monkeypatch):
    """Parse `args` as `command` would (unknown flags, bad values and invalid combinations fail); return the
    TrainConfig for training, else None."""
    monkeypatch.chdir(cwd)
    try:
        if command == "train":
            from peft_agnews.config import parse_config

            return parse_config(args)
        module = importlib.import_module(f"peft_agnews.{command}")
        real = module.parse_args

        def parse_only(types, argv, description):
            real(types, argv, description)
            raise Parsed

        monkeypatch.setattr(module, "parse_args", parse_only)
        with pytest.raises(Parsed):
            module.main(args)
    except SystemExit as err:  # argparse: an unknown flag (train), a bad value or choice
        pytest.fail(f"{command} {shlex.join(args)}: argparse refused the options (exit {err.code}; see stderr)")
    except ValueError as err:  # HfArgumentParser: flags no option of the command takes
        pytest.fail(f"{command} {shlex.join(args)}: {err}")
    return None


def stand_ins(command: str, args: list[str], cwd: Path, trained_run: Path) -> None:
    """Small synthetic inputs (and the suite's trained run) where the command names a relative path that is missing."""
    values = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    for flag, labelled in (("--test_file", True), ("--train_file", True), ("--validation_file", True),
                           ("--input_file", False)):
        target = cwd / values[flag] if flag in values else None
        if target is not None and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_table(target, labelled)
    for flag in ("--adapter_dir", "--run_dir"):
        target = cwd / values[flag] if flag in values else None
        if target is not None and not target.exists():
            run = target.parent if flag == "--adapter_dir" and target.name == "adapter" else target
            if flag == "--adapter_dir" and run is target:
                shutil.copytree(trained_run / "adapter", target)
            else:
                shutil.copytree(trained_run, run)


def write_table(path: Path, labelled: bool) -> None:
    import pandas as pd

    rows = synthetic_rows(24, seed=5)
    if path.suffix == ".csv" and labelled:
        write_canonical_csv(path, rows)
        return
    frame = pd.DataFrame({"text": [f"{t} {d}" for _, t, d in rows], **({"label": [r[0] for r in rows]} if labelled else {})})
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".txt":
        path.write_text("\n".join(frame["text"]) + "\n")
    else:
        frame.to_csv(path, index=False)


def needs_elsewhere(command: str, args: list[str], cfg) -> str:
    """Why a command that could run here cannot (the Hub, W&B's server, a missing absolute path); '' if none."""
    if "--push_to_hub" in args:
        return "the Hub (--push_to_hub)"
    if cfg is not None:
        if cfg.report_to == "online":
            return "W&B's server (--report_to online)"
        if not Path(cfg.model_name_or_path).is_dir():
            return f"the Hub or a model folder not here ({cfg.model_name_or_path})"
        if not cfg.train_file and not Path(cfg.dataset_name or "").is_dir():
            return f"the Hub (dataset {cfg.dataset_name})"
        shared = [f for f in (cfg.train_file, cfg.validation_file, cfg.test_file)
                  if f and Path(f).parts[:2] == ("..", "shared") and not (REPO / f).exists()]
        if shared:  # the recipes' real AG News rows, laid out beside the checkout on the project's machines only
            return f"{shared[0]}, which is not here"
    absolute = [a for a in args if a.startswith("/") and not Path(a).exists()]
    return f"{absolute[0]}, which is not here" if absolute else ""


@pytest.fixture
def scratch_checkout(tmp_path) -> Path:
    """A checkout to run README commands in: the repo's top-level entries linked in, `../shared` too if present."""
    checkout = tmp_path / "repo"
    checkout.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in SKIPPED_DIRS:
            (checkout / entry.name).symlink_to(entry)
    if (REPO.parent / "shared").exists():
        (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    return checkout


def test_readme_has_commands_to_check():
    blocks = readme_blocks()
    commands = [c for b in blocks for _, c in b.commands]
    assert blocks and any("peft_agnews/train.py" in c or c.startswith("peft-agnews train") for c in commands)


@pytest.mark.slow
@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: f"README.md:{b.line}")
def test_readme_block_runs_as_typed(block, scratch_checkout, trained_adapter_run, monkeypatch):
    """One shell block of README.md: every command's options parse; the ones that can run here run (see the module
    docstring), in order, in a scratch checkout."""
    env = offline_env()
    for line, command in block.commands:
        words = expand(command, scratch_checkout)
        kept, optional = without_optional(words)
        step = plan(kept, scratch_checkout)
        if step.command.startswith("pip ") and (extra := re.search(r"\[([\w,-]+)\]", command)):
            declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
            assert set(extra.group(1).split(",")) <= set(declared), f"README.md:{line}: no such extra {extra.group(1)}"
        if step.command not in PEFT_AGNEWS:
            if step.run:
                done = subprocess.run(["bash", "-c", command], cwd=scratch_checkout, env=env, capture_output=True,
                                      text=True, timeout=600)
                assert done.returncode == 0, f"README.md:{line}: {command}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            continue
        cfg = check_options(step.command, step.args + optional, scratch_checkout, monkeypatch)
        if optional:  # run without the optional parts
            cfg = check_options(step.command, step.args, scratch_checkout, monkeypatch)
        why = step.why or needs_elsewhere(step.command, step.args, cfg)
        if not step.run or why:
            print(f"README.md:{line}: options checked, not run: needs {why}")
            continue
        stand_ins(step.command, step.args, scratch_checkout, trained_adapter_run)
        typed = shlex.join(kept) if optional else command  # as typed, minus its [optional] notation
        if step.command == "train":
            typed += " --dry_run true"
        done = subprocess.run(["bash", "-c", typed], cwd=scratch_checkout, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"README.md:{line}: {typed}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        print(f"README.md:{line}: ran {typed}")
        if step.command == "train":
            assert "trainable parameters" in done.stdout + done.stderr, done.stdout[-2000:]


def test_readme_python_blocks_compile():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
    for block in blocks:
        compile(block, "README.md", "exec")


def test_the_readme_reader_splits_joins_and_checks(scratch_checkout, monkeypatch):
    text = ("```bash\n# a comment\nA=1 peft-agnews plot --run_dir out && echo '#no' ; \\\n  cd x  # trailing\n```\n"
            "```python\nprint('not shell')\n```\n")
    (block,) = shell_blocks(text)
    assert block.commands == [(3, "A=1 peft-agnews plot --run_dir out"), (3, "echo '#no'"), (3, "cd x")]
    assert without_optional(["p", "--a", "[--b]", "[--c", "v]", "--d"]) == (["p", "--a", "--d"], ["--b", "--c", "v"])
    assert plan(["peft-agnews", "predict", "--x"], scratch_checkout).command == "predict"
    predict = ["--adapter_dir", "a", "--input_file", "in.csv", "--output_file", "out.csv"]
    check_options("predict", predict, scratch_checkout, monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="not used by the HfArgumentParser: \\['--no_such_flag'\\]"):
        check_options("predict", [*predict, "--no_such_flag"], scratch_checkout, monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="argparse refused"):
        check_options("train", ["--learning_rates", "1"], scratch_checkout, monkeypatch)
    with pytest.raises(AssertionError, match="does not know"):
        plan(["make", "all"], scratch_checkout)
