"""OmegaConf resolvers, registered in one place.

The original registers Python's ``eval`` as a resolver, so any config could run arbitrary code. Its configs
only ever compute small derived values (``${eval:'${n_obs_steps}-1'}``, ``"${eval:
${task.obs_dim}*${n_obs_steps} if ${obs_as_global_cond} else None}"``), so ``safe_eval`` accepts exactly that
language: numbers, None/True/False, arithmetic, comparisons, and/or/not, conditional expressions and
parentheses. It is registered as ``eval`` (the original's unresolved configs keep working) and as ``calc``
(the name our own configs use).

``gpus_for_device`` gives the number of GPUs a job on ``training.device`` needs (1 for ``cuda`` /
``cuda:N``, else 0); the cluster launcher configs ask Ray / SLURM for that many per job.
"""

from __future__ import annotations

import ast
import operator
from typing import Any

from omegaconf import OmegaConf

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
# plenty for config arithmetic, and `9**9**9` cannot hang the process
_MAX_EXPONENT = 64


class _Rejected(Exception):
    pass


def _pow(base: Any, exp: Any) -> Any:
    if isinstance(exp, (int, float)) and abs(exp) > _MAX_EXPONENT:
        raise _Rejected(f"exponent {exp} is larger than {_MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base).bit_length() * exp > 4096:
        raise _Rejected("result too large")
    return operator.pow(base, exp)


def _eval_node(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (bool, int, float)):
            return node.value
        raise _Rejected(f"constant {node.value!r} is not a number, None, True or False")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow):
            return _pow(left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            value = True
            for v in node.values:
                value = _eval_node(v)
                if not value:
                    return value
            return value
        value = False
        for v in node.values:
            value = _eval_node(v)
            if value:
                return value
        return value
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = _eval_node(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval_node(comparator)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval_node(node.body) if _eval_node(node.test) else _eval_node(node.orelse)
    raise _Rejected(f"{type(node).__name__} is not allowed")


def safe_eval(expression: Any) -> Any:
    """Evaluate a config arithmetic expression without Python ``eval``.

    Non-string inputs (OmegaConf passes a bare ``${x}`` argument already typed) are returned unchanged.
    Anything outside the whitelist raises ``ValueError`` naming the expression.
    """
    if not isinstance(expression, str):
        if expression is None or isinstance(expression, (bool, int, float)):
            return expression
        raise ValueError(f"config expression {expression!r}: expected a string or a number")
    text = expression.strip()
    try:
        tree = ast.parse(text, mode="eval")
        return _eval_node(tree)
    except (SyntaxError, _Rejected, ArithmeticError, TypeError) as e:
        reason = e.msg if isinstance(e, SyntaxError) else str(e)
        raise ValueError(
            f"config expression {text!r} is not allowed ({reason}); only numbers, None/True/False, "
            "+ - * / // % **, comparisons, and/or/not and `a if cond else b` are supported"
        ) from None


def gpus_for_device(device: Any) -> int:
    """GPUs one training process on ``device`` uses: 1 for ``cuda`` / ``cuda:N``, 0 otherwise (``auto``
    asks for none: a scheduler cannot know what ``auto`` will find; pass ``training.device=cuda``)."""
    return 1 if str(device).strip().lower().startswith("cuda") else 0


def register_resolvers() -> None:
    """Register ``eval`` and ``calc`` (both ``safe_eval``) and ``gpus_for_device``. Safe to call any
    number of times.

    ``replace=True`` also displaces a Python-``eval`` resolver some other module may have registered.
    """
    for name in ("eval", "calc"):
        OmegaConf.register_new_resolver(name, safe_eval, replace=True)
    OmegaConf.register_new_resolver("gpus_for_device", gpus_for_device, replace=True)
