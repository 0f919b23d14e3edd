"""A local folder's entries, each either a file to read or the reason it cannot be one.

`prepare` (its dataset folders) and `predict` (a folder of photos) list by the same rule, so
neither skips a file without a word. Standard library only: `predict` runs without pyarrow.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Listed:
    """One entry under a listed folder; `problem` set when it cannot be read as a file."""

    split: str  # the dataset split the folder holds ("" for predict's folders)
    path: str  # relative to the root listed, "/"-separated, valid UTF-8
    size: int
    problem: str = ""


def _shown(path: str, root: str) -> str:
    """A path relative to the root, "/"-separated, as valid UTF-8 (undecodable bytes as \\xNN)."""
    return os.fsencode(os.path.relpath(path, root).replace(os.sep, "/")).decode("utf-8", "backslashreplace")


def list_local(root: str, split: str = "", folder: str = "") -> list[Listed]:
    """Every entry under `root`/`folder` (a dataset's split folder, or all of `root`), by one rule: file links are followed to their
    file; a link to a folder is not followed (a loop back up the tree, or a second copy of a
    class, would count files twice or under another class); broken links, link loops, names
    that are not UTF-8 and special files are entries with a problem. Nothing is skipped
    silently, and no entry can stop the scan."""
    top = os.path.join(root, folder) if folder else root
    found, pending = [], [top]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as exc:  # an unreadable subfolder is one rejected entry, not the end of the scan
            if current == top:
                raise
            found.append(Listed(split, _shown(current, root), 0, f"folder unreadable: {exc.strerror or exc}"))
            continue
        for entry in entries:
            rel = os.path.relpath(entry.path, root).replace(os.sep, "/")
            shown = _shown(entry.path, root)
            kind = "folder" if entry.is_dir(follow_symlinks=False) else "file"
            if shown != rel:
                found.append(Listed(split, shown, 0, f"{kind} name is not valid UTF-8"))
            elif entry.is_symlink():
                try:
                    target = os.stat(entry.path)  # follows the link
                except OSError as exc:
                    problem = {errno.ELOOP: "link loop", errno.ENOENT: "broken link (its target is missing)"}.get(
                        exc.errno, f"link target unreadable: {exc.strerror or exc}")
                    found.append(Listed(split, rel, 0, problem))
                    continue
                if stat.S_ISDIR(target.st_mode):
                    found.append(Listed(split, rel, 0, "link to a folder (not followed)"))
                elif stat.S_ISREG(target.st_mode):
                    found.append(Listed(split, rel, target.st_size))
                else:
                    found.append(Listed(split, rel, 0, "link to something that is not a file"))
            elif kind == "folder":
                pending.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                found.append(Listed(split, rel, entry.stat(follow_symlinks=False).st_size))
            else:
                found.append(Listed(split, rel, 0, "not a regular file (a pipe, socket or device)"))
    return found
