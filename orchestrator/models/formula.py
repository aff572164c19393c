"""Models written in the protocol as formulas, e.g. `rate: "b + g*exp(k*(cos(2*(theta-pref))-1))"`.

The text is tokenised and parsed by Python's `ast` parser (parsing only: nothing is ever evaluated
as Python), then checked against a small whitelist grammar and compiled to a tree of torch
closures. Allowed: numbers, names (parameters, model variables, `pi`, `e`), + - * / ** and unary
minus, and calls of the functions in FUNCTIONS. Anything else is a FormulaError naming the field.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

MAX_LENGTH = 2000
MAX_DEPTH = 60
MAX_NODES = 500

Fn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def _phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


#: function name -> (arity, torch implementation)
FUNCTIONS: dict[str, tuple[int, Callable[..., torch.Tensor]]] = {
    "exp": (1, torch.exp),
    "log": (1, torch.log),
    "log1p": (1, torch.log1p),
    "sqrt": (1, torch.sqrt),
    "abs": (1, torch.abs),
    "sin": (1, torch.sin),
    "cos": (1, torch.cos),
    "tan": (1, torch.tan),
    "tanh": (1, torch.tanh),
    "erf": (1, torch.erf),
    "sigmoid": (1, torch.sigmoid),
    "logistic": (1, torch.sigmoid),
    "phi": (1, _phi),
    "softplus": (1, torch.nn.functional.softplus),
    "deg2rad": (1, lambda x: x * (math.pi / 180.0)),
    "pow": (2, torch.pow),
    "min": (2, torch.minimum),
    "max": (2, torch.maximum),
    "clip": (3, lambda x, lo, hi: torch.minimum(torch.maximum(x, lo), hi)),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

_BINOPS: dict[type, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ast.Add: torch.add,
    ast.Sub: torch.sub,
    ast.Mult: torch.mul,
    ast.Div: torch.div,
    ast.Pow: torch.pow,
}


class FormulaError(ValueError):
    """The formula is not in the grammar or names something unknown; message starts with the field path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class CompiledFormula:
    """A checked formula: the names it uses and a torch function of a name->tensor mapping."""

    text: str
    names: frozenset[str]
    fn: Fn

    def __call__(self, env: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(env)


def parse_formula(text: str, path: str = "formula") -> tuple[ast.Expression, frozenset[str]]:
    """Parse and check the grammar; returns the tree and the free names (excluding constants)."""
    if not isinstance(text, str) or not text.strip():
        raise FormulaError(path, "formula must be a non-empty string")
    if len(text) > MAX_LENGTH:
        raise FormulaError(path, f"formula longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(path, f"syntax error at column {exc.offset}: {exc.msg}") from None
    names: set[str] = set()
    count = 0

    def check(node: ast.AST, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise FormulaError(path, f"formula has more than {MAX_NODES} terms")
        if depth > MAX_DEPTH:
            raise FormulaError(path, f"formula nested deeper than {MAX_DEPTH}")
        col = getattr(node, "col_offset", None)
        where = f" (column {col + 1})" if col is not None else ""
        if isinstance(node, ast.Expression):
            check(node.body, depth + 1)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise FormulaError(path, f"only numeric constants are allowed, got {node.value!r}{where}")
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise FormulaError(path, f"names may not start with '_': {node.id!r}{where}")
            if node.id in FUNCTIONS:
                raise FormulaError(path, f"function {node.id!r} used without a call{where}")
            if node.id not in CONSTANTS:
                names.add(node.id)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise FormulaError(path, f"operator {type(node.op).__name__} is not allowed{where}")
            check(node.left, depth + 1)
            check(node.right, depth + 1)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                raise FormulaError(path, f"operator {type(node.op).__name__} is not allowed{where}")
            check(node.operand, depth + 1)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise FormulaError(path, f"only plain function calls are allowed{where}")
            fname = node.func.id
            if fname not in FUNCTIONS:
                raise FormulaError(path, f"unknown function {fname!r}{where}; allowed: {', '.join(sorted(FUNCTIONS))}")
            if node.keywords:
                raise FormulaError(path, f"keyword arguments are not allowed in {fname}(){where}")
            arity = FUNCTIONS[fname][0]
            if len(node.args) != arity:
                raise FormulaError(path, f"{fname}() takes {arity} argument(s), got {len(node.args)}{where}")
            for a in node.args:
                if isinstance(a, ast.Starred):
                    raise FormulaError(path, f"starred arguments are not allowed{where}")
                check(a, depth + 1)
        else:
            raise FormulaError(path, f"{type(node).__name__} is not allowed in a formula{where}")

    check(tree, 0)
    return tree, frozenset(names)


def _compile(node: ast.AST) -> Fn:
    if isinstance(node, ast.Expression):
        return _compile(node.body)
    if isinstance(node, ast.Constant):
        v = float(node.value)
        return lambda env: torch.tensor(v, dtype=torch.float64)
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            c = CONSTANTS[node.id]
            return lambda env: torch.tensor(c, dtype=torch.float64)
        name = node.id
        return lambda env: env[name]
    if isinstance(node, ast.BinOp):
        op = _BINOPS[type(node.op)]
        left, right = _compile(node.left), _compile(node.right)
        return lambda env: op(left(env), right(env))
    if isinstance(node, ast.UnaryOp):
        inner = _compile(node.operand)
        if isinstance(node.op, ast.USub):
            return lambda env: -inner(env)
        return inner
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        impl = FUNCTIONS[node.func.id][1]
        args = [_compile(a) for a in node.args]
        return lambda env: impl(*(torch.as_tensor(a(env), dtype=torch.float64) for a in args))
    raise AssertionError(f"unchecked node {type(node).__name__}")  # parse_formula rejects these


def compile_formula(text: str, allowed: Mapping[str, str], path: str = "formula") -> CompiledFormula:
    """Check `text` and compile it. `allowed` maps every permitted free name to what it is
    ("parameter", "variable") so unknown names can be reported precisely."""
    tree, names = parse_formula(text, path)
    unknown = sorted(n for n in names if n not in allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "(none)"
        raise FormulaError(path, f"unknown name(s) {', '.join(map(repr, unknown))}: not a parameter with a prior, "
                                 f"a stimulus parameter or a constant (known: {known})")
    return CompiledFormula(text, names, _compile(tree))
