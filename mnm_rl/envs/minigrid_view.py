"""MiniGrid's egocentric observation, computed straight from the grid's cells.

At every step and reset a MiniGrid env encodes what its agent sees (``MiniGridEnv.gen_obs``):
it copies the view's square out of the grid into a new ``Grid`` (a new ``Wall`` object for each
cell outside the grid), rotates that grid ``agent_dir + 1`` times (a new ``Grid`` each time),
works out which cells are visible with numpy scalar indexing, and writes the encoding into a
numpy array element by element. That is most of an env step: on this project's 2-core VM
(``python benchmarks/minigrid_view.py``) 40 us of the 52 us per env step of raw stepping of
MiniGrid-MemoryS7 at a 3 x 3 view, 99 of 136 us at the registered 7 x 7.

:func:`view_image` computes the same array from the grid's cell list, reading each view cell
where the rotation would have put it, with plain lists for the visibility and one array built
at the end: 3.5-5x faster than MiniGrid's (``benchmarks/minigrid_view.py``), and equal to
it element for element (``tests/test_minigrid_view.py`` compares them over random episodes of
several MiniGrid envs and view sizes, with doors, carried objects and see-through walls).

:func:`use_fast_view` puts it in the place of one env's ``gen_obs``; mnm_rl's env builder does
so for every MiniGrid env (``MNM_RL_FAST_VIEW=0`` in the environment keeps MiniGrid's own).
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
from minigrid.core.constants import DIR_TO_VEC, OBJECT_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.world_object import Wall
from minigrid.minigrid_env import MiniGridEnv

#: Set to ``0`` in the environment to keep MiniGrid's own ``gen_obs`` everywhere.
SWITCH_VARIABLE = "MNM_RL_FAST_VIEW"
#: The encoding of a visible empty cell and of a cell out of sight (as ``Grid.encode`` writes
#: them).
_EMPTY = (OBJECT_TO_IDX["empty"], 0, 0)
_UNSEEN = (0, 0, 0)
#: ``DIR_TO_VEC`` as plain ints (numpy scalars are slower in Python arithmetic): (dx, dy) of the
#: cell ahead of an agent facing east, south, west, north.
AHEAD = tuple((int(dx), int(dy)) for dx, dy in DIR_TO_VEC)
#: What a view cell outside the grid holds (MiniGrid makes a new wall for each).
_OUTSIDE = Wall()


def view_image(env: MiniGridEnv) -> np.ndarray:
    """The image of MiniGrid's ``env.gen_obs()`` for a ``MiniGridEnv`` whose grid is a plain
    ``minigrid.core.grid.Grid``: ``uint8 [V, V, 3]`` (``V = env.agent_view_size``), indexed
    ``[column, row]`` of the agent's view, the agent at column ``V // 2`` of the last row,
    facing row 0.

    Cells outside the grid are walls, a cell hidden behind an opaque one (``see_behind()``
    false) is ``(0, 0, 0)`` unless ``env.see_through_walls``, and the agent's own cell shows
    what it carries (else empty), exactly as MiniGrid's ``Grid.slice``, ``rotate_left``,
    ``process_vis`` and ``encode`` give it.
    """
    size = env.agent_view_size
    grid = env.grid
    width, height, cells = grid.width, grid.height, grid.grid
    agent_x, agent_y = int(env.agent_pos[0]), int(env.agent_pos[1])
    forward_x, forward_y = AHEAD[env.agent_dir]
    half = size // 2

    # view[j][i]: row j of the view (j = size - 1 is the agent's, row 0 the farthest ahead),
    # column i (i > half: to the agent's right, which is forward turned clockwise: (-fy, fx)).
    view = []
    for j in range(size):
        ahead = size - 1 - j
        row_x, row_y = agent_x + forward_x * ahead, agent_y + forward_y * ahead
        row = []
        for i in range(size):
            right = i - half
            x, y = row_x - forward_y * right, row_y + forward_x * right
            row.append(cells[y * width + x] if 0 <= x < width and 0 <= y < height else _OUTSIDE)
        view.append(row)

    if env.see_through_walls:
        seen = [[True] * size for _ in range(size)]
    else:
        seen = _visible(view, size, half)
    # What the agent carries shows in its own cell, after visibility (which looked at the cell
    # the agent stands in, an open door say).
    view[size - 1][half] = env.carrying or None

    codes: list[int] = []
    for i in range(size):
        for j in range(size):
            if seen[j][i]:
                cell = view[j][i]
                codes.extend(_EMPTY if cell is None else cell.encode())
            else:
                codes.extend(_UNSEEN)
    # A bytearray keeps the array writable, as MiniGrid's is.
    return np.frombuffer(bytearray(codes), dtype=np.uint8).reshape(size, size, 3)


def _visible(view: list[list[Any]], size: int, half: int) -> list[list[bool]]:
    """MiniGrid's ``Grid.process_vis`` on the view, as ``seen[j][i]``: from the agent's cell,
    row by row away from the agent, sight passes sideways and one row on through every cell
    that is empty or can be seen behind."""
    seen = [[False] * size for _ in range(size)]
    seen[size - 1][half] = True
    for j in range(size - 1, -1, -1):
        row, visible = view[j], seen[j]
        beyond = seen[j - 1] if j > 0 else None
        for i in range(size - 1):  # left to right
            if not visible[i]:
                continue
            cell = row[i]
            if cell is not None and not cell.see_behind():
                continue
            visible[i + 1] = True
            if beyond is not None:
                beyond[i + 1] = beyond[i] = True
        for i in range(size - 1, 0, -1):  # right to left
            if not visible[i]:
                continue
            cell = row[i]
            if cell is not None and not cell.see_behind():
                continue
            visible[i - 1] = True
            if beyond is not None:
                beyond[i - 1] = beyond[i] = True
    return seen


class FastGenObs:
    """Stands in for ``MiniGridEnv.gen_obs`` on one env (as an attribute of the instance): the
    same ``{"image", "direction", "mission"}`` dict, its image from :func:`view_image`. Should
    the env's grid not be a plain ``Grid`` (a subclass may lay out or show its cells
    differently), MiniGrid's own method runs instead."""

    def __init__(self, env: MiniGridEnv) -> None:
        self.env = env

    def __call__(self) -> dict[str, Any]:
        env = self.env
        if type(env.grid) is not Grid:
            return MiniGridEnv.gen_obs(env)
        return {"image": view_image(env), "direction": env.agent_dir, "mission": env.mission}


