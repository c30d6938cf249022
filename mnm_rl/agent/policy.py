"""Actor-critic policy whose recurrent feature extractor is a memory core."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.type_aliases import Schedule
from torch import Tensor, nn
from torch.distributions import Categorical

from mnm_rl.agent import action_heads, explicit, policy_step
from mnm_rl.agent.extractors import MemoryFeaturesExtractor
from mnm_rl.memory import CoreState, RecurrentCore, make_core
from mnm_rl.memory.base import Gradients

CRITIC_PREFIX = "critic/"

Observation = Tensor | dict[str, Tensor]
#: The backward pass of :meth:`RecurrentMemoryPolicy.explicit_forward_sequence`: the logits' and
#: values' gradients in, every parameter's gradient out.
PolicyBackward = Callable[[Tensor, Tensor], Gradients]


class PolicyStep(NamedTuple):
    """What :meth:`RecurrentMemoryPolicy.act` gives for one step of ``B`` envs."""

    actions: Tensor  #: ``[B]``, int64
    log_probs: Tensor  #: ``[B]``, the actions' log-probabilities
    values: Tensor  #: ``[B]``, the critic's
    state: CoreState  #: after the step
    finite: bool  #: whether every action logit was finite


class PendingStep:
    """A step begun by :meth:`RecurrentMemoryPolicy.act_later`: calling it waits for the step
    (the first time) and gives its :class:`PolicyStep`."""

    def __init__(
        self, wait: Callable[[], PolicyStep] | None = None, step: PolicyStep | None = None
    ):
        self._wait, self._step = wait, step

    def __call__(self) -> PolicyStep:
        if self._step is None:
            assert self._wait is not None
            self._step, self._wait = self._wait(), None
        return self._step


def map_obs(obs: Observation, fn) -> Observation:
    """Apply ``fn`` to a tensor observation or to every entry of a dict observation."""
    return {k: fn(v) for k, v in obs.items()} if isinstance(obs, dict) else fn(obs)


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: type[nn.Module]):
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), activation()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def bump_parameter_versions(optimizer: torch.optim.Optimizer, *_) -> None:
    """An optimizer's step post-hook: marks every parameter it holds as changed in place (bumps
    its version counter), which torch's fused optimizers do not do themselves."""
    torch.autograd.graph.increment_version(
        [p for group in optimizer.param_groups for p in group["params"]]
    )


