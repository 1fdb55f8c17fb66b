"""The generative heads of CALM: from the backbone's state at a chunk position to a sample of the next latent.

CALM's paper (Shao, Li, Meng and Zhou, 2025, arXiv 2510.27688) predicts each next chunk's latent vector with a
one-step energy head trained with the energy score (section 3); its comparison of generative heads also trains two
iterative ones, reported slightly worse:

    hidden state c [*, d] -> EnergyHead: one pass on uniform noise                                    -> latent [*, l]
                          -> DiffusionHead: 100 ancestral DDPM steps of a learned-variance cosine process
                          -> FlowHead: 10 midpoint steps of a rectified-flow ODE

The two iterative heads condition the same network, `net` (`SimpleMLPAdaLN`, from MAR: Li et al., 2024,
"Autoregressive Image Generation without Vector Quantization"), on c: an MLP over the latent whose residual blocks
are modulated by adaLN (DiT: Peebles and Xie, 2023) from a timestep embedding plus a projection of c. The diffusion
process is IDDPM's (Nichol and Dhariwal, 2021: cosine schedule, learned variance, hybrid loss, respacing); the flow
is a straight path from noise at t = 0 to data at t = 1 (rectified flow: Liu et al., 2022; flow matching: Lipman et
al., 2023). Module names follow the authors' code, so that their checkpoint keys (`generative_head.*`) load.

Every head is a `GenerativeHead`: `sample(hidden, noise, generator)`, `noise_shape(leading)`, `draw_noise(...)`,
`loss(hidden, mean, log_std, noise)` and `init_weights()`, so that the model, `generate`, BrierLM and training never
branch on the head; `HEADS` maps `CALMConfig.head_type` to the class.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_calm import CALMConfig

try:  # transformers 5: init functions that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4.57
    init = nn.init

LAYER_NORM_EPS = 1e-6
# The diffusion process is trained on 1000 timesteps (cosine schedule); sampling respaces them.
TRAIN_TIMESTEPS = 1000
MAX_BETA = 0.999
# The flow head's network embeds floor(1000 t) for its time t in [0, 1), as the diffusion head's timesteps.
FLOW_TIME_SCALE = 1000.0
# The sinusoidal timestep embedding: 256 frequencies (cos, then sin), periods up to 10000.
TIME_FREQUENCY_SIZE = 256
TIME_MAX_PERIOD = 10000


# ---------------------------------------------------------------------------------------------------------------
# The interface


class GenerativeHead(nn.Module):
    """What every head offers the model: samples of the next latent given the backbone's state, and a training loss.

    `noise` holds every random draw of one call, in the authors' order, so that recorded draws can be replayed.
    """

    def noise_shape(self, leading: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of `noise` for one `sample` call on hidden states of leading shape `leading`."""
        raise NotImplementedError

    def draw_noise(
        self,
        leading: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Every draw of one `sample` call, drawn at once (standard normal; the energy head's are uniform)."""
        return torch.randn(self.noise_shape(leading), generator=generator, device=device, dtype=dtype)

    def sample(
        self,
        hidden: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> torch.Tensor:
        """hidden [*, d] -> one latent sample [*, l] per row, or `num_samples` of them, [*, num_samples, l].

        `noise` (shape `noise_shape` of the sampled rows) replaces the draws from `generator`, which are made on
        hidden's device, in hidden's dtype.
        """
        raise NotImplementedError

    def loss(
        self,
        hidden: torch.Tensor,
        mean: torch.Tensor,
        log_std: torch.Tensor,
        noise: tuple[torch.Tensor, ...] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The training loss [] (lower is better): hidden [n, d] the backbone states at n target positions, mean /
        log_std [n, l] the autoencoder posterior of the target chunks; `noise` the call's draws, in order."""
        raise NotImplementedError

    def init_layer(self, module: nn.Module) -> None:
        """Initialise `module`, one of this head's layers, the authors' way (the model's `_init_weights` calls this for
        every layer after transformers' default init: transformers 5 never visits a module without parameters of its
        own, such as the head itself). Layers the authors leave at the default are left alone."""
        raise NotImplementedError

    def init_weights(self) -> None:
        """The authors' init of every layer of the head."""
        for module in self.modules():
            self.init_layer(module)


# ---------------------------------------------------------------------------------------------------------------
# The energy head (paper section 3)


class EnergyHeadBlock(nn.Module):
    """Residual block of the energy head: the noise stream x is refined, conditioned on the hidden state y."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.linears = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, 2 * hidden_size),
        )
        self.down_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [*, d], y [*, d] (or broadcastable to x, e.g. one hidden state for N samples) -> [*, d]."""
        gate, value = self.linears(torch.cat([self.in_ln(x), y.expand_as(x)], dim=-1)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * value)


class EnergyHeadOutputLayer(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Linear to the latent size (the last Linear starts at zero)."""

    def __init__(self, hidden_size: int, latent_size: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.linears = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, latent_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class EnergyHead(GenerativeHead):
    """The energy head: one forward pass maps (hidden state, uniform noise) to one sample of the next latent; trained
    with the energy score of `num_samples` samples against `num_target_samples` posterior draws (section 3).

    `noise` of `sample`: [*, noise_size], uniform in [-0.5, 0.5). `noise` of `loss`: (target draws
    [num_target_samples, n, l], standard normal; head draws [num_samples, n, noise_size], uniform in [-0.5, 0.5)).
    """

    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.noise_size = config.noise_size
        self.num_samples, self.num_target_samples = config.num_samples, config.num_target_samples
        self.beta = config.beta
        self.noise_embd = nn.Linear(config.noise_size, d)
        self.hidden_embd = nn.Linear(d, d)
        self.norm_noise = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm_hidden = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.mlp_blocks = nn.ModuleList(EnergyHeadBlock(d) for _ in range(config.num_mlp_layers))
        self.final_layer = EnergyHeadOutputLayer(d, config.latent_size)

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden [*, d] and noise [*, noise_size] in [-0.5, 0.5) -> latent samples [*, l] (hidden may broadcast)."""
        x = self.norm_noise(self.noise_embd(noise))
        y = self.norm_hidden(self.hidden_embd(hidden))
        for block in self.mlp_blocks:
            x = block(x, y)
        return self.final_layer(x)

    def noise_shape(self, leading: tuple[int, ...]) -> tuple[int, ...]:
        return (*leading, self.noise_size)

    def draw_noise(
        self,
        leading: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return torch.rand(self.noise_shape(leading), generator=generator, device=device, dtype=dtype) - 0.5

    def sample(
        self,
        hidden: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> torch.Tensor:
        leading = (*hidden.shape[:-1], *(() if num_samples is None else (num_samples,)))
        if num_samples is not None:
            hidden = hidden.unsqueeze(-2)  # [*, 1, d]: its projection is computed once for all samples
        if noise is None:
            noise = self.draw_noise(leading, generator, hidden.device, hidden.dtype)
        elif tuple(noise.shape) != self.noise_shape(leading):
            raise ValueError(
                f"noise must have shape {self.noise_shape(leading)} (hidden's leading dims"
                f"{', num_samples' if num_samples else ''}, noise_size), got {tuple(noise.shape)}."
            )
        return self(hidden, noise.to(hidden.dtype))

    def loss(
        self,
        hidden: torch.Tensor,
        mean: torch.Tensor,
        log_std: torch.Tensor,
        noise: tuple[torch.Tensor, ...] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The negative energy score of `num_samples` head samples per position, averaged over positions."""
        target_noise, head_noise = (None, None) if noise is None else noise
        if target_noise is None:
            shape = (self.num_target_samples, *mean.shape)
            target_noise = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
        samples = self.sample(hidden.expand(self.num_samples, *hidden.shape), head_noise, generator)  # [N, n, l]
        return -energy_score(samples, mean, log_std, beta=self.beta, target_noise=target_noise).mean()

    def init_layer(self, module: nn.Module) -> None:
        if module is self.final_layer.linears[-1]:  # the authors zero it: training starts from predicting 0
            init.zeros_(module.weight)
            init.zeros_(module.bias)


def energy_score(
    samples: torch.Tensor,
    mean: torch.Tensor,
    log_std: torch.Tensor,
    num_target_samples: int = 100,
    beta: float = 1.0,
    target_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Monte-Carlo energy score of model samples against the Gaussian posterior of the target (section 3).

    samples: [N, *, l] head samples; mean, log_std: [*, l]; target_noise: [M, *, l] standard normal draws.
    Returns [*]: `sum_{i!=j} |x_i - x_j|^beta / (N(N-1)) - 2 sum_{i,j} |x_i - y_j|^beta / (N M)` (higher is better).

    >>> samples, mean = torch.zeros(4, 3, 16), torch.zeros(3, 16)
    >>> energy_score(samples, mean, log_std=mean - 20).shape  # std ~ 2e-9: the samples hit the target
    torch.Size([3])
    """
    n = samples.shape[0]
    if target_noise is None:
        target_noise = torch.randn((num_target_samples, *mean.shape), device=mean.device, dtype=mean.dtype)
    targets = mean + torch.exp(log_std) * target_noise  # [M, *, l]
    # The diagonal i == j is zero, so summing the full matrix gives the sum over i != j.
    pairwise = torch.linalg.norm(samples.unsqueeze(1) - samples.unsqueeze(0), dim=-1).pow(beta)  # [N, N, *]
    spread = pairwise.sum(dim=(0, 1)) / (n * (n - 1))
    to_target = torch.linalg.norm(samples.unsqueeze(1) - targets.unsqueeze(0), dim=-1).pow(beta)  # [N, M, *]
    return spread - 2 * to_target.mean(dim=(0, 1))


# ---------------------------------------------------------------------------------------------------------------
# The network (MAR's SimpleMLPAdaLN), shared by the iterative heads


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT): a normalised x, scaled and shifted by values computed from the conditioning."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """A timestep -> its sinusoidal embedding [256] -> Linear, SiLU, Linear -> [d] (DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = TIME_FREQUENCY_SIZE) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = TIME_MAX_PERIOD) -> torch.Tensor:
        """t [*] -> [*, dim] float32: cos(t f_i), then sin(t f_i), with f_i = max_period^(-i / (dim / 2))."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float().unsqueeze(-1) * freqs  # [*, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t [*] -> [*, d] in `dtype` (the embedding is computed in float32, then cast)."""
        return self.mlp(self.timestep_embedding(t, self.frequency_size).to(dtype))


class ResBlock(nn.Module):
    """`h + gate * MLP(adaLN(LayerNorm(h)))`, with shift, scale and gate computed from the conditioning y."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h [*, d], y [*, d] -> [*, d]."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.in_ln(h), shift, scale))


class FinalLayer(nn.Module):
    """adaLN of a LayerNorm without parameters, then a Linear to the output size (DiT's final layer)."""

    def __init__(self, hidden_size: int, out_size: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, out_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h [*, d], y [*, d] -> [*, out_size]."""
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The head network: (x [*, l], timestep t [*], condition c [*, d]) -> [*, out_size] (MAR's denoising MLP).

    `h = input_proj(x)`; `y = time_embed(t) + cond_embed(c)` (c, the backbone state, is used without a norm);
    `num_blocks` adaLN residual blocks on h, then the final layer. The timestep is `t * time_scale`, truncated to
    an integer when `integer_time` (the flow head: floor(1000 t); the diffusion head passes integers already).
    """

    def __init__(
        self,
        latent_size: int,
        hidden_size: int,
        out_size: int,
        num_blocks: int,
        time_scale: float = 1.0,
        integer_time: bool = True,
    ) -> None:
        super().__init__()
        self.time_scale = time_scale
        self.integer_time = integer_time
        self.time_embed = TimestepEmbedder(hidden_size)
        self.cond_embed = nn.Linear(hidden_size, hidden_size)
        self.input_proj = nn.Linear(latent_size, hidden_size)
        self.res_blocks = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_blocks))
        self.final_layer = FinalLayer(hidden_size, out_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [*, l], t [*], c [*, d], x and c of one dtype -> [*, out_size]."""
        if self.time_scale != 1.0:
            t = t * self.time_scale
        if self.integer_time:
            t = t.long()
        h = self.input_proj(x)  # [*, d]
        y = self.time_embed(t, h.dtype) + self.cond_embed(c)  # [*, d]
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def init_layer(self, module: nn.Module) -> None:
        """The authors' (MAR's) init of one layer: xavier-uniform Linears with zero biases, N(0, 0.02) timestep MLP,
        and every adaLN modulation and the output Linear at zero, so that a fresh network outputs exactly 0."""
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if not isinstance(module, nn.Linear):
            return
        zeroed = [block.adaLN_modulation[-1] for block in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if any(module is linear for linear in zeroed):
            init.zeros_(module.weight)
        elif any(module is linear for linear in self.time_embed.mlp):
            init.normal_(module.weight, std=0.02)
        else:
            init.xavier_uniform_(module.weight)
        init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion schedules (IDDPM), in float64 as the authors' numpy tables


def cosine_betas(num_timesteps: int = TRAIN_TIMESTEPS, max_beta: float = MAX_BETA) -> list[float]:
    """IDDPM's cosine schedule: beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta), with
    abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2 (Python floats, i.e. float64)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """IDDPM's respacing in one section: `num_steps` of the timesteps 0..num_timesteps-1, evenly strided from the
    first to the last (stride accumulated in float64, Python round: ties to even), ascending."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} timesteps to {num_steps} steps.")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    taken, position = set(), 0.0
    for _ in range(num_steps):
        taken.add(round(position))
        position += stride
    return sorted(taken)


class GaussianDiffusion:
    """A Gaussian diffusion process with learned variance (DDPM, IDDPM): its per-step coefficient tables.

    Built from float64 betas as IDDPM's numpy code; a plain object, not buffers, so that casting the model (e.g.
    to bfloat16) leaves the tables in float64. They live on the CPU, even when the model is built on the meta
    device (transformers 5 does); `to(device, dtype)` gives the copy whose coefficients meet tensors (IDDPM casts
    each coefficient to float32 first). `timestep_map[k]` is the network timestep of step k.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None) -> None:
        betas = betas.to(device="cpu", dtype=torch.float64)
        self.num_steps = betas.shape[0]
        self.timestep_map = torch.arange(self.num_steps, device="cpu") if timestep_map is None else timestep_map
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod - 1)
        # The posterior variance is 0 at step 0: its log is clipped to that of step 1.
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * torch.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

    @classmethod
    def respaced(cls, betas: list[float], num_steps: int) -> GaussianDiffusion:
        """The process over `space_timesteps(len(betas), num_steps)` of the base process (IDDPM's SpacedDiffusion):
        beta'_k = 1 - abar[map_k] / abar[map_{k-1}] (abar[map_{-1}] = 1), keeping the base process's abar."""
        alphas_cumprod = torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64, device="cpu"), dim=0).tolist()
        timestep_map = space_timesteps(len(betas), num_steps)
        new_betas, last = [], 1.0
        for step in timestep_map:
            new_betas.append(1 - alphas_cumprod[step] / last)
            last = alphas_cumprod[step]
        return cls(torch.tensor(new_betas, dtype=torch.float64, device="cpu"), torch.tensor(timestep_map, device="cpu"))

    def to(self, device: torch.device, dtype: torch.dtype) -> GaussianDiffusion:
        """A copy with every coefficient table cast to `dtype` (then moved: some devices lack float64)."""
        moved = copy.copy(self)
        for name, table in vars(self).items():
            if isinstance(table, torch.Tensor):
                moved.__dict__[name] = table.to(dtype if table.is_floating_point() else table.dtype).to(device)
        return moved

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; x_start, noise [*, l], t [*]."""
        return _at(self.sqrt_alphas_cumprod, t) * x_start + _at(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean of q(x_{t-1} | x_t, x_0)."""
        return _at(self.posterior_mean_coef1, t) * x_start + _at(self.posterior_mean_coef2, t) * x_t

    def p_mean_log_variance(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's p(x_{t-1} | x_t) from its outputs eps (noise prediction) and v (variance value), [*, l].

        log variance: frac log(beta_t) + (1 - frac) log(posterior variance_t), frac = (v + 1) / 2 (v unbounded);
        mean: the posterior mean at pred_x0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps (not clipped).
        The order of operations is IDDPM's: at the first sampling step sqrt(1 / abar) is about 2e4.
        """
        frac = (v + 1) / 2
        log_variance = frac * _at(self.log_betas, t) + (1 - frac) * _at(self.posterior_log_variance_clipped, t)
        pred_x_start = _at(self.sqrt_recip_alphas_cumprod, t) * x_t - _at(self.sqrt_recipm1_alphas_cumprod, t) * eps
        return self.q_posterior_mean(pred_x_start, x_t, t), log_variance


def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t] [*] -> [*, 1], to broadcast over the latent dimension."""
    return table[t].unsqueeze(-1)


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """IDDPM's decoder term at t = 0: log-likelihood of 8-bit image values x in [-1, 1] (bins of width 2 / 255,
    the outer bins open-ended beyond +-0.999) under N(means, exp(log_scales)^2), elementwise, in nats."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ---------------------------------------------------------------------------------------------------------------
# The heads


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype of a head's solver state and loss arithmetic: at least float32 (as under the authors' autocast,
    where the network runs in bfloat16 and the schedule arithmetic in float32)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def last_state(states: Iterator[torch.Tensor]) -> torch.Tensor:
    """The last state of a solver loop, without keeping the others."""
    return deque(states, maxlen=1)[0]


class IterativeHead(GenerativeHead):
    """What the diffusion and flow heads share: the network `net`, the targets of the loss, the checks of `noise`.

    The network runs in the dtype of the hidden states it is given (the backbone's); the solver state and the
    loss arithmetic in `compute_dtype` of it; samples come back in the hidden states' dtype.
    """

    def __init__(self, config: CALMConfig, out_size: int, time_scale: float = 1.0, integer_time: bool = True) -> None:
        super().__init__()
        self.latent_size = config.latent_size
        self.num_samples = config.num_samples
        self.net = SimpleMLPAdaLN(
            config.latent_size, config.hidden_size, out_size, config.num_mlp_layers, time_scale, integer_time
        )

    def init_layer(self, module: nn.Module) -> None:
        self.net.init_layer(module)

    def predict(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The network on x [*, l] (any float dtype) and c [*, d]: runs in c's dtype, returns x's dtype."""
        return self.net(x.to(c.dtype), t, c).to(x.dtype)

    def sample(
        self,
        hidden: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> torch.Tensor:
        """The last state of `sample_loop` (see `GenerativeHead.sample`)."""
        return last_state(self.sample_loop(hidden, noise, generator, num_samples)).to(hidden.dtype)

    def sample_loop(
        self,
        hidden: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yields the solver state [*, l] (compute dtype) after each step; the last one is the sample."""
        raise NotImplementedError

    def _sampling_inputs(
        self, hidden: torch.Tensor, noise: torch.Tensor | None, num_samples: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden repeated for `num_samples` ([*, num_samples, d]), and `noise` checked and cast to compute dtype."""
        if num_samples is not None:
            hidden = hidden.unsqueeze(-2).expand(*hidden.shape[:-1], num_samples, hidden.shape[-1])
        if noise is not None:
            shape = self.noise_shape(tuple(hidden.shape[:-1]))
            if tuple(noise.shape) != shape:
                raise ValueError(
                    f"noise must have shape {shape} for {type(self).__name__}.sample on hidden states of shape "
                    f"{tuple(hidden.shape)}, got {tuple(noise.shape)}."
                )
            noise = noise.to(device=hidden.device, dtype=compute_dtype(hidden))
        return hidden, noise

    def _randn(self, like: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
        """A standard normal draw [*, l] for the rows of `like` [*, d], in `dtype`, on like's device."""
        shape = (*like.shape[:-1], self.latent_size)
        return torch.randn(shape, generator=generator, device=like.device, dtype=dtype)

    def loss(
        self,
        hidden: torch.Tensor,
        mean: torch.Tensor,
        log_std: torch.Tensor,
        noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The training loss (lower is better): hidden [n, d] the backbone states at the n target positions,
        mean / log_std [n, l] the autoencoder posterior of the target chunks.

        Each position gets `num_samples` targets x = mean + eps * exp(log_std), one training row each, rows
        sample-major (row = s * n + position); the loss is the mean of `loss_terms` over rows. `noise` holds the
        call's draws in the authors' order: eps [num_samples, n, l], the rows' times [num_samples * n], the rows'
        Gaussian noise [num_samples * n, l]; without it they are drawn from `generator` (`draw_loss_noise`).
        """
        hidden, mean, log_std = hidden.flatten(0, -2), mean.flatten(0, -2), log_std.flatten(0, -2)
        n = hidden.shape[0]
        if noise is None:
            noise = self.draw_loss_noise(n, hidden.device, compute_dtype(hidden), generator)
        target_eps, t, row_noise = (x.to(hidden.device) for x in noise)
        rows = self.num_samples * n
        expected = ((self.num_samples, n, self.latent_size), (rows,), (rows, self.latent_size))
        if tuple(tuple(x.shape) for x in noise) != expected:
            raise ValueError(f"loss noise must have shapes {expected}, got {[tuple(x.shape) for x in noise]}.")
        x_start, conditions = self.training_rows(hidden, mean, log_std, target_eps)
        return self.loss_terms(x_start, t, row_noise, conditions)["loss"].mean()

    def training_rows(
        self, hidden: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, target_eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [n, d], mean / log_std [n, l], target_eps [num_samples, n, l] -> the training rows, sample-major:
        targets x_start = mean + eps * exp(log_std) [num_samples * n, l] and their conditions [num_samples * n, d]."""
        dtype = compute_dtype(hidden)
        x_start = mean.to(dtype) + target_eps.to(dtype) * torch.exp(log_std.to(dtype))  # [num_samples, n, l]
        conditions = hidden.expand(target_eps.shape[0], -1, -1)  # [num_samples, n, d]
        return x_start.flatten(0, 1), conditions.flatten(0, 1)

    def draw_loss_noise(
        self, n: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The draws of one `loss` call on n positions, in the authors' order (target eps, times, row noise)."""
        rows = self.num_samples * n
        target_eps = torch.randn(
            (self.num_samples, n, self.latent_size), generator=generator, device=device, dtype=dtype
        )
        t = self.draw_times(rows, device, dtype, generator)
        row_noise = torch.randn((rows, self.latent_size), generator=generator, device=device, dtype=dtype)
        return target_eps, t, row_noise

    def draw_times(
        self, rows: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The training times of `rows` rows."""
        raise NotImplementedError

    def loss_terms(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, c: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-row losses on explicit inputs: targets x_start [N, l], times t [N], noise [N, l], c [N, d]."""
        raise NotImplementedError


class DiffusionHead(IterativeHead):
    """The diffusion head (the authors' `DiffLoss`, after MAR): the network predicts the noise eps and a variance
    value v of a 1000-step cosine process (IDDPM, learned variance); trained with IDDPM's hybrid loss
    (`loss_terms`), sampled by ancestral sampling of the process respaced to `config.diffusion_steps` steps.

    `noise` of `sample`: [1 + S, *, l], the initial x_T, then the noise of the reverse steps k = S-1, ..., 0 (the
    last is drawn but unused). `config.diffusion_temperature` scales the per-step noise (not x_T).
    """

    def __init__(self, config: CALMConfig) -> None:
        super().__init__(config, out_size=2 * config.latent_size)
        self.temperature = float(config.diffusion_temperature)
        self.t0_nll = config.diffusion_t0_nll
        betas = cosine_betas(TRAIN_TIMESTEPS)
        self.train_diffusion = GaussianDiffusion.respaced(betas, TRAIN_TIMESTEPS)
        self.sample_diffusion = GaussianDiffusion.respaced(betas, config.diffusion_steps)

    def noise_shape(self, leading: tuple[int, ...]) -> tuple[int, ...]:
        return (1 + self.sample_diffusion.num_steps, *leading, self.latent_size)

    def sample(
        self,
        hidden: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """hidden [*, d] -> latents [*, l] (see `IterativeHead.sample`); `temperature` overrides the config's."""
        return last_state(self.sample_loop(hidden, noise, generator, num_samples, temperature)).to(hidden.dtype)

    def sample_loop(
        self,
        hidden: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
        temperature: float | None = None,
    ) -> Iterator[torch.Tensor]:
        """Ancestral sampling (DDPM): x_T ~ N(0, I); for k = S-1, ..., 0: x = mean_k(x) + [k > 0] sigma_k z T."""
        hidden, noise = self._sampling_inputs(hidden, noise, num_samples)
        temperature = self.temperature if temperature is None else temperature
        dtype = compute_dtype(hidden)
        diffusion = self.sample_diffusion.to(hidden.device, dtype)
        x = self._randn(hidden, generator, hidden.dtype).to(dtype) if noise is None else noise[0]  # [*, l]
        for draw, k in enumerate(reversed(range(diffusion.num_steps)), start=1):
            x = self.p_sample(
                diffusion, x, k, hidden, noise[draw] if noise is not None else None, generator, temperature
            )
            yield x

    def p_sample(
        self,
        diffusion: GaussianDiffusion,
        x: torch.Tensor,
        k: int,
        hidden: torch.Tensor,
        z: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """One reverse step k of `diffusion` (cast by `GaussianDiffusion.to`): x [*, l] -> the next x [*, l].

        The network sees timestep `diffusion.timestep_map[k]`; z [*, l] is the step's noise (drawn when None, and
        drawn but multiplied by 0 at k = 0).
        """
        t = torch.full(hidden.shape[:-1], k, dtype=torch.long, device=hidden.device)
        eps, v = self.predict(x, diffusion.timestep_map[t], hidden).split(self.latent_size, dim=-1)
        mean, log_variance = diffusion.p_mean_log_variance(x, t, eps, v)
        if z is None:
            z = self._randn(hidden, generator, hidden.dtype).to(x.dtype)
        return mean + float(k != 0) * torch.exp(0.5 * log_variance) * z * temperature

    def draw_times(
        self, rows: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Uniform integer timesteps in 0..999 (no importance sampling)."""
        return torch.randint(0, TRAIN_TIMESTEPS, (rows,), generator=generator, device=device)

    def loss_terms(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, c: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """IDDPM's hybrid loss per row, for targets x_start [N, l], timesteps t [N] (0..999), noise [N, l] and
        conditions c [N, d] -> {"mse", "vb", "loss"}, each [N].

        mse = mean((noise - eps)^2); vb (bits; its gradient reaches v only) = the KL between the true posterior
        q(x_{t-1} | x_t, x_0) and the model's p(x_{t-1} | x_t), or at t = 0 the discretized image NLL (the
        authors'; `config.diffusion_t0_nll=False` keeps the KL there); loss = mse + vb, unweighted.
        """
        dtype = compute_dtype(c)
        diffusion = self.train_diffusion.to(c.device, dtype)
        x_start, noise = x_start.to(dtype), noise.to(dtype)
        x_t = diffusion.q_sample(x_start, t, noise)
        eps, v = self.predict(x_t, t, c).split(self.latent_size, dim=-1)
        mean, log_variance = diffusion.p_mean_log_variance(x_t, t, eps.detach(), v)
        true_mean = diffusion.q_posterior_mean(x_start, x_t, t)
        true_log_variance = _at(diffusion.posterior_log_variance_clipped, t)
        vb = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=-1) / math.log(2.0)
        if self.t0_nll:
            nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)
            vb = torch.where(t == 0, nll.mean(dim=-1) / math.log(2.0), vb)
        mse = ((noise - eps) ** 2).mean(dim=-1)
        return {"mse": mse, "vb": vb, "loss": mse + vb}


class FlowHead(IterativeHead):
    """The flow-matching head (the authors' `FlowLoss`): the network predicts the velocity of the straight path
    x_t = (1 - t) x_0 + t x_1 from noise x_0 (t = 0) to data x_1 (t = 1) (rectified flow), trained by regression
    on x_1 - x_0 and sampled by integrating the ODE from t = 0 to 1 with `config.flow_steps` steps of
    `config.flow_solver`. The network embeds floor(1000 t) (`config.flow_floor_time`; False: 1000 t).

    `noise` of `sample`: [*, l], the starting point x_0 (the only draw).
    """

    def __init__(self, config: CALMConfig) -> None:
        super().__init__(config, config.latent_size, time_scale=FLOW_TIME_SCALE, integer_time=config.flow_floor_time)
        self.num_steps = config.flow_steps
        self.solver = config.flow_solver

    def noise_shape(self, leading: tuple[int, ...]) -> tuple[int, ...]:
        return (*leading, self.latent_size)

    def sample_loop(
        self,
        hidden: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Midpoint: x += dt v(x + dt/2 v(x, t), t + dt/2) (2 network passes a step); Euler: x += dt v(x, t)."""
        hidden, noise = self._sampling_inputs(hidden, noise, num_samples)
        dtype = compute_dtype(hidden)
        x = self._randn(hidden, generator, hidden.dtype).to(dtype) if noise is None else noise  # [*, l]
        dt = 1.0 / self.num_steps
        for k in range(self.num_steps):
            t = torch.full(hidden.shape[:-1], k / self.num_steps, dtype=dtype, device=hidden.device)
            velocity = self.predict(x, t, hidden)
            if self.solver == "midpoint":
                x_mid = x + (dt / 2) * velocity
                velocity = self.predict(x_mid, t + dt / 2, hidden)
            x = x + dt * velocity
            yield x

    def draw_times(
        self, rows: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Uniform times in [0, 1) (no logit-normal weighting)."""
        return torch.rand((rows,), generator=generator, device=device, dtype=dtype)

    def loss_terms(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, c: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The flow-matching loss per row, for targets x_start (x_1) [N, l], times t [N] in [0, 1), noise (x_0)
        [N, l] and conditions c [N, d] -> {"loss": mean((v(x_t, t, c) - (x_1 - x_0))^2)} [N], unweighted."""
        dtype = compute_dtype(c)
        x_start, noise, t = x_start.to(dtype), noise.to(dtype), t.to(dtype)
        t_column = t.unsqueeze(-1)  # [N, 1]
        x_t = (1 - t_column) * noise + t_column * x_start
        velocity = self.predict(x_t, t, c)
        return {"loss": ((velocity - (x_start - noise)) ** 2).mean(dim=-1)}


HEADS: dict[str, type[GenerativeHead]] = {"energy": EnergyHead, "diffusion": DiffusionHead, "flow": FlowHead}
