"""Time-series transformer denoiser of Diffusion Policy (DP-T), minGPT-style.

Tokens. The noisy action trajectory (B, T, input_dim) becomes T tokens (``input_emb`` + learned ``pos_emb``).
The conditions become ``1 + To`` memory tokens: the sinusoidal embedding of the diffusion step, then one token
per observation step (``cond_obs_emb``), plus a learned ``cond_pos_emb``. The memory goes through a small
encoder (an MLP when ``n_cond_layers == 0``, else pre-norm transformer encoder layers) and the action tokens
through ``n_layer`` pre-norm ``nn.TransformerDecoder`` layers that self-attend to each other and cross-attend
to the memory. ``ln_f`` and ``head`` map back to (B, T, output_dim).

Masks (with ``causal_attn``), both additive float masks registered as buffers (``mask``, ``memory_mask``) so
the original's checkpoints load:
- self-attention: action token t attends to tokens 0..t;
- cross-attention: action token t attends to memory token s iff ``t >= s - 1``: the time token (s = 0)
  always, and observation token k (s = k + 1) only from action token k on, so no action token reads an
  observation that lies in its future.

With ``time_as_cond=False`` (and no observation condition) the model is encoder-only: the time token is
prepended to the action tokens (BERT-like). Parameter and module names follow the original, so its state
dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.model.common.module_attr_mixin import ModuleAttrMixin
from diffusion_policy.model.diffusion.positional_embedding import SinusoidalPosEmb


def _additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """bool (L, S), True = may attend -> float mask with 0 where allowed and -inf elsewhere."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


