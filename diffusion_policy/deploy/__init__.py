"""Deploy a trained policy without torch: load an export directory (``export.py``) and run it with numpy and
onnxruntime or OpenVINO. Importing this package never imports torch or diffusers (a test checks it);
the exporter itself (:mod:`diffusion_policy.deploy.exporter`) needs torch and is imported only on demand."""

from diffusion_policy.deploy.manifest import ExportError, read_manifest
from diffusion_policy.deploy.runtime import BACKENDS, ExportedPolicy, load_exported_policy

__all__ = ["BACKENDS", "ExportError", "ExportedPolicy", "load_exported_policy", "read_manifest"]
