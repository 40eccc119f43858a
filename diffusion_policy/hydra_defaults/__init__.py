"""Hydra's ``hydra/env`` option for this framework (see ``diffusion_policy.common.hydra_checks``)."""