class TransformerForDiffusion(ModuleAttrMixin):
    """Denoiser ``(sample (B, T, input_dim), timestep, cond (B, To, cond_dim)) -> (B, T, output_dim)``.

    Args (the original's):
        input_dim, output_dim: per-step size of the noisy trajectory and of the prediction.
        horizon: T, the number of trajectory steps.
        n_obs_steps: To, the number of observation tokens (default: ``horizon``).
        cond_dim: per-step observation size; 0 means no observation condition.
        n_layer, n_head, n_emb: decoder depth, attention heads, embedding width.
        p_drop_emb, p_drop_attn: dropout on the embeddings and inside the transformer layers.
        causal_attn: mask future action tokens and future observation tokens (see module docstring).
        time_as_cond: the diffusion step is a memory token (True) or the first input token (False).
        obs_as_cond: kept for config compatibility; the observation condition is on iff ``cond_dim > 0``.
        n_cond_layers: 0 for an MLP memory encoder, else that many transformer encoder layers.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        horizon: int,
        n_obs_steps: int | None = None,
        cond_dim: int = 0,
        n_layer: int = 12,
        n_head: int = 12,
        n_emb: int = 768,
        p_drop_emb: float = 0.1,
        p_drop_attn: float = 0.1,
        causal_attn: bool = False,
        time_as_cond: bool = True,
        obs_as_cond: bool = False,
        n_cond_layers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim), ("horizon", horizon)):
            if int(value) < 1:
                raise ValueError(f"TransformerForDiffusion: {name}={value} must be >= 1")
        if n_layer < 1 or n_head < 1 or n_cond_layers < 0:
            raise ValueError(
                f"TransformerForDiffusion: n_layer={n_layer} and n_head={n_head} must be >= 1, "
                f"n_cond_layers={n_cond_layers} >= 0"
            )
        if n_emb % n_head != 0:
            raise ValueError(f"TransformerForDiffusion: n_emb={n_emb} must be divisible by n_head={n_head}")
        if n_emb < 4 or n_emb % 2 != 0:
            raise ValueError(f"TransformerForDiffusion: n_emb={n_emb} must be an even number >= 4")
        if n_obs_steps is None:
            n_obs_steps = horizon
        obs_as_cond = cond_dim > 0
        if obs_as_cond and not time_as_cond:
            raise ValueError(
                "TransformerForDiffusion: an observation condition (cond_dim > 0) needs time_as_cond=True"
            )

        # token counts: the action tokens (plus the time token when it is an input), and the memory tokens
        n_tokens = horizon if time_as_cond else horizon + 1
        n_cond_tokens = (1 if time_as_cond else 0) + (n_obs_steps if obs_as_cond else 0)

        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, n_tokens, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb) if obs_as_cond else None
        self.cond_pos_emb = None
        self.encoder = None
        self.decoder = None

        def layer_kwargs() -> dict:
            return {
                "d_model": n_emb,
                "nhead": n_head,
                "dim_feedforward": 4 * n_emb,
                "dropout": p_drop_attn,
                "activation": "gelu",
                "batch_first": True,
                "norm_first": True,
            }

        # the nested-tensor fast path only applies to eval-mode encoders with padding masks; it warns
        # for norm_first layers, so it is off
        encoder_only = n_cond_tokens == 0
        if encoder_only:
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**layer_kwargs()), num_layers=n_layer, enable_nested_tensor=False
            )
        else:
            self.cond_pos_emb = nn.Parameter(torch.zeros(1, n_cond_tokens, n_emb))
            if n_cond_layers > 0:
                self.encoder = nn.TransformerEncoder(
                    nn.TransformerEncoderLayer(**layer_kwargs()),
                    num_layers=n_cond_layers,
                    enable_nested_tensor=False,
                )
            else:
                self.encoder = nn.Sequential(
                    nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb)
                )
            self.decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(**layer_kwargs()), num_layers=n_layer
            )

        if causal_attn:
            steps = torch.arange(n_tokens)
            self.register_buffer("mask", _additive_mask(steps[:, None] >= steps[None, :]))
            if time_as_cond and obs_as_cond:
                memory = torch.arange(n_cond_tokens)
                self.register_buffer(
                    "memory_mask", _additive_mask(torch.arange(n_tokens)[:, None] >= memory[None, :] - 1)
                )
            else:
                self.memory_mask = None
        else:
            self.mask = None
            self.memory_mask = None

        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, output_dim)

        self.T = n_tokens
        self.T_cond = n_cond_tokens
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.cond_dim = cond_dim
        self.time_as_cond = time_as_cond
        self.obs_as_cond = obs_as_cond
        self.encoder_only = encoder_only

        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """The original's initialisation: N(0, 0.02) weights and zero biases, LayerNorm (1, 0)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                weight = getattr(module, name)
                if weight is not None:
                    nn.init.normal_(weight, mean=0.0, std=0.02)
            for name in ("in_proj_bias", "bias_k", "bias_v"):
                bias = getattr(module, name)
                if bias is not None:
                    nn.init.zeros_(bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, TransformerForDiffusion):
            nn.init.normal_(module.pos_emb, mean=0.0, std=0.02)
            if module.cond_obs_emb is not None:
                nn.init.normal_(module.cond_pos_emb, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ optimizer
    def get_optim_groups(self, weight_decay: float = 1e-3) -> list[dict]:
        """AdamW parameter groups: Linear / attention weights decay; biases, LayerNorm (and Embedding)
        weights, the position embeddings and the dummy parameter do not. Every parameter is in exactly one
        group (checked)."""
        decay, no_decay = set(), set()
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if param_name.endswith("bias") or param_name.startswith("bias"):
                    # startswith: MultiheadAttention's bias_k / bias_v
                    no_decay.add(full)
                elif param_name.endswith("weight") and isinstance(module, (nn.Linear, nn.MultiheadAttention)):
                    decay.add(full)
                elif param_name.endswith("weight") and isinstance(module, (nn.LayerNorm, nn.Embedding)):
                    no_decay.add(full)
        no_decay |= {"pos_emb", "_dummy_variable"}
        if self.cond_pos_emb is not None:
            no_decay.add("cond_pos_emb")
        params = dict(self.named_parameters())
        both = decay & no_decay
        missing = set(params) - (decay | no_decay)
        if both or missing:
            raise RuntimeError(
                f"TransformerForDiffusion optimizer groups: in both {sorted(both)}, "
                f"in neither {sorted(missing)}"
            )
        return [
            {"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
            {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
        ]

    def configure_optimizers(
        self,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> torch.optim.AdamW:
        """AdamW over :meth:`get_optim_groups`."""
        return torch.optim.AdamW(self.get_optim_groups(weight_decay), lr=learning_rate, betas=tuple(betas))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        cond: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """sample (B, T, input_dim), timestep (B,) / 0-dim / number, cond (B, To, cond_dim) or None
        -> (B, T, output_dim)."""
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        time_emb = self.time_emb(timestep.expand(batch)).unsqueeze(1)  # (B, 1, n_emb)
        input_emb = self.input_emb(sample)

        if self.encoder_only:
            tokens = torch.cat([time_emb, input_emb], dim=1)
            x = self.drop(tokens + self.pos_emb[:, : tokens.shape[1]])
            # is_causal states what torch would otherwise find by comparing the mask with a causal one,
            # a data-dependent test that breaks a torch.compile graph in two
            x = self.encoder(src=x, mask=self.mask, is_causal=self.mask is not None)[:, 1:]
        else:
            memory = time_emb
            if self.obs_as_cond:
                if cond is None:
                    raise ValueError("TransformerForDiffusion was built with cond_dim > 0 but got cond=None")
                memory = torch.cat([memory, self.cond_obs_emb(cond)], dim=1)
            memory = self.encoder(self.drop(memory + self.cond_pos_emb[:, : memory.shape[1]]))
            x = self.drop(input_emb + self.pos_emb[:, : input_emb.shape[1]])
            x = self.decoder(
                tgt=x,
                memory=memory,
                tgt_mask=self.mask,
                memory_mask=self.memory_mask,
                tgt_is_causal=self.mask is not None,
            )
        return self.head(self.ln_f(x))
