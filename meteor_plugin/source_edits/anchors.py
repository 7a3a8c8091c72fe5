"""Edit points: each anchor finds the statement it hooks in a file's syntax tree, never by line number.

An anchor returns a ``Spot`` (insert before ``lines[index]``, with that indentation), ``None`` when the
file does not need the edit, or raises ``NotFound`` saying which landmark is missing, so that a file that
does not look as expected is refused instead of patched in the wrong place.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple


class NotFound(Exception):
    """The file lacks the structure an anchor hooks; the message says what is missing."""


@dataclass(frozen=True)
class Spot:
    index: int  # 0-based: the new lines go before lines[index], i.e. right after line ``index`` (1-based)
    indent: str


_MAIN_HEADER = re.compile(
    r"""^if\s+(?:__name__\s*==\s*(['"])__main__\1|(['"])__main__\2\s*==\s*__name__)\s*:\s*(?:#.*)?$"""
)


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def calls_any(node: ast.AST, names: Sequence[str]) -> bool:
    """Whether ``node`` contains a call to ``name(...)`` or ``something.name(...)`` for one of ``names``."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            func = sub.func
            if isinstance(func, ast.Name) and func.id in names:
                return True
            if isinstance(func, ast.Attribute) and func.attr in names:
                return True
    return False


def _indent_of(lines: List[str], lineno: int) -> str:
    line = lines[lineno - 1]
    return line[: len(line) - len(line.lstrip(" \t"))]


def _after_statement(stmt: ast.stmt, lines: List[str], what: str) -> int:
    """Index just after ``stmt``; refuses when something other than a comment shares its last line."""
    rest = lines[stmt.end_lineno - 1][stmt.end_col_offset:].strip()
    if rest and not rest.startswith("#"):
        raise NotFound(f"{what} is followed by more code on line {stmt.end_lineno}")
    return stmt.end_lineno


def _calls_text(names: Sequence[str]) -> str:
    return " or ".join(f"{n}()" for n in names)


@dataclass(frozen=True)
class MainBlockStart:
    """First lines of the module's ``if __name__ == "__main__":`` block, which must call one of ``calls``.

    Scripts parse their arguments inside that block, so code placed at its start runs before the
    parser and before any model is loaded.
    """

    calls: Tuple[str, ...]

    @property
    def description(self) -> str:
        return f'start of the `if __name__ == "__main__":` block (which calls {_calls_text(self.calls)})'

    def locate(self, module: ast.Module, lines: List[str]) -> Optional[Spot]:
        blocks = [s for s in module.body if isinstance(s, ast.If) and _is_main_test(s.test)]
        if not blocks:
            raise NotFound('no `if __name__ == "__main__":` block at module level')
        if len(blocks) > 1:
            raise NotFound(f'{len(blocks)} `if __name__ == "__main__":` blocks (lines '
                           + ", ".join(str(b.lineno) for b in blocks) + "); expected one")
        block = blocks[0]
        header = lines[block.lineno - 1].rstrip("\r\n")
        if not _MAIN_HEADER.match(header) or block.body[0].lineno <= block.lineno:
            raise NotFound(f'the `if __name__ == "__main__":` header on line {block.lineno} is not on a line '
                           "of its own")
        if not calls_any(block, self.calls):
            raise NotFound(f'the `if __name__ == "__main__":` block (line {block.lineno}) does not call '
                           + _calls_text(self.calls))
        return Spot(block.lineno, _indent_of(lines, block.body[0].lineno))


def _is_import(stmt: ast.stmt) -> bool:
    """An import, or a ``try:`` whose body only imports (an optional-import block)."""
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return True
    return isinstance(stmt, ast.Try) and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in stmt.body)


@dataclass(frozen=True)
class AfterImportsBefore:
    """Right after the last module-level import that precedes the statement ``target`` matches.

    For scripts that parse arguments or load the model at module level (no ``__main__`` block).
    """

    what: str  # how the target statement is named in messages
    target: Callable[[ast.stmt], bool]

    @property
    def description(self) -> str:
        return f"after the imports, before {self.what}"

    def locate(self, module: ast.Module, lines: List[str]) -> Optional[Spot]:
        position = next((i for i, s in enumerate(module.body) if self.target(s)), None)
        if position is None:
            raise NotFound(f"no {self.what} at module level")
        imports = [s for s in module.body[:position] if _is_import(s)]
        if not imports:
            raise NotFound(f"no module-level import before {self.what}")
        return Spot(_after_statement(imports[-1], lines, "the last import"), "")


def statement_calling(*names: str) -> Callable[[ast.stmt], bool]:
    return lambda stmt: calls_any(stmt, names)


def class_named(name: str) -> Callable[[ast.stmt], bool]:
    return lambda stmt: isinstance(stmt, ast.ClassDef) and stmt.name == name


@dataclass(frozen=True)
class AfterClass:
    """Right after the module-level class ``name``."""

    name: str

    @property
    def description(self) -> str:
        return f"after `class {self.name}`"

    def locate(self, module: ast.Module, lines: List[str]) -> Optional[Spot]:
        found = [s for s in module.body if isinstance(s, ast.ClassDef) and s.name == self.name]
        if len(found) != 1:
            raise NotFound(f"no module-level `class {self.name}`" if not found
                           else f"{len(found)} module-level classes named {self.name}")
        return Spot(_after_statement(found[0], lines, f"class {self.name}"), "")


def _keywords(call: ast.Call) -> List[str]:
    return [k.arg for k in call.keywords if k.arg]


@dataclass(frozen=True)
class AfterQuantizationKwargs:
    """After ``<kwargs>.update(dict(...))`` inside ``if training_args.bits in [4, 8]:`` in ``def train``.

    LLaVA's and EAGLE's ``train()`` put ``load_in_4bit``/``load_in_8bit`` beside a ``quantization_config``
    in the ``from_pretrained`` kwargs, which transformers 4.44 and later refuse. Not needed (``None``)
    when that ``dict(...)`` has no ``load_in_*bit`` keyword.
    """

    function: str = "train"
    kwargs_name: str = "bnb_model_from_pretrained_args"

    @property
    def description(self) -> str:
        return (f"after `{self.kwargs_name}.update(dict(...))` under `if training_args.bits in [4, 8]:` "
                f"in `def {self.function}`")

    def locate(self, module: ast.Module, lines: List[str]) -> Optional[Spot]:
        funcs = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == self.function]
        if len(funcs) != 1:
            raise NotFound(f"no module-level `def {self.function}`")
        branches = [
            n for n in ast.walk(funcs[0])
            if isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
            and isinstance(n.test.left, ast.Attribute) and n.test.left.attr == "bits"
            and len(n.test.ops) == 1 and isinstance(n.test.ops[0], ast.In)
        ]
        if not branches:
            raise NotFound(f"no `if training_args.bits in [4, 8]:` in `def {self.function}`")
        updates = [
            s for branch in branches for s in branch.body
            if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
            and isinstance(s.value.func, ast.Attribute) and s.value.func.attr == "update"
            and isinstance(s.value.func.value, ast.Name) and s.value.func.value.id == self.kwargs_name
        ]
        if len(updates) != 1:
            raise NotFound(f"{'no' if not updates else len(updates)} `{self.kwargs_name}.update(...)` directly "
                           f"under an `if training_args.bits in [4, 8]:` in `def {self.function}` (expected one)")
        call = updates[0].value
        arg = call.args[0] if len(call.args) == 1 and not call.keywords else None
        if not (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "dict"):
            raise NotFound(f"`{self.kwargs_name}.update(...)` on line {updates[0].lineno} is not given one dict(...)")
        keys = _keywords(arg)
        if "quantization_config" not in keys or not {"load_in_4bit", "load_in_8bit"} & set(keys):
            return None  # nothing to fix in this file
        spot = _after_statement(updates[0], lines, f"`{self.kwargs_name}.update(...)`")
        return Spot(spot, _indent_of(lines, updates[0].lineno))
