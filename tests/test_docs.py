"""Every documented command works as written.

The shell commands of README.md and every ``bundles/*/docs/README.md`` (their fenced
```bash blocks) are extracted and run, in order, in a temporary folder holding a copy of
the bundles' configs: the data they use is what the same document tells the user to
generate (phantoms), the models what it tells the user to train. Only sizes shrink:
:data:`SHRINK` appends overrides (fewer and smaller phantoms, one epoch, the tiny SAM) to
the documented text, which is otherwise run unchanged by ``bash``. :data:`SKIP` names the
commands that cannot run here, each with its reason (a GPU, a real dataset, SAM weights,
an install). A command missing from both tables runs as written; a table entry that
matches no documented command fails, so the tables cannot go stale.

Also: every Markdown fence of every document is closed (an unclosed fence turns the rest
of the page into code).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in REPO.glob("bundles/*/docs/*.md"))]
MARKDOWN = [
    *DOCS,
    *sorted(str(p.relative_to(REPO)) for p in REPO.glob("docs/*.md")),
]

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Block:
    path: str
    line: int  # the opening fence's line (1-based)
    lang: str
    lines: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Command:
    path: str
    line: int
    text: str  # continuation lines joined, trailing comment kept (bash ignores it)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {' '.join(self.text.split())}"


def fenced_blocks(text: str, path: str = "<text>") -> list[Block]:
    """The fenced code blocks of a Markdown text; a fence left open raises ``ValueError``.

    A block closes at a fence line of the same character, at least as long, with no
    info string (CommonMark). A fence with an info string (```bash) inside a block is
    refused too: it means the block above it was never closed, and the next block's
    closing fence closes it instead, turning the prose between them into code.
    """
    blocks: list[Block] = []
    current: tuple[int, str, str, list[tuple[int, str]]] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if current is None:
            if m:
                current = (n, m.group(2), m.group(3).strip(), [])
            continue
        start, fence, lang, body = current
        if m and m.group(3).strip() and m.group(2)[0] == fence[0] and len(m.group(2)) >= len(fence):
            raise ValueError(
                f"{path}:{start}: the ``` fence opened here is not closed before the "
                f"fence of line {n}"
            )
        if (
            m
            and m.group(2)[0] == fence[0]
            and len(m.group(2)) >= len(fence)
            and not m.group(3).strip()
        ):
            blocks.append(Block(path, start, lang, tuple(body)))
            current = None
        else:
            body.append((n, line))
    if current is not None:
        raise ValueError(f"{path}:{current[0]}: the ``` fence opened here is never closed")
    return blocks


def shell_commands(block: Block) -> list[Command]:
    """The commands of a bash block: ``\\``-continued lines joined, blank lines and
    comment-only lines dropped."""
    commands: list[Command] = []
    pending: list[str] = []
    start = 0
    for n, line in block.lines:
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = n
        pending.append(line.rstrip())
        if line.rstrip().endswith("\\"):
            pending[-1] = pending[-1][:-1]
            continue
        commands.append(Command(block.path, start, " ".join(p.strip() for p in pending)))
        pending = []
    if pending:
        raise ValueError(f"{block.path}:{start}: a command ends with a line continuation")
    return commands


def documented_commands(path: str) -> list[Command]:
    text = (REPO / path).read_text(encoding="utf-8")
    return [
        c
        for b in fenced_blocks(text, path)
        if b.lang in ("bash", "sh", "shell", "console")
        for c in shell_commands(b)
    ]


# --------------------------------------------------------------------------- the tables
# Keys are prefixes of documented commands (runs of blanks collapsed); the first key that
# matches wins.

NEEDS_SAM = "needs SAM's ViT-B weights (sam_vit_b_01ec64.pth), which cannot be downloaded here"
NEEDS_GPUS = "torchrun with 4 processes: a multi-GPU machine (scripts/gpu_check.sh runs GPU checks)"

