"""Collect PushT demonstrations with the mouse (the original's demo_pusht.py workflow and file layout)."""

from __future__ import annotations

import sys

import click

from diffusion_policy.common.errors import RunInterrupted


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", required=True, help="ReplayBuffer zarr to append to (created if missing)")
@click.option(
    "-rs", "--render_size", default=96, show_default=True, type=int, help="recorded image size (px)"
)
@click.option("-hz", "--control_hz", default=10, show_default=True, type=int, help="control rate")
def main(output: str, render_size: int, control_hz: int) -> None:
    """Collect PushT demonstrations in a 512x512 window.

    \b
    Usage: python demo_pusht.py -o data/my_demos.zarr
    Then:  python train.py task.dataset.zarr_path=data/my_demos.zarr
           (any PushT recipe, e.g. --config-name=train_diffusion_unet_hybrid_workspace for images)

    \b
    Move the mouse onto the blue circle to start recording; the circle then follows the mouse.
    Push the grey T onto the green target. An episode ends and is saved when the T covers the
    target, or when you press Enter.
      Enter        save the episode now
      R            retry: restart this episode (same layout), nothing saved
      Space (hold) pause
      Q / close    quit (the episode in progress is not saved)

    \b
    Episode i starts from layout seed i, i = the number of episodes already in the file, so you
    can stop and continue later. Each step records img (96x96x3 uint8), state (5), keypoint (9x2),
    action (2) and n_contacts (1), as the original's PushT data. Episodes are appended atomically:
    stopping at any moment (Ctrl-C included) leaves every saved episode intact.
    """
    from diffusion_policy.env.pusht.demo_collector import DemoCollector

    try:
        collector = DemoCollector(output, render_size=render_size, control_hz=control_hz)
    except (ValueError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    try:
        collector.run()
    except (KeyboardInterrupt, RunInterrupted):
        print(f"stopped; {collector.buffer.n_episodes} episodes in {output}", file=sys.stderr)
        sys.exit(130)
    finally:
        collector.close()


if __name__ == "__main__":
    main()
