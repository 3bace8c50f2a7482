"""A run folder is owned by one run.

* ``train`` into a folder that holds another run is refused (``--resume`` continues it,
  ``--overwrite`` replaces it); two processes training into one folder at once are prevented by
  an exclusive lock on ``<out>/.lock`` (``fcntl.flock``: released by the kernel when a process dies,
  so a killed run never leaves a stale lock; on a local file system — network file systems may
  not honour it).
* ``--resume`` continues from the last intact checkpoint (``utuning.checkpoint.find_resumable``)
  and compares the recipe with the run's ``recipe.yaml``: keys that may change between the parts
  of one run (``RESUMABLE``) are listed and accepted, any other change is refused, listing the keys.
* Every folder the run writes (output, checkpoints, feature cache) is checked to be writable
  before the first step.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from utuning.checkpoint import find_resumable
from utuning.errors import RunError
from utuning.recipe.io import read_saved, recipe_to_dict, save_recipe
from utuning.schema import Recipe

# Recipe keys that may differ when a run is resumed: they change how long it trains, how often it
# logs, evaluates or saves, and how data is loaded; never what is trained or how.
RESUMABLE = ("description", "train.epochs", "train.steps", "train.log_every", "train.checkpoint_every", "eval.every",
             "eval.batch_size", "data.num_workers", "output.tensorboard")
RUN_FILES = ("recipe.yaml", "summary.json", "metrics.jsonl", "checkpoints", "tb")
LOCK = ".lock"


def check_writable(folder: Path, what: str) -> None:
    """``folder`` (or, where it does not exist yet, its nearest existing parent) accepts new files."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as e:
        raise RunError(f"{what} {str(folder)!r} is not writable ({e.strerror or e}); nothing was trained") from None


class RunFolder:
    """Claim ``out`` for one run (``claim``), hold its lock until ``release``."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.checkpoints = self.out / "checkpoints"
        self._lock = None

    def holds_run(self) -> bool:
        return any((self.out / name).exists() for name in RUN_FILES)

    def _acquire(self) -> None:
        fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"Another run (process {holder}) is training into {str(self.out)!r}; wait for it, or give "
                           "this run its own output.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock = fd

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing releases the flock
            self._lock = None

    def claim(self, recipe: Recipe, *, resume: bool, overwrite: bool, extra_writable: tuple[tuple[Path, str], ...] = ()
              ) -> tuple[Path | None, list[str]]:
        """Lock the folder and decide where training starts: (checkpoint to resume or None, notes).
        Nothing in the folder changes until every check has passed."""
        if resume and overwrite:
            raise RunError("--resume and --overwrite contradict each other: continue the run, or replace it")
        check_writable(self.out, "output.dir")
        self.out.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            notes: list[str] = []
            start: Path | None = None
            if resume:
                start, notes = find_resumable(self.checkpoints)
                if (self.out / "recipe.yaml").is_file():
                    notes += self._compare(recipe)
                if start is None:
                    notes.append(f"nothing to resume in {self.out}: starting from scratch")
            elif self.holds_run() and not overwrite:
                raise RunError(
                    f"{str(self.out)!r} already holds a run ({', '.join(n for n in RUN_FILES if (self.out / n).exists())}). "
                    "Use --resume to continue it, --overwrite to replace it, or set output.dir to a new folder")
            check_writable(self.checkpoints, "the checkpoint folder")
            for folder, what in extra_writable:
                check_writable(folder, what)
            if overwrite and not resume:
                for name in RUN_FILES:
                    path = self.out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            save_recipe(recipe, self.out / "recipe.yaml")
            return start, notes
        except BaseException:
            self.release()
            raise

    def _compare(self, recipe: Recipe) -> list[str]:
        from utuning.recipe.io import differences

        old = read_saved(self.out / "recipe.yaml")
        new = recipe_to_dict(recipe)
        old["defaults"] = new["defaults"] = []
        changed = differences(old, new)
        refused = [k for k in changed if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]
        if refused:
            shown = ", ".join(f"{k} ({_get(old, k)!r} -> {_get(new, k)!r})" for k in refused[:6])
            raise RunError(f"--resume: the recipe differs from the run's {self.out / 'recipe.yaml'} in {shown}"
                           f"{' ...' if len(refused) > 6 else ''}. Only {list(RESUMABLE)} may change when a run is "
                           "resumed; train the changed recipe into a new output.dir")
        return [f"recipe changes accepted on resume: {', '.join(f'{k} ({_get(old, k)!r} -> {_get(new, k)!r})' for k in changed)}"
                ] if changed else []


def _get(data: dict, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