_RUN = "python -m monai.bundle run --config_file "
_REFERENCE = "a reference-recipe run (see the comment in SKIP)"
SKIP: dict[str, str] = {
    "bash scripts/demo.sh": "installs .venv and runs the 5-minute demo (tests/test_demo.py)",
    "bash scripts/test.sh": "is the whole test suite itself (what CI runs)",
    "python3 -m venv .venv": "creates a virtual environment (an install, not a command of ours)",
    ".venv/bin/pip install torch": "downloads a CUDA build of torch",
    "SAM3D_KEEP_TORCH=1 bash scripts/demo.sh": "installs .venv and runs the demo",
    "git clone <sam3d repository>": "clones and installs the project (a placeholder URL)",
    "sam3d serve": "a web server that runs until stopped (tests/test_serve.py drives it)",
    "torchrun --nproc_per_node 4": NEEDS_GPUS,
    _RUN + "bundles/echo/train.json --sam_checkpoint /path": f"{NEEDS_SAM}; CAMUS (real data)",
    _RUN + "bundles/retina/train.json --sam_checkpoint /path": f"{NEEDS_SAM}; DRIVE (real data)",
    _RUN + "bundles/prostate/train.json --sam_checkpoint": NEEDS_SAM,
    _RUN + "\"['bundles/retina/train.json','bundles/retina/evaluate.json']\" --dataset_dir /data": (
        "DRIVE (a real dataset)"
    ),
    _RUN + "bundles/retina/inference.json --input_dir /data/": "the user's own fundus images",
    "sam3d segment case.nii.gz --click 32,36,22 --checkpoint sam_med3d_turbo.pth": (
        "needs SAM-Med3D's published weights, which cannot be downloaded here"
    ),
    "bash scripts/gpu_check.sh --sammed3d-checkpoint": "a GPU and SAM-Med3D's weights",
    # the reference recipes (overlays) train into the bundle's own models/, where the
    # document's later commands would resume from them; their pieces are tested in
    # tests/test_recipes.py and a bundle run in gpu_check.sh --cpu-smoke (recipe_echo)
    _RUN + "\"['bundles/kits/train.json','bundles/kits/reference.json']\"": _REFERENCE,
    _RUN + "\"['bundles/echo/train.json','bundles/echo/": _REFERENCE,
    _RUN + "\"['bundles/retina/train.json','bundles/retina/reference.json']\"": _REFERENCE,
    _RUN + "\"['bundles/retina/train.json','bundles/retina/evaluate.json',"
    "'bundles/retina/reference.json']\"": _REFERENCE,
    _RUN + "\"['bundles/prostate/train.json','bundles/prostate/reference.json']\"": _REFERENCE,
    _RUN + "\"['bundles/prostate/train.json','bundles/prostate/evaluate.json',"
    "'bundles/prostate/reference.json']\"": _REFERENCE,
}

_TINY_CT = "\"{'shape_vox': [40, 40, 32], 'spacing_mm': [1.5, 1.5, 2.0], 'n_lesions': 1}\""
_KITS_TRAIN = (
    f"--preset tiny --max_epochs 1 --phantom_cases 3 --phantom_kwargs {_TINY_CT} "
    "--num_workers 0 --val_interval 1"
)
_PLANAR = "--num_workers 0 --batch_size 2 --phantom_cases 5"
_PROSTATE = "--phantom \"{'n_per_site': 2, 'in_plane_vox': 48, 'n_slices': 4, 'seed': 0}\""

# Appended to the documented text. The phantoms a document clicks into keep their size
# (its clicks are given in their pixels / voxels); only their number shrinks.
SHRINK: dict[str, str] = {
    "python -m monai.bundle run --config_file bundles/kits/train.json": _KITS_TRAIN,
    "sam3d phantoms --kind echo": "--n 5",
    "python -m monai.bundle run --config_file bundles/echo/train.json": _PLANAR,
    "python -m monai.bundle run --config_file bundles/retina/train.json": (
        f'{_PLANAR} --phantom_size "[96, 96]"'
    ),
    "sam3d phantoms --kind vessels": "--shape 96 96",
    "python -m monai.bundle run --config_file bundles/prostate/train.json": (
        f"{_PROSTATE} --batch_size 4"
    ),
    "python -m monai.bundle run --config_file \"['bundles/prostate/train.json',"
    "'bundles/prostate/evaluate.json']\"": f"{_PROSTATE} --grid#n_per_side 3",
    "python -m monai.bundle run --config_file bundles/prostate/inference.json": (
        "--grid#n_per_side 3"
    ),
}


def _normal(text: str) -> str:
    return " ".join(text.split())


def lookup(table: dict[str, str], command: Command) -> str | None:
    text = _normal(command.text)
    for key, value in table.items():
        if text.startswith(_normal(key)):
            return value
    return None


def with_overrides(command: Command, extra: str) -> str:
    """The documented text with ``extra`` before its trailing comment (if any)."""
    text = command.text
    code, hash_, comment = text.partition("  #")
    return f"{code.rstrip()} {extra}".rstrip() + (f"  #{comment}" if hash_ else "")


# --------------------------------------------------------------------------- fast checks


@pytest.mark.parametrize("path", MARKDOWN)
def test_every_markdown_fence_is_closed(path):
    fenced_blocks((REPO / path).read_text(encoding="utf-8"), path)


