"""MiniGrid-Memory's episode layout from a kept wall plan: the same grid, drawn faster.

Every reset of a MiniGrid env builds its grid anew (``MiniGridEnv._gen_grid``). ``MemoryEnv``'s
makes a ``Grid``, then a new ``Wall`` object for each of its 30-50 wall cells through
``Grid.set`` (with its bounds checks), then draws the start column and the three objects. The
walls depend on nothing but the env's size and the hallway's length, and no MemoryEnv code ever
changes one. That made a reset cost 60 us against 16 us for a step (MiniGrid-MemoryS7 at a 3 x 3
view on this project's VM), and an agent that has learned the task ends an episode every 9 steps
or so: resets then cost a trained agent's envs a third as much as its steps.

:class:`FastMemoryGrid` stands in for ``MemoryEnv._gen_grid`` on one env. It keeps, for each
hallway length it has met, the list of the grid's cells with its walls in place, and for each
episode copies that list into a new ``Grid`` (the ``Wall`` objects are shared between the
env's episodes: walls hold nothing but their type and colour, and nothing in a MemoryEnv
episode changes them), then makes the same draws from the env's generator, in the same order,
with the same calls (``_rand_int``, ``_rand_elem``), and places the same objects. The grid,
start, targets and generator state after a reset are the same as MiniGrid's
(``tests/test_minigrid_memory.py`` resets both over many seeds, sizes and random lengths and
steps them side by side); ``python benchmarks/minigrid_reset.py`` times the two.

:class:`KeptViews` goes with it where the env has mnm_rl's fast view: no cell of a MemoryEnv
episode ever changes, so the image of a view depends only on the episode's layout, the agent's
cell and direction and the view's size, and each is computed once and kept (raw stepping
1.65-1.77x as fast at a 3 x 3 view, 2.7-3.5x at 7 x 7; ``MNM_RL_KEPT_VIEWS=0`` computes every
view).

:class:`FastMemoryStep` stands in for ``MemoryEnv.step``: the same step in plain integer
arithmetic, without MiniGrid's numpy ``front_pos`` and ``dir_vec``, its ``Grid.get`` and its
chain of action comparisons (``MNM_RL_FAST_STEP=0`` keeps MiniGrid's own).

:func:`use_fast_memory_grid` installs them on one env; mnm_rl's env builder does so for every
``MemoryEnv`` that keeps MiniGrid's ``_gen_grid`` (``MNM_RL_FAST_RESET=0`` in the environment
keeps MiniGrid's own).
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
from minigrid.core.grid import Grid
from minigrid.core.world_object import Ball, Key, Wall, WorldObj
from minigrid.envs.memory import MemoryEnv

from mnm_rl.envs.minigrid_view import AHEAD, FastGenObs, view_image

#: Set to ``0`` in the environment to keep MiniGrid's own ``MemoryEnv._gen_grid`` everywhere.
SWITCH_VARIABLE = "MNM_RL_FAST_RESET"
#: Set to ``0`` in the environment to compute every view of a MiniGrid-Memory env (with the fast
#: view's code) instead of keeping the images of the views met (:class:`KeptViews`).
KEPT_VIEWS_VARIABLE = "MNM_RL_KEPT_VIEWS"
#: Set to ``0`` in the environment to step MiniGrid-Memory envs with MiniGrid's own
#: ``MemoryEnv.step`` instead of :class:`FastMemoryStep`.
FAST_STEP_VARIABLE = "MNM_RL_FAST_STEP"

#: MiniGrid's actions (``MiniGridEnv.Actions``) by value.
LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(7)


def memory_walls(width: int, height: int, hallway_end: int) -> list[WorldObj | None]:
    """The cells (``Grid.grid``'s row-major list) of a MemoryEnv grid with only its walls:
    the outer walls, the start room's, the horizontal hallway's and the vertical hallway's
    (MiniGrid's ``MemoryEnv._gen_grid``, whose hallway runs east to column ``hallway_end``)."""
    cells: list[WorldObj | None] = [None] * (width * height)
    wall = Wall()

    def put(x: int, y: int) -> None:
        cells[y * width + x] = wall

    for x in range(width):
        put(x, 0)
        put(x, height - 1)
    for y in range(height):
        put(0, y)
        put(width - 1, y)
    upper_room_wall, lower_room_wall = height // 2 - 2, height // 2 + 2
    for x in range(1, 5):
        put(x, upper_room_wall)
        put(x, lower_room_wall)
    put(4, upper_room_wall + 1)
    put(4, lower_room_wall - 1)
    for x in range(5, hallway_end):
        put(x, upper_room_wall + 1)
        put(x, lower_room_wall - 1)
    for y in range(height):
        if y != height // 2:
            put(hallway_end, y)
        put(hallway_end + 2, y)
    return cells


class FastMemoryGrid:
    """Stands in for ``MemoryEnv._gen_grid`` on one env (as an attribute of the instance): the
    same grid, start, targets and draws, the walls copied from a plan kept per hallway length
    (see the module docstring)."""

    def __init__(self, env: MemoryEnv) -> None:
        self.env = env
        #: ``(width, height, hallway_end)`` -> the cells with the walls in place
        self.plans: dict[tuple[int, int, int], list[WorldObj | None]] = {}
        #: The current episode's grid, and what its cells are made of: ``(width, height,
        #: hallway_end, the start room's object class, the two split objects' classes)``. Two
        #: episodes with the same layout have grids whose cells encode alike.
        self.grid: Grid | None = None
        self.layout: tuple | None = None

    def __call__(self, width: int, height: int) -> None:
        env = self.env
        # MiniGrid's draws, in its order: the hallway's end (random_length only), the start
        # column, the start room's object, the order of the two objects at the split.
        hallway_end = env._rand_int(4, width - 2) if env.random_length else width - 3
        key = (width, height, hallway_end)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = memory_walls(width, height, hallway_end)
        grid = Grid(width, height)
        grid.grid = plan.copy()
        env.grid = grid

        middle = height // 2
        env.agent_pos = np.array((env._rand_int(1, hallway_end + 1), middle))
        env.agent_dir = 0

        start_room_obj = env._rand_elem([Key, Ball])
        cells = grid.grid
        cells[(middle - 1) * width + 1] = start_room_obj("green")
        other_objs = env._rand_elem([[Ball, Key], [Key, Ball]])
        pos0 = (hallway_end + 1, middle - 2)
        pos1 = (hallway_end + 1, middle + 2)
        cells[pos0[1] * width + pos0[0]] = other_objs[0]("green")
        cells[pos1[1] * width + pos1[0]] = other_objs[1]("green")

        self.grid, self.layout = grid, (*key, start_room_obj, *other_objs)

        if start_room_obj == other_objs[0]:
            env.success_pos = (pos0[0], pos0[1] + 1)
            env.failure_pos = (pos1[0], pos1[1] - 1)
        else:
            env.success_pos = (pos1[0], pos1[1] - 1)
            env.failure_pos = (pos0[0], pos0[1] + 1)
        env.mission = "go to the matching object at the end of the hallway"


class KeptViews(FastGenObs):
    """Stands in for the fast view (:class:`~mnm_rl.envs.minigrid_view.FastGenObs`) of a
    MiniGrid-Memory env whose grids :class:`FastMemoryGrid` lays out: the image of a view is
    computed once per layout, agent cell, direction and view size, kept (for every env of the
    process), and copied on every later visit.

    A view's image depends only on the cells it shows and on what the agent carries. In a
    MemoryEnv episode no cell ever changes (no doors, and MemoryEnv turns ``pickup`` into
    ``toggle``, which a key or a ball ignores), the agent carries nothing, and two episodes with
    the same layout (:attr:`FastMemoryGrid.layout`) have cells that encode alike. So the kept
    image is the one the view's code would compute. Where that reasoning may not hold, the view
    is computed: when the env's grid is not the one :class:`FastMemoryGrid` made for the episode
    (replaced by other code), or the agent carries something. A grid edited in place during an
    episode by code outside MiniGrid-Memory is not noticed: switch it off there with
    ``MNM_RL_KEPT_VIEWS=0``. It is not installed on a subclass with a ``step`` of its own.
    ``tests/test_minigrid_memory.py`` compares kept views with MiniGrid's over thousands of
    steps; ``python benchmarks/minigrid_reset.py`` times them (raw stepping of
    MiniGrid-MemoryS7 1.65-1.77x as fast at a 3 x 3 view, 2.7-3.5x at 7 x 7).
    """

    #: The images of the views met so far by this process's MiniGrid-Memory envs: ``(layout,
    #: agent x, y, direction, view size, see_through_walls)`` -> ``uint8 [V, V, 3]``. Bounded by
    #: the layouts (4 per hallway length) times the cells an agent can stand on times 4
    #: directions: a few thousand small arrays at most for the sizes MiniGrid registers.
    images: dict[tuple, np.ndarray] = {}

    def __init__(self, env: MemoryEnv, grids: FastMemoryGrid) -> None:
        super().__init__(env)
        self.grids = grids

    def __call__(self) -> dict[str, Any]:
        env, grids = self.env, self.grids
        if grids.grid is None or env.grid is not grids.grid or env.carrying is not None:
            return super().__call__()
        x, y = env.agent_pos
        key = (grids.layout, x, y, env.agent_dir, env.agent_view_size, env.see_through_walls)
        image = KeptViews.images.get(key)
        if image is None:
            image = KeptViews.images[key] = view_image(env)
        return {"image": image.copy(), "direction": env.agent_dir, "mission": env.mission}


class FastMemoryStep:
    """Stands in for ``MemoryEnv.step`` on one env (as an attribute of the instance): MiniGrid's
    step (``MiniGridEnv.step``, with MemoryEnv's ``pickup`` turned into ``toggle`` and its
    success and failure cells) in plain integer arithmetic. MiniGrid's own builds numpy arrays
    for the cell ahead (``front_pos``, ``dir_vec``) at every step, reads it through ``Grid.get``'s
    assertions and compares the action with up to seven enum members.

    It takes the same branches with the same effects: a turn, a move onto an empty or
    overlappable cell (a goal or lava ends the episode as in MiniGrid), ``toggle`` (and
    ``pickup``) passed to the object ahead, ``drop`` and ``done`` without effect for an agent
    that carries nothing; then the step count, truncation, the observation (``env.gen_obs()``,
    whichever is installed) and MemoryEnv's rewards. After a move ``agent_pos`` is a tuple of
    Python ints (MiniGrid's: of numpy integers; equal, and hashed alike). MiniGrid's own step runs
    for anything else: an action that is not an ``int`` or ``numpy.int64`` from 0 to 6 (its
    ``ValueError`` for an unknown one), an agent that carries something, a grid that is not a
    plain ``Grid``, an agent direction out of range, no agent position (before the first
    reset), a cell ahead outside the grid, or ``render_mode="human"``.
    ``tests/test_minigrid_memory.py`` steps both side by side.
    """

    def __init__(self, env: MemoryEnv) -> None:
        self.env = env

    def __call__(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        env = self.env
        kind = action.__class__
        if kind is np.int64:
            action = int(action)
        elif kind is not int:
            return MemoryEnv.step(env, action)
        grid, direction = env.grid, env.agent_dir
        if (
            not 0 <= action <= DONE
            or env.agent_pos is None  # before the first reset
            or env.carrying is not None
            or type(grid) is not Grid
            or direction.__class__ is not int
            or not 0 <= direction < 4
            or env.render_mode == "human"
        ):
            return MemoryEnv.step(env, action)
        x, y = env.agent_pos
        dx, dy = AHEAD[direction]
        ahead_x, ahead_y = int(x) + dx, int(y) + dy
        width = grid.width
        if not (0 <= ahead_x < width and 0 <= ahead_y < grid.height):
            return MemoryEnv.step(env, action)  # MiniGrid's Grid.get raises there
        env.step_count += 1
        reward = 0
        terminated = False
        if action == LEFT:
            env.agent_dir = direction - 1 if direction else 3
        elif action == RIGHT:
            env.agent_dir = (direction + 1) % 4
        elif action == FORWARD:
            cell = grid.grid[ahead_y * width + ahead_x]
            if cell is None or cell.can_overlap():
                x, y = ahead_x, ahead_y
                env.agent_pos = (x, y)
            if cell is not None and cell.type == "goal":
                terminated = True
                reward = env._reward()
            if cell is not None and cell.type == "lava":
                terminated = True
        elif action == TOGGLE or action == PICKUP:  # MemoryEnv: pickup is toggle
            cell = grid.grid[ahead_y * width + ahead_x]
            if cell:
                cell.toggle(env, np.array((ahead_x, ahead_y)))
        # DROP with nothing carried, DONE: no effect
        truncated = env.step_count >= env.max_steps
        obs = env.gen_obs()
        position = (int(x), int(y))
        if position == env.success_pos:
            reward = env._reward()
            terminated = True
        if position == env.failure_pos:
            reward = 0
            terminated = True
        return obs, reward, terminated, truncated, {}


def fast_step_enabled() -> bool:
    """Whether :func:`use_fast_memory_grid` may install :class:`FastMemoryStep`: not switched off
    by ``MNM_RL_FAST_STEP=0``."""
    return os.environ.get(FAST_STEP_VARIABLE, "1") != "0"


def kept_views_enabled() -> bool:
    """Whether :func:`use_fast_memory_grid` may keep views (:class:`KeptViews`): not switched
    off by ``MNM_RL_KEPT_VIEWS=0``."""
    return os.environ.get(KEPT_VIEWS_VARIABLE, "1") != "0"


def fast_memory_grid_enabled() -> bool:
    """Whether :func:`use_fast_memory_grid` may install the fast grid: not switched off by
    ``MNM_RL_FAST_RESET=0``."""
    return os.environ.get(SWITCH_VARIABLE, "1") != "0"


def use_fast_memory_grid(
    env: gym.Env, kept_views: bool | None = None, fast_step: bool | None = None
) -> bool:
    """Lay out ``env``'s MiniGrid-Memory grids with :class:`FastMemoryGrid` from now on, step it
    with :class:`FastMemoryStep` (with ``fast_step`` ``None`` unless ``MNM_RL_FAST_STEP=0``, else
    as ``fast_step`` says) and, where it has the fast view
    (:func:`~mnm_rl.envs.minigrid_view.use_fast_view`, installed first), keep its views' images
    (:class:`KeptViews`: with ``kept_views`` ``None`` unless ``MNM_RL_KEPT_VIEWS=0``, else as
    ``kept_views`` says). Neither the step nor the kept views go on a subclass with a ``step``
    of its own.

    Applies to an env whose base (``env.unwrapped``) is a ``MemoryEnv`` that keeps MiniGrid's
    own ``_gen_grid`` (a subclass that changes it keeps its own), unless
    ``MNM_RL_FAST_RESET=0``. Returns whether the env now has the fast grid; any other env is left
    as it is (``False``). Installing it twice is harmless.
    """
    base = env.unwrapped
    if not isinstance(base, MemoryEnv):
        return False
    if isinstance(base.__dict__.get("_gen_grid"), FastMemoryGrid):
        return True
    if (
        not fast_memory_grid_enabled()
        or "_gen_grid" in base.__dict__  # replaced on this instance by someone else
        or type(base)._gen_grid is not MemoryEnv._gen_grid
    ):
        return False
    base._gen_grid = grids = FastMemoryGrid(base)
    if kept_views is None:
        kept_views = kept_views_enabled()
    if fast_step is None:
        fast_step = fast_step_enabled()
    # a subclass with a step of its own may change cells during an episode
    steps_as_memory = type(base).step is MemoryEnv.step and "step" not in base.__dict__
    if kept_views and steps_as_memory and type(base.__dict__.get("gen_obs")) is FastGenObs:
        base.gen_obs = KeptViews(base, grids)
    if fast_step and steps_as_memory:
        base.step = FastMemoryStep(base)
    return True
