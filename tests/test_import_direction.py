"""The task side (dataset, env, env_runner) and the method side (policy, model) never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "diffusion_policy"

# package folder -> module prefixes it must never import
FORBIDDEN = {
    "policy": [
        "diffusion_policy.env",
        "diffusion_policy.env_runner",
        "diffusion_policy.dataset",
        "diffusion_policy.workspace",
        "diffusion_policy.gym_util",
    ],
    "model": [
        "diffusion_policy.env",
        "diffusion_policy.env_runner",
        "diffusion_policy.dataset",
        "diffusion_policy.workspace",
        "diffusion_policy.policy",
        "diffusion_policy.gym_util",
    ],
    "env": [
        "diffusion_policy.policy",
        "diffusion_policy.model",
        "diffusion_policy.workspace",
        "diffusion_policy.dataset",
        "diffusion_policy.env_runner",
    ],
    "env_runner": [
        "diffusion_policy.policy",
        "diffusion_policy.model",
        "diffusion_policy.workspace",
        "diffusion_policy.dataset",
    ],
    "gym_util": [
        "diffusion_policy.policy",
        "diffusion_policy.model",
        "diffusion_policy.workspace",
        "diffusion_policy.dataset",
    ],
    "dataset": [
        "diffusion_policy.policy",
        "diffusion_policy.env",
        "diffusion_policy.env_runner",
        "diffusion_policy.workspace",
        "diffusion_policy.gym_util",
    ],
    "common": [
        "diffusion_policy.policy",
        "diffusion_policy.env",
        "diffusion_policy.env_runner",
        "diffusion_policy.workspace",
        "diffusion_policy.dataset",
    ],
}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_no_cross_side_imports():
    violations = []
    checked = 0
    for folder, banned in FORBIDDEN.items():
        for path in sorted((PKG / folder).rglob("*.py")):
            checked += 1
            for name in imported_modules(path):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    violations.append(f"{path.relative_to(PKG.parent)} imports {name}")
    assert checked > 10, "import check found too few modules; did the package move?"
    assert not violations, "cross-side imports:\n" + "\n".join(violations)


def test_relative_imports_are_not_used():
    # relative imports would slip past the check above
    offenders = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(tree)):
            offenders.append(str(path.relative_to(PKG.parent)))
    assert not offenders, f"use absolute imports: {offenders}"