def _summed_aux(actor: Mapping[str, Tensor], critic: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The memory diagnostics of separate actor and critic cores, summed per key."""
    return {k: actor[k] + critic[k] for k in actor}


def check_action_space(action_space: spaces.Space) -> None:
    """Raise a precise error for action spaces the agent does not support."""
    if not isinstance(action_space, spaces.Discrete):
        raise ValueError(
            f"MemoryPPO supports Discrete action spaces only; got {action_space}. "
            "Box, MultiDiscrete and MultiBinary actions are not implemented."
        )


class RecurrentMemoryPolicy(BasePolicy):
    """Observation encoder -> memory core -> policy and value heads.

    Args:
        observation_space, action_space, lr_schedule: as for every SB3 policy.
        core: ``"mnm-p"``, ``"mnm-g"``, ``"lstm"``, ``"gru"`` or ``"mlp"``.
        core_kwargs: passed to the core (``hidden_size``, ``n_heads``, ...).
        features_dim: width of the observation encoding fed to the core.
        embedding_dim: width of each symbol's embedding in a symbolic grid observation.
        grid_pooling: a symbolic grid is also encoded by the sum of its cells' embeddings (what
            is in view, wherever it is), not only cell by cell.
        shared_core: one core for actor and critic (default); otherwise the critic has its own,
            whose state entries are prefixed ``"critic/"``.
        net_arch: hidden widths of the policy and value heads.
        memory_lr_scale: the learning rate of the core's memory parameters
            (:meth:`RecurrentCore.memory_parameters`: for MNM the interaction and the fast-weight
            memory) relative to the rest; they form their own optimizer group, whose ``lr_scale``
            :class:`MemoryPPO` applies to the scheduled learning rate.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        core: str = "mnm-p",
        core_kwargs: dict[str, Any] | None = None,
        features_dim: int = 64,
        embedding_dim: int = 8,
        grid_pooling: bool = False,
        shared_core: bool = True,
        net_arch: tuple[int, ...] | list[int] = (64,),
        memory_lr_scale: float = 1.0,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        use_sde: bool = False,
    ):
        check_action_space(action_space)
        if not memory_lr_scale > 0:
            raise ValueError(f"memory_lr_scale must be positive, got {memory_lr_scale}")
        if use_sde:
            raise ValueError("gSDE (use_sde=True) needs continuous actions; not supported")
        if optimizer_kwargs is None:
            optimizer_kwargs = {"eps": 1e-5}
            if optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
                # One fused kernel updates every parameter (CPU and CUDA), instead of about ten
                # small ops per parameter tensor: the same update, a few times faster.
                optimizer_kwargs["fused"] = True
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class=MemoryFeaturesExtractor,
            features_extractor_kwargs={
                "features_dim": features_dim,
                "embedding_dim": embedding_dim,
                "grid_pooling": grid_pooling,
            },
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=False,
        )
        self.core_name = core
        self.core_kwargs = dict(core_kwargs or {})
        self.features_dim = features_dim
        self.embedding_dim = embedding_dim
        self.grid_pooling = grid_pooling
        self.shared_core = shared_core
        self.net_arch = tuple(net_arch)
        self.memory_lr_scale = memory_lr_scale
        self.activation_fn = activation_fn
        self.ortho_init = ortho_init

        self.features_extractor = self.make_features_extractor()
        self.core: RecurrentCore = make_core(core, features_dim, **self.core_kwargs)
        self.critic_core: RecurrentCore | None = (
            None if shared_core else make_core(core, features_dim, **self.core_kwargs)
        )
        self.action_net = _mlp(
            self.core.output_size, self.net_arch, int(action_space.n), activation_fn
        )
        self.value_net = _mlp(self.core.output_size, self.net_arch, 1, activation_fn)
        if ortho_init:
            for head, gain in ((self.action_net, 0.01), (self.value_net, 1.0)):
                for layer in head:
                    if isinstance(layer, nn.Linear):
                        nn.init.orthogonal_(layer.weight, np.sqrt(2))
                        nn.init.zeros_(layer.bias)
                nn.init.orthogonal_(head[-1].weight, gain)
        self.optimizer = self.optimizer_class(
            self._parameter_groups(lr_schedule(1)), **self.optimizer_kwargs
        )
        # torch's fused optimizers (Adam's, the default here) update the parameters in place
        # without bumping their version counters (torch 2.13), which the compiled rollout step's
        # kept tables key on (mnm_rl/agent/policy_step.py): every step of this optimizer bumps
        # them, so that the next rollout step sees the new weights.
        self.optimizer.register_step_post_hook(bump_parameter_versions)
        #: How a rollout step reaches the compiled policy step (``None``: it does not apply to
        #: this policy), and the grid's projected table it keeps (:mod:`mnm_rl.agent.policy_step`).
        self._step_layout = policy_step.step_layout(self)
        self._projected_table = policy_step.ProjectedTable()

    def _parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """One optimizer group, or two when ``memory_lr_scale`` is not 1: the cores' memory
        parameters (``lr_scale`` = ``memory_lr_scale``) and the rest (``lr_scale`` 1); each
        group's ``lr`` is ``lr * lr_scale``."""
        if self.memory_lr_scale == 1.0:
            groups = [(list(self.parameters()), 1.0)]
        else:
            cores = [self.core] if self.critic_core is None else [self.core, self.critic_core]
            memory = [p for core in cores for p in core.memory_parameters()]
            ids = {id(p) for p in memory}
            groups = [([p for p in self.parameters() if id(p) not in ids], 1.0)]
            if memory:
                groups.append((memory, self.memory_lr_scale))
        return [{"params": ps, "lr": lr * scale, "lr_scale": scale} for ps, scale in groups]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            core=self.core_name,
            core_kwargs=self.core_kwargs,
            features_dim=self.features_dim,
            embedding_dim=self.embedding_dim,
            grid_pooling=self.grid_pooling,
            shared_core=self.shared_core,
            net_arch=self.net_arch,
            memory_lr_scale=self.memory_lr_scale,
            activation_fn=self.activation_fn,
            ortho_init=self.ortho_init,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
        )
        data.pop("features_extractor_class", None)
        data.pop("features_extractor_kwargs", None)
        data.pop("normalize_images", None)
        data.pop("squash_output", None)
        return data

    # ----------------------------------------------------------------------------------- state
    def initial_state(self, n_envs: int) -> CoreState:
        """The recurrent state at the start of an episode for ``n_envs`` environments."""
        state = self.core.initial_state(n_envs, self.device)
        if self.critic_core is not None:
            critic = self.critic_core.initial_state(n_envs, self.device)
            state = CoreState(
                {**state, **{CRITIC_PREFIX + k: v for k, v in critic.items()}}, batch_size=n_envs
            )
        return state

    def _split_state(self, state: CoreState) -> tuple[CoreState, CoreState | None]:
        if self.critic_core is None:
            return state, None
        actor = {k: v for k, v in state.items() if not k.startswith(CRITIC_PREFIX)}
        critic = {
            k[len(CRITIC_PREFIX) :]: v for k, v in state.items() if k.startswith(CRITIC_PREFIX)
        }
        return (
            CoreState(actor, batch_size=state.batch_size),
            CoreState(critic, batch_size=state.batch_size),
        )

    # --------------------------------------------------------------------------------- forward
    def _flat_observations(self, obs: Observation) -> tuple[int, int, Observation]:
        """``(T, B, observations [T * B, ...])`` preprocessed for the extractor (SB3's
        ``preprocess_obs``: one-hot Discrete, float Box) from observations ``[T, B, ...]``."""
        steps, batch = (
            next(iter(obs.values())).shape[:2] if isinstance(obs, dict) else obs.shape[:2]
        )
        flat = map_obs(obs, lambda v: v.reshape(steps * batch, *v.shape[2:]))
        return steps, batch, preprocess_obs(flat, self.observation_space, normalize_images=False)

    def encode(self, obs: Observation) -> Tensor:
        """Encode observations ``[T, B, ...]`` into features ``[T, B, features_dim]``."""
        steps, batch, flat = self._flat_observations(obs)
        return self.features_extractor(flat).view(steps, batch, -1)

    def forward_sequence(
        self, obs: Observation, state: CoreState, episode_starts: Tensor
    ) -> tuple[Tensor, Tensor, CoreState, dict[str, Tensor]]:
        """Run the policy over a sequence.

        Args:
            obs: observations ``[T, B, ...]`` (tensor or dict of tensors).
            state: the recurrent state before step 0.
            episode_starts: ``[T, B]``; the state of env ``b`` is reset before step ``t``.

        Returns:
            ``(logits [T, B, A], values [T, B], final_state, aux)``; ``aux`` holds the memory
            diagnostics ``[T, B]`` (summed over actor and critic cores when they are separate).
        """
        latent, value_latent, new_state, aux = self._latents(obs, state, episode_starts)
        if action_heads.trains(latent, self.action_net, self.activation_fn):
            kernel = action_heads.load_extension()
            if kernel is not None:
                logits, values = action_heads.train_heads(
                    kernel, latent, value_latent, self.action_net, self.value_net,
                    self.activation_fn,
                )  # fmt: skip
                return logits, values, new_state, aux
        logits = self.action_net(latent)
        values = self.value_net(value_latent).squeeze(-1)
        return logits, values, new_state, aux

    def explicit_forward_sequence(
        self, obs: Observation, state: CoreState, episode_starts: Tensor, memory_weight: float = 0.0
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], PolicyBackward] | None:
        """:meth:`forward_sequence`'s ``(logits [T, B, A], values [T, B], aux)`` without
        autograd, and the backward pass from the logits' and values' gradients to every
        parameter's gradient (:mod:`mnm_rl.agent.explicit`), with that of ``memory_weight *
        memory_loss(aux)`` (:func:`mnm_rl.memory.base.memory_loss`; MNM cores):
        ``backward(grad_logits, grad_values)`` gives ``(parameter, gradient)`` pairs for
        :func:`~mnm_rl.agent.explicit.apply_gradients`.

        ``None`` where some piece has no explicit pass (then train through
        :meth:`forward_sequence`): off the CPU, under ``MNM_RL_EXPLICIT_BACKWARD=0``, heads
        without the compiled kernel, an extractor or core without one (several grids; an MNM
        core with an interaction input or a retention lag). Hooks on the parameters' gradients
        (``Tensor.register_hook``) are not run (:func:`~mnm_rl.agent.explicit.has_gradient_hooks`).
        """
        cores = [self.core] if self.critic_core is None else [self.core, self.critic_core]
        if (
            not explicit.enabled()
            or not all(core.has_explicit_backward for core in cores)
            or self.activation_fn not in action_heads.ACTIVATION_CODES
            or self.action_net[0].weight.device.type != "cpu"
        ):
            return None
        heads = action_heads.load_extension()
        if heads is None:
            return None
        with torch.no_grad():
            steps, batch, flat = self._flat_observations(obs)
            encoded = self.features_extractor.explicit_forward(flat)
            if encoded is None:
                return None
            features, extractor_backward = encoded
            features = features.view(steps, batch, -1)
            actor_state, critic_state = self._split_state(state)
            actor = self.core.explicit_forward(features, actor_state, episode_starts,
                                               memory_weight)  # fmt: skip
            critic = (
                actor
                if self.critic_core is None or actor is None
                else self.critic_core.explicit_forward(
                    features, critic_state, episode_starts, memory_weight
                )
            )
            if actor is None or critic is None:
                return None
            aux = dict(actor[1]) if critic is actor else _summed_aux(actor[1], critic[1])
            width = self.core.output_size
            logits, values, heads_backward = action_heads.explicit_heads(
                heads, actor[0].reshape(-1, width), critic[0].reshape(-1, width),
                self.action_net, self.value_net, self.activation_fn,
            )  # fmt: skip

        def backward(grad_logits: Tensor, grad_values: Tensor) -> Gradients:
            with torch.no_grad():
                d_latent, d_value_latent, gradients = heads_backward(
                    grad_logits.reshape(logits.shape), grad_values.reshape(values.shape)
                )
                if critic is actor:
                    d_features, core_gradients = actor[2](
                        d_latent.add_(d_value_latent).view(steps, batch, -1)
                    )
                    gradients += core_gradients
                else:
                    d_features, actor_gradients = actor[2](d_latent.view(steps, batch, -1))
                    d_critic, critic_gradients = critic[2](d_value_latent.view(steps, batch, -1))
                    d_features = d_features + d_critic
                    gradients += actor_gradients + critic_gradients
                gradients += extractor_backward(d_features.reshape(steps * batch, -1))
                return gradients

        return logits.view(steps, batch, -1), values.view(steps, batch), aux, backward

    def act(
        self,
        obs: Observation,
        state: CoreState,
        episode_starts: Tensor,
        deterministic: bool = False,
    ) -> PolicyStep:
        """One step for ``B`` envs, as the rollout and :meth:`predict` take it, without
        gradients (call it under ``torch.no_grad()`` or ``torch.inference_mode()``).

        Args:
            obs: observations ``[B, ...]`` (tensor or dict of tensors), no time dimension.
            state: the recurrent state before this step.
            episode_starts: ``[B]``; the state of env ``b`` is reset first where it is nonzero.
            deterministic: take the most likely actions instead of drawing them.

        Returns:
            :class:`PolicyStep`: actions drawn as :meth:`sample` draws them, their
            log-probabilities and the values, each ``[B]``, the state after the step, and
            whether every action logit was finite. On the CPU a baseline core's whole step
            runs as one compiled call (:mod:`mnm_rl.agent.policy_step`), and otherwise the
            heads and the draw do (:mod:`mnm_rl.agent.action_heads`).
        """
        layout = getattr(self, "_step_layout", None)
        kernel = policy_step.load_extension() if layout is not None else None
        if kernel is not None:
            step = policy_step.policy_step(
                kernel, self, layout, self._projected_table, obs, state, episode_starts,
                deterministic,
            )  # fmt: skip
            if step is not None:
                return PolicyStep(*step)
        latent, value_latent, new_state, _ = self._latents(
            map_obs(obs, lambda v: v.unsqueeze(0)), state, episode_starts.unsqueeze(0)
        )
        latent, value_latent = latent[0], value_latent[0]
        if action_heads.applies(latent, self.activation_fn):
            kernel = action_heads.load_extension()
            if kernel is not None:
                actions, log_probs, values, finite = action_heads.heads_step(
                    kernel, latent, value_latent, self.action_net, self.value_net,
                    self.activation_fn, deterministic,
                )  # fmt: skip
                return PolicyStep(actions, log_probs, values, new_state, finite)
        logits = self.action_net(latent)
        finite = bool(torch.isfinite(logits).all())  # one host read, like the actions' own
        actions, log_probs = self.sample(logits, deterministic)
        values = self.value_net(value_latent).squeeze(-1)
        return PolicyStep(actions, log_probs, values, new_state, finite)

    def act_later(
        self,
        obs: Observation,
        state: CoreState,
        episode_starts: Tensor,
        steps: policy_step.RolloutSteps | None,
        deterministic: bool = False,
    ) -> PendingStep:
        """:meth:`act` for one step of a rollout whose compiled steps share ``steps``
        (:func:`mnm_rl.agent.policy_step.rollout_steps`: their arguments gathered once, and the
        thread they run on): returns a :class:`PendingStep`, which waits for the step and gives
        the same :class:`PolicyStep` as :meth:`act`. With a thread the step is begun there and
        this returns at once (a CPU step without gradients, the batch in one part); elsewhere
        the step runs now, through the compiled step where it applies, else through
        :meth:`act` (``steps`` ``None``, ...). Call it before launching the next step, and
        before changing anything the step reads (its inputs, the state, the parameters)."""
        call = None if steps is None else steps.plan.call(obs, state, episode_starts)
        if call is None:
            return PendingStep(step=self.act(obs, state, episode_starts, deterministic))
        if steps.thread is not None:
            wait = policy_step.launch_call(steps.thread, call, deterministic)
            if wait is not None:
                return PendingStep(wait=lambda: PolicyStep(*wait()))
        return PendingStep(step=PolicyStep(*policy_step.run_call(call, deterministic)))

    def _latents(
        self, obs: Observation, state: CoreState, episode_starts: Tensor
    ) -> tuple[Tensor, Tensor, CoreState, dict[str, Tensor]]:
        """The heads' inputs over a sequence: ``(latent [T, B, H]`` (the actor's),
        ``value_latent [T, B, H]`` (the critic's), ``final_state, aux)``."""
        features = self.encode(obs)
        actor_state, critic_state = self._split_state(state)
        latent, actor_state, aux = self.core(features, actor_state, episode_starts)
        if self.critic_core is None:
            return latent, latent, actor_state, aux
        value_latent, critic_state, critic_aux = self.critic_core(
            features, critic_state, episode_starts
        )
        aux = _summed_aux(aux, critic_aux)
        new_state = CoreState(
            {**actor_state, **{CRITIC_PREFIX + k: v for k, v in critic_state.items()}},
            batch_size=state.batch_size,
        )
        return latent, value_latent, new_state, aux

    def forward(self, obs: Observation, deterministic: bool = False) -> Tensor:  # noqa: D401
        raise TypeError(
            "RecurrentMemoryPolicy is recurrent: call forward_sequence(obs, state, episode_starts) "
            "or predict(obs, state, episode_start)"
        )

    def _predict(self, observation: Observation, deterministic: bool = False) -> Tensor:
        raise TypeError(
            "RecurrentMemoryPolicy is recurrent: call predict(obs, state, episode_start)"
        )

    @staticmethod
    def distribution(logits: Tensor) -> Categorical:
        """The action distribution for ``logits [..., A]``.

        Argument validation is off: it costs host syncs and a dozen ops per call, and the logits
        come from the network, the actions from this distribution or the rollout buffer.
        """
        return Categorical(logits=logits, validate_args=False)

    @staticmethod
    def sample(logits: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """Actions from ``Categorical(logits)`` (the mode if ``deterministic``) and their
        log-probabilities, in a few ops and without building a distribution object: a rollout
        step's draw where the compiled action heads do not run (:meth:`act`), which draw the
        same way.

        The draw is an exponential race, ``argmax_i log p_i - log E_i`` with ``E_i ~ Exp(1)``
        (``E_i / p_i`` is exponential with rate ``p_i``, and the smallest of such is ``i``
        with probability ``p_i``): what ``torch.multinomial`` computes for one draw, without
        the dozen checks of its argument that cost more than the draw (23 against 12 us for
        8 envs).
        """
        log_probs = torch.log_softmax(logits, dim=-1)
        if deterministic:
            actions = log_probs.argmax(dim=-1)
        else:
            races = torch.empty_like(log_probs).exponential_().log_()
            actions = (log_probs - races).argmax(dim=-1)
        return actions, log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: CoreState | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, CoreState]:
        """Actions for a batch of observations, with the same contract as sb3-contrib's
        RecurrentPPO: pass back the returned ``state`` at the next call, and
        ``episode_start[b] = True`` where env ``b`` has just been reset. Raises ``ValueError``
        if the policy's action logits are not finite (NaN or inf in the observation or state)."""
        self.set_training_mode(False)
        obs_tensor, vectorized = self.obs_to_tensor(observation)
        n_envs = (
            next(iter(obs_tensor.values())).shape[0]
            if isinstance(obs_tensor, dict)
            else obs_tensor.shape[0]
        )
        if state is None:
            state = self.initial_state(n_envs)
            starts = torch.ones(n_envs, device=self.device)
        else:
            if state.batch_size != n_envs:
                raise ValueError(f"state is for {state.batch_size} envs, observation for {n_envs}")
            state = state.to(self.device)
            starts = (
                torch.zeros(n_envs, device=self.device)
                if episode_start is None
                else torch.as_tensor(
                    np.asarray(episode_start), dtype=torch.float32, device=self.device
                ).reshape(n_envs)
            )
        with torch.no_grad():
            step = self.act(obs_tensor, state, starts, deterministic)
        if not step.finite:
            raise ValueError(
                "non-finite policy output (action logits): the observation or the recurrent "
                "state holds NaN or inf"
            )
        state = step.state
        actions = step.actions.cpu().numpy()
        if not vectorized:
            actions = actions.squeeze(0)
        return actions, state