def fast_view_enabled() -> bool:
    """Whether :func:`use_fast_view` may install the fast view: not switched off by
    ``MNM_RL_FAST_VIEW=0``."""
    return os.environ.get(SWITCH_VARIABLE, "1") != "0"


def use_fast_view(env: gym.Env) -> bool:
    """Compute ``env``'s MiniGrid observations with :func:`view_image` from now on.

    Applies to an env whose base (``env.unwrapped``) is a ``MiniGridEnv`` that keeps MiniGrid's
    own ``gen_obs`` and ``gen_obs_grid`` (a class that changes either keeps its own), unless
    ``MNM_RL_FAST_VIEW=0``. Returns whether the env now has the fast view; any other env is
    left as it is (``False``). Installing it twice is harmless.
    """
    base = env.unwrapped
    if not isinstance(base, MiniGridEnv):
        return False
    if isinstance(base.__dict__.get("gen_obs"), FastGenObs):
        return True
    kind = type(base)
    if (
        not fast_view_enabled()
        or "gen_obs" in base.__dict__  # replaced on this instance by someone else
        or kind.gen_obs is not MiniGridEnv.gen_obs
        or kind.gen_obs_grid is not MiniGridEnv.gen_obs_grid
    ):
        return False
    base.gen_obs = FastGenObs(base)
    return True
