"""Readers that turn other demonstration formats into a ReplayBuffer zarr (``import_dataset.py``).

Each reader checks the whole source's structure first (files, keys, shapes, lengths) and then yields one
episode at a time; :func:`~diffusion_policy.dataset.importers.writer.write_episodes` appends them to a
temporary zarr that is renamed into place only when every episode arrived. Problems are
:class:`~diffusion_policy.dataset.importers.writer.SourceError`, one line naming what is missing.
"""
