"""1D temporal UNet with FiLM conditioning on diffusion step and observations (Janner et al.; Chi et al.).

Parameter names follow the original implementation so its checkpoints load, and the structure keeps the
original's quirks on purpose (they change parameter counts and checkpoint keys):

- FiLM applies ``scale * h + bias`` (no ``1 +``).
- The first down level's output is pushed on the skip stack but never consumed.
- Both up levels upsample, so a 3-level UNet maps T -> T/2 -> T/4 -> T/2 -> T.
- The local-condition branch builds two encoders but only the first one's output is ever added.
- The output block's GroupNorm has 8 groups whatever ``n_groups`` says.
- Submodules are registered in the original's order (mid, step encoder, local-cond encoder, up, down,
  final), which is the order of ``parameters()`` and so of the optimizer state in its checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffusion_policy.model.diffusion.conv1d_components import (
    Conv1dBlock,
    Downsample1d,
    TemporalConv1d,
    Upsample1d,
)
from diffusion_policy.model.diffusion.positional_embedding import SinusoidalPosEmb

# GroupNorm groups of the output block: the original builds it without passing n_groups
FINAL_CONV_GROUPS = 8


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM (or additive) conditioning in between, plus a residual path."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                Conv1dBlock(in_channels, out_channels, kernel_size, n_groups=n_groups),
                Conv1dBlock(out_channels, out_channels, kernel_size, n_groups=n_groups),
            ]
        )
        self.out_channels = out_channels
        self.cond_predict_scale = cond_predict_scale
        cond_channels = 2 * out_channels if cond_predict_scale else out_channels
        # indices 0/1 (Mish, Linear) match the original's "cond_encoder.1.*" keys
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, cond_channels))
        self.residual_conv = (
            TemporalConv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, T), cond: (B, cond_dim) -> (B, out_channels, T)."""
        out = self.blocks[0](x)
        embed = self.cond_encoder(cond).unsqueeze(-1)
        if self.cond_predict_scale:
            scale, bias = embed.chunk(2, dim=1)
            out = scale * out + bias
        else:
            out = out + embed
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """Denoiser eps_theta(x_t, t, cond) over action (or action+obs) sequences.

    Args:
        input_dim: channels of the noisy sequence (action_dim, or action_dim + obs_dim for inpainting).
        local_cond_dim: per-step conditioning channels, or None.
        global_cond_dim: per-sample conditioning size (e.g. obs_dim * n_obs_steps), or None.
        diffusion_step_embed_dim: size of the step embedding.
        down_dims: channels per UNet level; T must be divisible by 2 ** (len(down_dims) - 1).
        kernel_size: odd temporal kernel size.
        n_groups: GroupNorm groups (every entry of down_dims must be divisible by it).
        cond_predict_scale: FiLM (scale and bias) when True, additive bias only when False.
    """

    def __init__(
        self,
        input_dim: int,
        local_cond_dim: int | None = None,
        global_cond_dim: int | None = None,
        diffusion_step_embed_dim: int = 256,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ) -> None:
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if len(down_dims) < 1:
            raise ValueError(
                "ConditionalUnet1D: down_dims must name at least one level, e.g. [256, 512, 1024]"
            )
        if kernel_size % 2 != 1:
            raise ValueError(
                f"ConditionalUnet1D: kernel_size={kernel_size} must be odd to keep the sequence length"
            )
        bad = [d for d in down_dims if d % n_groups != 0]
        if bad:
            raise ValueError(f"ConditionalUnet1D: down_dims {bad} are not divisible by n_groups={n_groups}")
        if down_dims[0] % FINAL_CONV_GROUPS != 0:
            raise ValueError(
                f"ConditionalUnet1D: down_dims[0]={down_dims[0]} must be divisible by {FINAL_CONV_GROUPS} "
                f"(the final block's GroupNorm always has {FINAL_CONV_GROUPS} groups, as in the original)"
            )
        self.input_dim = int(input_dim)
        self.local_cond_dim = local_cond_dim
        self.global_cond_dim = global_cond_dim

        # Modules are built in the original's order (which fixes the initial weights a seed draws) and then
        # registered in the original's order, which differs: mid, step encoder, local-cond encoder, up, down,
        # final. parameters() follows registration, and optimizer state is stored by position in it, so
        # the original's checkpoints' AdamW moments line up only with this order.
        dsed = diffusion_step_embed_dim
        diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed),
            nn.Linear(dsed, dsed * 4),
            nn.Mish(),
            nn.Linear(dsed * 4, dsed),
        )
        cond_dim = dsed + (global_cond_dim or 0)

        def res_block(din: int, dout: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(
                din,
                dout,
                cond_dim=cond_dim,
                kernel_size=kernel_size,
                n_groups=n_groups,
                cond_predict_scale=cond_predict_scale,
            )

        all_dims = [self.input_dim, *down_dims]
        in_out = list(zip(all_dims[:-1], all_dims[1:]))

        local_cond_encoder = None
        if local_cond_dim is not None:
            first_out = in_out[0][1]
            # the second ("up") encoder is never used in forward; kept so original checkpoints load
            local_cond_encoder = nn.ModuleList(
                [res_block(local_cond_dim, first_out), res_block(local_cond_dim, first_out)]
            )

        mid_dim = all_dims[-1]
        self.mid_modules = nn.ModuleList([res_block(mid_dim, mid_dim), res_block(mid_dim, mid_dim)])

        down_modules = nn.ModuleList()
        for ind, (din, dout) in enumerate(in_out):
            is_last = ind == len(in_out) - 1
            down_modules.append(
                nn.ModuleList(
                    [
                        res_block(din, dout),
                        res_block(dout, dout),
                        nn.Identity() if is_last else Downsample1d(dout),
                    ]
                )
            )

        # every up level upsamples (the original's "is_last" test never fires)
        up_modules = nn.ModuleList()
        for din, dout in reversed(in_out[1:]):
            up_modules.append(nn.ModuleList([res_block(dout * 2, din), res_block(din, din), Upsample1d(din)]))

        start_dim = down_dims[0]
        # the original leaves this block at GroupNorm's default of 8 groups, whatever n_groups says
        final_conv = nn.Sequential(
            Conv1dBlock(start_dim, start_dim, kernel_size=kernel_size, n_groups=FINAL_CONV_GROUPS),
            nn.Conv1d(start_dim, self.input_dim, 1),
        )

        self.diffusion_step_encoder = diffusion_step_encoder
        self.local_cond_encoder = local_cond_encoder
        self.up_modules = up_modules
        self.down_modules = down_modules
        self.final_conv = final_conv
        self.downsample_factor = 2 ** (len(down_dims) - 1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        local_cond: torch.Tensor | None = None,
        global_cond: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """sample: (B, T, input_dim); timestep: (B,), 0-dim or int; local_cond: (B, T, local_cond_dim);
        global_cond: (B, global_cond_dim) -> (B, T, input_dim).

        Pass timesteps already on sample's device (the policies do): a CPU tensor is moved here, which
        costs a host-to-device copy per call.
        """
        batch, horizon = sample.shape[0], sample.shape[1]
        if horizon % self.downsample_factor != 0:
            raise ValueError(
                f"ConditionalUnet1D: sequence length {horizon} is not divisible by {self.downsample_factor} "
                f"(2 ** (len(down_dims) - 1)); change horizon or down_dims"
            )
        if sample.shape[-1] != self.input_dim:
            raise ValueError(
                f"ConditionalUnet1D: sample has {sample.shape[-1]} channels, expected {self.input_dim}"
            )

        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long, device=sample.device)
        elif timestep.device != sample.device:
            timestep = timestep.to(sample.device)
        timestep = timestep.reshape(-1).expand(batch)

        global_feature = self.diffusion_step_encoder(timestep)
        if global_cond is not None:
            global_feature = torch.cat([global_feature, global_cond], dim=-1)

        local_feature = None
        if local_cond is not None:
            if self.local_cond_encoder is None:
                raise ValueError(
                    "ConditionalUnet1D: got local_cond but the model was built with local_cond_dim=None"
                )
            # only the first local encoder contributes (original behaviour, see module docstring)
            local_feature = self.local_cond_encoder[0](local_cond.transpose(1, 2), global_feature)

        x = sample.transpose(1, 2)
        skips = []
        for idx, (resnet, resnet2, downsample) in enumerate(self.down_modules):
            x = resnet(x, global_feature)
            if idx == 0 and local_feature is not None:
                x = x + local_feature
            x = resnet2(x, global_feature)
            skips.append(x)
            x = downsample(x)

        for mid_module in self.mid_modules:
            x = mid_module(x, global_feature)

        for resnet, resnet2, upsample in self.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)
            x = resnet(x, global_feature)
            x = resnet2(x, global_feature)
            x = upsample(x)

        x = self.final_conv(x)
        return x.transpose(1, 2)