def test_an_unclosed_fence_is_found():
    text = "# a\n\n```bash\nls\n```\n\n```bash\nsam3d segment x\n\n## b\n"
    with pytest.raises(ValueError, match=":7: the ``` fence opened here is never closed"):
        fenced_blocks(text, "doc.md")
    # README.md's old break: an unclosed block closed by the next block's fence
    with pytest.raises(ValueError, match=":1: .* not closed before the fence of line 4"):
        fenced_blocks("```bash\nsam3d segment-2d a\n## Prostate\n```bash\nb\n```\n", "doc.md")
    # a longer closing fence closes; an info string does not
    assert len(fenced_blocks("````\n```py\n````\n")) == 1


def test_commands_are_joined_and_comments_kept_out():
    (block,) = fenced_blocks("```bash\n# train\npython a \\\n    --b 1  # note\n\nls\n```\n")
    cmds = shell_commands(block)
    assert [c.text for c in cmds] == ["python a --b 1  # note", "ls"]
    assert [c.line for c in cmds] == [3, 6]
    assert with_overrides(cmds[0], "--n 2") == "python a --b 1 --n 2  # note"


def test_every_table_entry_matches_a_documented_command():
    commands = [c for p in DOCS for c in documented_commands(p)]
    assert commands, "no documented commands found"
    for table in (SKIP, SHRINK):
        for key in table:
            assert any(_normal(c.text).startswith(_normal(key)) for c in commands), key


# --------------------------------------------------------------------------- the runs


def _workdir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder with the bundles' configs and docs (no data, models or runs) and an
    environment where ``sam3d`` and ``python`` are this checkout's."""
    work = tmp_path / "work"
    work.mkdir()
    skip = shutil.ignore_patterns("data", "models", "eval", "cache", "mlruns*", "__pycache__")
    shutil.copytree(REPO / "bundles", work / "bundles", ignore=skip)
    shutil.copytree(REPO / "configs", work / "configs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, args in (("sam3d", " -m sam3d"), ("python", ""), ("python3", "")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return work, env


def _run_document(path: str, tmp_path: Path) -> list[str]:
    work, env = _workdir(tmp_path)
    ran: list[str] = []
    for command in documented_commands(path):
        if lookup(SKIP, command) is not None:
            continue
        text = with_overrides(command, lookup(SHRINK, command) or "")
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-c", "set -e\n" + text],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, (
            f"{command}\nran: {text}\nexit {proc.returncode}\n{out[-4000:]}"
        )
        assert "Traceback" not in out, f"{command}\n{out[-4000:]}"
        ran.append(str(command))
        print(f"[{time.perf_counter() - t0:6.1f} s] {command}", flush=True)
    return ran


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a whole document: several trainings at tiny sizes
@pytest.mark.parametrize("path", DOCS)
def test_documented_commands_run(path, tmp_path):
    ran = _run_document(path, tmp_path)
    assert ran, f"{path}: no command ran"


def test_readme_clicks_fall_where_it_says_in_the_phantoms_it_generates(tmp_path, monkeypatch):
    """README.md's example clicks: positives in the tumour, negatives outside it, of the
    phantom its own ``sam3d phantoms`` and ``cp`` commands make (voxel or --world mm)."""
    import shlex

    import nibabel as nib
    import numpy as np

    from sam3d.cli import main

    monkeypatch.chdir(tmp_path)
    commands = [_normal(c.text.partition("  #")[0]) for c in documented_commands("README.md")]
    (phantoms,) = [c for c in commands if c.startswith("sam3d phantoms --out ct_data")]
    assert main(shlex.split(phantoms)[1:]) == 0
    (copy,) = [c for c in commands if c.startswith("cp ct_data/")]
    _, src, dst = shlex.split(copy)
    assert dst == "case.nii.gz"
    label = np.asarray(nib.load(src.replace("imagesTr", "labelsTr")).dataobj)
    inverse = np.linalg.inv(nib.load(src).affine)
    checked = 0
    for c in commands:
        if not c.startswith("sam3d segment case.nii.gz"):
            continue
        args = shlex.split(c)
        world = "--world" in args
        for flag, tumour in (("--click", True), ("--negative", False)):
            for i, a in enumerate(args):
                if a != flag:
                    continue
                point = np.array([float(v) for v in args[i + 1].split(",")])
                if world:
                    point = (inverse @ np.r_[point, 1.0])[:3]
                voxel = tuple(int(v) for v in np.rint(point))
                assert (label[voxel] == 2) == tumour, (c, flag, voxel, label[voxel])
                checked += 1
    assert checked >= 6
