"""``python -m fastcnn``: the same command as ``fastcnn`` (see fastcnn/cli.py)."""

from __future__ import annotations

from fastcnn.cli import run

if __name__ == "__main__":
    run()
