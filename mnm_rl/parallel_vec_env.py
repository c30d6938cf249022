"""A VecEnv that steps its environments in parallel groups: one group in the calling process and
one in each worker process, with actions and results passed through shared memory.

Why not stable-baselines3's ``SubprocVecEnv``: it runs one process per environment and exchanges
every step through pipes. On a small VM a pipe round trip costs about 100 us (the time to wake
the other process), more than a MiniGrid step, and eight processes on two cores contend for them:
``SubprocVecEnv`` stepped 8 MiniGrid envs at 0.41x the rate of ``DummyVecEnv`` there, where this
class with one worker stepped them at 1.64x (``benchmarks/vec_env_step.py``). Here a worker steps a
whole group, the calling process steps its own group meanwhile instead of waiting, and each side
waits for the other by first watching a counter in shared memory (a round trip of about 2 us)
and only then sleeping (see :class:`_Bell`).

Every group is a ``DummyVecEnv`` (:class:`~mnm_rl.lean_vec_env.LeanDummyVecEnv`), so resets,
``terminal_observation``, ``reset_infos`` and seeding are the same as stepping all environments
in one ``DummyVecEnv``: the same seeds and actions give the same observations, rewards, dones
and infos.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import platform
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import (
    CloudpickleWrapper,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)
from stable_baselines3.common.vec_env.util import dict_to_obs, obs_space_info

from mnm_rl.lean_vec_env import LeanDummyVecEnv

#: How long a waiting process watches the shared counter before it sleeps on a pipe. Longer than
#: a small policy's step (0.3-1 ms on a CPU), so that in a rollout neither side sleeps; short
#: enough that a worker stops using its core soon after the rollout ends. While it watches, it
#: yields the core at every look, so that a busy thread of the trainer (the MNM kernel's second
#: thread, say) is not held up by it: on MiniGrid-MemoryS9 with two kernel threads, training
#: with the worker took 61 s when it spun without yielding, 50 s when it yielded (46.5 s
#: without the worker; a throwaway A/B, so indicative: docs/benchmarks.md).
SPIN_SECONDS = 0.002
#: How long a sleeping process waits on its pipe before it looks at the counter again: the
#: longest a lost wake-up can delay it (see :class:`_Bell`), and how often a waiting caller checks
#: that its workers are alive.
POLL_SECONDS = 0.01
#: Bytes of shared memory for one step's pickled infos; larger infos go through the pipe.
INFO_BYTES = 1 << 16

#: x86 processors make one core's stores visible to the others in the order they were made, so
#: a process that sees a counter set also sees the results written before it. Other processors
#: (ARM) do not promise that, and Python has no memory fence: there a :class:`_Bell` does not
#: watch the counter but always goes through its pipe, whose system calls order the memory.
SPIN_SAFE = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")

# Slots of the int64 control block at the start of each worker's shared memory.
_COMMAND, _COMMAND_SEQ, _COMMAND_SLEEPING, _DONE_SEQ, _DONE_SLEEPING, _STATUS, _INFO_SIZE = range(7)
_CONTROL_SLOTS = 8
# Commands (the _COMMAND slot) and statuses (the _STATUS slot).
_STEP, _RESET, _CALL, _CLOSE = range(4)
_OK, _FAILED = range(2)


def _obs_dict(obs: Any) -> dict[Any, np.ndarray]:
    """A vec env's observation keyed as ``obs_space_info`` keys it: by name for a Dict space,
    by position for a Tuple space, ``None`` for any other."""
    if isinstance(obs, dict):
        return obs
    if isinstance(obs, tuple):
        return dict(enumerate(obs))
    return {None: obs}


class EnvWorkerError(RuntimeError):
    """An environment failed in a worker process of :class:`ParallelVecEnv`, or the worker died."""


class _Bell:
    """One process waits until a counter in shared memory reaches a value; another sets it.

    With ``spin``, the waiter watches the counter for up to :data:`SPIN_SECONDS`, then marks
    itself asleep and sleeps on a pipe, which the ringer writes a byte to when it sees the mark.
    The two marks are written and read in opposite orders by the two processes without a memory
    fence, so a ringer may miss a mark set at the same instant: the waiter then wakes after
    :data:`POLL_SECONDS` anyway and finds the counter set. A lost wake-up costs one poll
    interval, never a hang. Without ``spin`` (see :data:`SPIN_SAFE`), every ring sends a byte and
    every wait takes one.
    """

    def __init__(self, control: np.ndarray, seq_slot: int, sleeping_slot: int, spin: bool):
        self.control, self.seq_slot, self.sleeping_slot = control, seq_slot, sleeping_slot
        self.spin = spin

    def ring(self, seq: int, pipe: Connection) -> None:
        self.control[self.seq_slot] = seq
        if not self.spin or self.control[self.sleeping_slot]:
            pipe.send_bytes(b"\0")

    def wait(self, seq: int, pipe: Connection, check: Callable[[], None] = lambda: None) -> None:
        """Return once the counter is ``seq``; ``check`` runs at every poll interval (and may
        raise, e.g. when the other process died)."""
        control, slot = self.control, self.seq_slot
        if not self.spin:
            while not pipe.poll(POLL_SECONDS):
                check()
            pipe.recv_bytes()  # EOFError when the ringer has gone
            return
        deadline = time.perf_counter() + SPIN_SECONDS
        while control[slot] != seq:
            if time.perf_counter() > deadline:
                break
            os.sched_yield()  # a thread that wants this core (an OpenMP helper) gets it
        else:
            return
        control[self.sleeping_slot] = 1
        try:
            while control[slot] != seq:
                if pipe.poll(POLL_SECONDS):
                    while pipe.poll():
                        pipe.recv_bytes()  # EOFError when the ringer has gone
                else:
                    check()
        finally:
            control[self.sleeping_slot] = 0


class _SharedArrays:
    """Views into one shared-memory block: the control slots, the actions, observations,
    rewards and dones of ``n_envs`` environments, and a buffer for pickled infos."""

    def __init__(
        self,
        shm: shared_memory.SharedMemory,
        n_envs: int,
        observation_space: gym.Space,
        action_space: gym.Space,
    ):
        layout, _ = self.layout(n_envs, observation_space, action_space)
        views = {
            name: np.ndarray(shape, dtype, buffer=shm.buf, offset=offset)
            for name, shape, dtype, offset in layout
        }
        self.control, self.actions = views["control"], views["actions"]
        self.rewards, self.dones, self.infos = views["rewards"], views["dones"], views["infos"]
        self.obs = {name[1]: view for name, view in views.items() if isinstance(name, tuple)}

    @staticmethod
    def layout(
        n_envs: int, observation_space: gym.Space, action_space: gym.Space
    ) -> tuple[list[tuple[Any, tuple[int, ...], np.dtype, int]], int]:
        """``([(name, shape, dtype, byte offset)], total bytes)``, each array on its own cache
        line; an observation's name is ``("obs", key)``."""
        keys, shapes, dtypes = obs_space_info(observation_space)
        fields = [
            ("control", (_CONTROL_SLOTS,), np.dtype(np.int64)),
            ("actions", (n_envs, *action_space.shape), np.dtype(action_space.dtype)),
            ("rewards", (n_envs,), np.dtype(np.float32)),
            ("dones", (n_envs,), np.dtype(bool)),
            ("infos", (INFO_BYTES,), np.dtype(np.uint8)),
            *((("obs", k), (n_envs, *shapes[k]), np.dtype(dtypes[k])) for k in keys),
        ]
        layout, offset = [], 0
        for name, shape, dtype in fields:
            offset = -(-offset // 64) * 64
            layout.append((name, shape, dtype, offset))
            offset += int(np.prod(shape)) * dtype.itemsize
        return layout, offset

    def write_obs(self, obs: VecEnvObs) -> None:
        for key, value in _obs_dict(obs).items():
            self.obs[key][...] = value

    def write_infos(self, infos: Any, pipe: Connection) -> None:
        data = pickle.dumps(infos, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) <= INFO_BYTES:
            self.infos[: len(data)] = np.frombuffer(data, np.uint8)
            self.control[_INFO_SIZE] = len(data)
        else:
            self.control[_INFO_SIZE] = -1
            pipe.send(infos)

    def read_infos(self, pipe: Connection) -> Any:
        size = int(self.control[_INFO_SIZE])
        return pipe.recv() if size < 0 else pickle.loads(self.infos[:size].tobytes())


def _worker(
    env_fns: CloudpickleWrapper,
    shm_name: str,
    pipe: Connection,
    command_bell: Connection,
    done_bell: Connection,
    spin: bool,
) -> None:
    """A worker process: build the group's ``DummyVecEnv``, then serve commands until closed."""
    # Ctrl-C reaches the whole process group: the caller decides when to stop (after saving a
    # checkpoint, say) and then closes the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        venv = LeanDummyVecEnv(env_fns.var)
    except BaseException:  # noqa: BLE001  (reported to the caller, which raises)
        pipe.send(("failed", traceback.format_exc()))
        return
    pipe.send(("ready", (venv.observation_space, venv.action_space)))
    shm = shared_memory.SharedMemory(name=shm_name)  # the caller unlinks it
    arrays = _SharedArrays(shm, venv.num_envs, venv.observation_space, venv.action_space)
    commands = _Bell(arrays.control, _COMMAND_SEQ, _COMMAND_SLEEPING, spin)
    done = _Bell(arrays.control, _DONE_SEQ, _DONE_SLEEPING, spin)
    seq = 0
    try:
        while True:
            seq += 1
            commands.wait(seq, command_bell)
            command = int(arrays.control[_COMMAND])
            if command == _CLOSE:
                break
            try:
                if command == _STEP:
                    obs, rewards, dones, infos = venv.step(arrays.actions.copy())
                    arrays.write_obs(obs)
                    arrays.rewards[...] = rewards
                    arrays.dones[...] = dones
                    arrays.write_infos(infos, pipe)
                elif command == _RESET:
                    venv._seeds, venv._options = pipe.recv()
                    arrays.write_obs(venv.reset())
                    arrays.write_infos(venv.reset_infos, pipe)
                else:  # _CALL
                    method, args, kwargs = pipe.recv()
                    pipe.send(getattr(venv, method)(*args, **kwargs))
                arrays.control[_STATUS] = _OK
            except Exception:  # noqa: BLE001  (reported to the caller, which raises)
                arrays.control[_STATUS] = _FAILED
                pipe.send(traceback.format_exc())
            done.ring(seq, done_bell)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the caller has gone
    finally:
        venv.close()
        del arrays, commands, done
        shm.close()


class _WorkerHandle:
    """The calling side of one worker: its process, pipes and shared arrays."""

    def __init__(
        self,
        context: mp.context.BaseContext,
        env_fns: list[Callable[[], gym.Env]],
        envs: range,
        observation_space: gym.Space,
        action_space: gym.Space,
        spin: bool,
    ):
        self.envs = envs
        self.shm = shared_memory.SharedMemory(
            create=True, size=_SharedArrays.layout(len(envs), observation_space, action_space)[1]
        )
        self.arrays = _SharedArrays(self.shm, len(envs), observation_space, action_space)
        self.arrays.control[:] = 0
        self.pipe, worker_pipe = context.Pipe()
        command_bell_in, self.command_bell = context.Pipe(duplex=False)
        self.done_bell, done_bell_out = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_worker,
            args=(
                CloudpickleWrapper(env_fns),
                self.shm.name,
                worker_pipe,
                command_bell_in,
                done_bell_out,
                spin,
            ),
            daemon=True,
            name=f"env-worker-{envs.start}-{envs.stop - 1}",
        )
        self.process.start()
        for end in (worker_pipe, command_bell_in, done_bell_out):
            end.close()
        self.commands = _Bell(self.arrays.control, _COMMAND_SEQ, _COMMAND_SLEEPING, spin)
        self.done = _Bell(self.arrays.control, _DONE_SEQ, _DONE_SLEEPING, spin)
        self.seq = 0
        self.pending = False

    def describe(self) -> str:
        return f"env worker for envs {self.envs.start}-{self.envs.stop - 1}"

    def check_alive(self) -> None:
        if not self.process.is_alive():
            raise EnvWorkerError(f"{self.describe()} exited (code {self.process.exitcode})")

    def handshake(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        try:
            kind, payload = self.pipe.recv()
        except EOFError:
            raise EnvWorkerError(f"{self.describe()} exited while making its envs") from None
        if kind == "failed":
            raise EnvWorkerError(f"{self.describe()} could not make its envs:\n{payload}")
        if payload != (observation_space, action_space):
            raise EnvWorkerError(
                f"{self.describe()} made envs with spaces {payload}, unlike env 0's "
                f"{(observation_space, action_space)}"
            )

    def send(self, command: int, payload: Any = None) -> None:
        """Start a command; :meth:`finish` waits for it."""
        try:
            if payload is not None:
                self.pipe.send(payload)
            self.seq += 1
            self.arrays.control[_COMMAND] = command
            self.pending = True
            self.commands.ring(self.seq, self.command_bell)
        except OSError:  # the pipes of a worker that has died
            self.pending = False
            raise EnvWorkerError(f"{self.describe()} exited") from None

    def finish(self) -> None:
        """Wait for the command sent last; raise :class:`EnvWorkerError` if it failed."""
        try:
            self.done.wait(self.seq, self.done_bell, self.check_alive)
        except EOFError:
            raise EnvWorkerError(f"{self.describe()} exited") from None
        finally:
            self.pending = False
        if self.arrays.control[_STATUS] == _FAILED:
            raise EnvWorkerError(f"{self.describe()} failed:\n{self.pipe.recv()}")

    def read_infos(self) -> Any:
        """The infos of the last step or reset."""
        return self.arrays.read_infos(self.pipe)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                if self.pending:
                    self.finish()
                self.send(_CLOSE)
            except (EnvWorkerError, OSError):
                pass
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join()
        for pipe in (self.pipe, self.command_bell, self.done_bell):
            pipe.close()
        del self.arrays, self.commands, self.done
        try:
            self.shm.close()
        except BufferError:  # a caller still holds a view; the block goes when that does
            pass
        self.shm.unlink()


class ParallelVecEnv(VecEnv):
    """Step ``len(env_fns)`` environments in ``n_workers + 1`` groups at the same time: the first
    group in this process, each other group in a worker process.

    Args:
        env_fns: functions that make the environments, as for ``DummyVecEnv``; with a start method
            other than ``fork`` they are sent to the workers with cloudpickle.
        n_workers: worker processes, at least 1 and fewer than the number of environments. On a
            machine with ``C`` free cores, ``C - 1`` workers use them all.
        start_method: ``multiprocessing`` start method (default: ``forkserver`` where it exists,
            else ``spawn``; ``fork`` is unsafe once torch has started its threads).
        spin: wait for the other side by watching shared memory before sleeping (default: on
            x86, where that is safe, see :data:`SPIN_SAFE`); ``False``: through pipes only,
            slower on a small machine but correct on any processor.

    The groups are contiguous, the workers' at least as large as this process's (which also runs
    the policy). Use it like any ``VecEnv``, and call :meth:`close` at the end (or use it as a
    context manager): that stops the workers and frees the shared memory.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        n_workers: int = 1,
        start_method: str | None = None,
        spin: bool | None = None,
    ):
        env_fns = list(env_fns)
        if not 1 <= n_workers < len(env_fns):
            raise ValueError(
                f"n_workers must be between 1 and the number of envs minus 1 ({len(env_fns) - 1}),"
                f" got {n_workers}"
            )
        sizes = sorted(len(g) for g in np.array_split(np.arange(len(env_fns)), n_workers + 1))
        bounds = np.cumsum([0, *sizes]).tolist()
        groups = [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(start_method)
        self._local = LeanDummyVecEnv(env_fns[: groups[0].stop])
        observation_space, action_space = self._local.observation_space, self._local.action_space
        self._workers: list[_WorkerHandle] = []
        self._closed = False
        try:
            for group in groups[1:]:
                fns = env_fns[group.start : group.stop]
                self._workers.append(
                    _WorkerHandle(
                        context,
                        fns,
                        group,
                        observation_space,
                        action_space,
                        SPIN_SAFE if spin is None else spin,
                    )
                )
            for worker in self._workers:
                worker.handshake(observation_space, action_space)
            # After the workers: VecEnv.__init__ asks every env for its render_mode.
            super().__init__(len(env_fns), observation_space, action_space)
        except BaseException:
            self.close()
            raise
        self._obs_keys = list(obs_space_info(self.observation_space)[0])
        self._actions: np.ndarray | None = None

    @property
    def groups(self) -> list[range]:
        """The environments of each group: this process's first, then each worker's."""
        return [range(self._local.num_envs), *(w.envs for w in self._workers)]

    # --------------------------------------------------------------------------------- stepping
    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        actions, self._actions = self._actions, None
        for worker in self._workers:
            np.copyto(
                worker.arrays.actions,
                actions[worker.envs.start : worker.envs.stop],
                casting="same_kind",
            )
        local, results = self._run_groups(
            [(worker, _STEP, None) for worker in self._workers],
            lambda: self._local.step(actions[: self._local.num_envs]),
            lambda w: (w.arrays.obs, w.arrays.rewards, w.arrays.dones, w.read_infos()),
        )
        groups = [local, *results]
        obs = self._join_obs([g[0] for g in groups])
        infos = [info for g in groups for info in g[3]]
        return (
            obs,
            np.concatenate([g[1] for g in groups]),
            np.concatenate([g[2] for g in groups]),
            infos,
        )

    def reset(self) -> VecEnvObs:
        k = self._local.num_envs

        def reset_here() -> tuple[VecEnvObs, list[dict]]:
            self._local._seeds, self._local._options = self._seeds[:k], self._options[:k]
            return self._local.reset(), list(self._local.reset_infos)

        sends = [
            (
                w,
                _RESET,
                (
                    self._seeds[w.envs.start : w.envs.stop],
                    self._options[w.envs.start : w.envs.stop],
                ),
            )
            for w in self._workers
        ]
        local, results = self._run_groups(
            sends, reset_here, lambda w: (w.arrays.obs, w.read_infos())
        )
        groups = [local, *results]
        self.reset_infos = [info for g in groups for info in g[1]]
        self._reset_seeds()
        self._reset_options()
        return self._join_obs([g[0] for g in groups])

    def _run_groups(
        self,
        sends: list[tuple[_WorkerHandle, int, Any]],
        here: Callable[[], Any],
        read: Callable[[_WorkerHandle], Any],
    ) -> tuple[Any, list[Any]]:
        """Start ``(worker, command, payload)`` on each worker, run ``here()`` in this process
        meanwhile, then wait for each worker and ``read(worker)`` its result.

        Every started worker is waited for and read, even after a failure here or in another
        worker, so that all stay in step with this process; then the first failure is raised.
        """
        started: list[_WorkerHandle] = []
        error: BaseException | None = None
        mine = None
        try:
            for worker, command, payload in sends:
                worker.send(command, payload)
                started.append(worker)
            mine = here()
        except BaseException as err:  # noqa: BLE001  (raised below, after the workers)
            error = err
        results = []
        for worker in started:
            try:
                worker.finish()
                results.append(read(worker))
            except EnvWorkerError as err:
                error = error or err
        if error is not None:
            raise error
        return mine, results

    def _join_obs(self, parts: list[Any]) -> VecEnvObs:
        """Concatenate the groups' observations (new arrays, as ``DummyVecEnv`` returns)."""
        as_dicts = [_obs_dict(part) for part in parts]
        joined = {k: np.concatenate([part[k] for part in as_dicts]) for k in self._obs_keys}
        return dict_to_obs(self.observation_space, joined)

    # ------------------------------------------------------------------------ calls on the envs
    def _call(self, method: str, indices: VecEnvIndices, *args: Any, **kwargs: Any) -> list[Any]:
        """``DummyVecEnv.<method>(*args, indices=..., **kwargs)`` on every group that holds one
        of ``indices``, results in the order of ``indices``."""
        wanted = list(self._get_indices(indices))
        by_group: list[list[int]] = [[i - g.start for i in wanted if i in g] for g in self.groups]
        sends = [
            (worker, _CALL, (method, args, {**kwargs, "indices": local}))
            for worker, local in zip(self._workers, by_group[1:], strict=True)
            if local
        ]
        mine, theirs = self._run_groups(
            sends,
            lambda: (
                getattr(self._local, method)(*args, indices=by_group[0], **kwargs)
                if by_group[0]
                else []
            ),
            lambda w: w.pipe.recv(),
        )
        # Results per group, in its local index order; DummyVecEnv.set_attr returns None.
        per_group = iter([mine, *theirs] if by_group[0] else theirs)
        results: dict[int, Any] = {}
        for group, local in zip(self.groups, by_group, strict=True):
            if local:
                values = next(per_group) or [None] * len(local)
                results.update(zip((group.start + i for i in local), values, strict=True))
        return [results[i] for i in wanted]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._call("get_attr", indices, attr_name)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._call("set_attr", indices, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs
    ) -> list[Any]:
        return self._call("env_method", indices, method_name, *method_args, **method_kwargs)

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        return self._call("env_is_wrapped", indices, wrapper_class)

    def get_images(self) -> Sequence[np.ndarray | None]:
        mine, theirs = self._run_groups(
            [(worker, _CALL, ("get_images", (), {})) for worker in self._workers],
            self._local.get_images,
            lambda w: w.pipe.recv(),
        )
        return [image for group in [mine, *theirs] for image in group]

    # -------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the workers, close every env and free the shared memory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.close()
        self._local.close()

    def __enter__(self) -> ParallelVecEnv:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["EnvWorkerError", "ParallelVecEnv"]
