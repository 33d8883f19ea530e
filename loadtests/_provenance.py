"""Which code produced a result: the commit, and any files that differed from it at run time
(several people edit the tree at once, so a run may include uncommitted work)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["code_state"]

_ROOT = Path(__file__).resolve().parent.parent


def code_state() -> dict[str, object]:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10.0, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.rstrip("\n")

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "uncommitted_changes": dirty}
