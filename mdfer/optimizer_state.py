"""An optimizer's state, saved beside a checkpoint's weights and put back when the stage resumes.

Why: a stage resumed after a lost worker (or a resubmitted job) builds a new optimizer; without
this its iteration would be 0 and its slots (Adam's moments, SGD's momentum) zero mid-stage, so
Adam's bias correction would start over. The learning rate is left out on purpose: the loop sets
it from the position in the stage (`train_loop.scheduled_lr`), which already continues.

The file is an .npz: the optimizer's class, its iteration, and one array per slot named by the
slot's path without the optimizer's own name (the trainable variable it follows + the slot's
kind), in the optimizer's order. A restore checks class, names, order and shapes before it
assigns anything: state saved for another optimizer or another set of trainable variables is
refused whole, never half applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASS_KEY = "optimizer_class"
ITERATION_KEY = "iteration"


def _slots(optimizer) -> list:
    """The optimizer's variables but its iteration and learning rate, in its own order."""
    skip = {id(optimizer.iterations), id(optimizer.learning_rate)}
    return [variable for variable in optimizer.variables if id(variable) not in skip]


def optimizer_state(optimizer) -> dict[str, np.ndarray]:
    """{"iteration": ..., <slot name>: array, ...} of a built optimizer: what is saved and restored."""
    if not optimizer.built:
        raise ValueError("the optimizer is not built yet: build it for the trainable variables first")
    prefix = f"{optimizer.name}/"
    state = {ITERATION_KEY: np.asarray(optimizer.iterations.numpy())}
    for variable in _slots(optimizer):
        state[variable.path.removeprefix(prefix)] = np.asarray(variable.numpy())
    return state


def save_optimizer(optimizer, path: str | Path) -> None:
    """Write the optimizer's class, iteration and slots to `path` (an .npz)."""
    with open(path, "wb") as out:  # a file object: np.savez would append ".npz" to a name without it
        np.savez(out, **{CLASS_KEY: np.asarray(type(optimizer).__name__)}, **optimizer_state(optimizer))


def read_optimizer_file(path: str | Path) -> dict[str, np.ndarray] | None:
    """What `save_optimizer` wrote, in memory (the checkpoint folder may be a temporary download);
    None when there is no such file (a checkpoint written before optimizer state was saved)."""
    if not Path(path).exists():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return {name: saved[name] for name in saved.files}


def restore_optimizer(optimizer, saved: dict[str, np.ndarray]) -> str | None:
    """Assign `saved` (from `read_optimizer_file`) to a built optimizer. Returns None when done,
    else why nothing was assigned."""
    saved = dict(saved)
    saved_class = str(saved.pop(CLASS_KEY, ""))
    if saved_class != type(optimizer).__name__:
        return f"is {saved_class}'s, not {type(optimizer).__name__}'s" if saved_class else "names no optimizer"
    current = optimizer_state(optimizer)
    if list(saved) != list(current):
        return (f"follows other trainable variables ({len(saved) - 1} slots saved, {len(current) - 1} "
                f"now; was the config's optimizer or frozen share changed?)")
    for name, value in saved.items():
        if value.shape != current[name].shape:
            return f"has {name} of shape {value.shape}, not {current[name].shape}"
    for variable, value in zip([optimizer.iterations, *_slots(optimizer)], saved.values(), strict=True):
        variable.assign(value)
    return None
