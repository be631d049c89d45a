"""The layout layer is the only source of the rule's constants and channel layout: the C++ and Triton
kernels receive them from it and hold no copies; and the package's modules import each other
without a cycle, the backends only the layout below them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import celo_hf
from celo_hf import layout
from celo_hf.backends import cpp
from celo_hf.celo2 import rule as celo2_rule

PACKAGE = Path(celo_hf.__file__).parent
BACKENDS = PACKAGE / "backends"


@pytest.mark.parametrize("shape", [layout.KernelShape(3, 4, 1), layout.KernelShape(2, 6, 2)], ids=str)
def test_cpp_library_is_built_with_the_layout(shape):
    """What the compiled library reports (its constexprs, set from the defines) is the layout's."""
    built = cpp.layout_of(cpp.library(shape))
    offsets = layout.kernel_channel_offsets(shape.decays)
    assert layout.KernelShape(built.k, built.h, built.l) == shape
    assert built.channels == offsets["channels"] == sum(
        layout.feature_group_widths(shape.decays)[layout.FEATURE_GROUP_NAMES.index(n)] for n in layout.ELEMENT_GROUPS
    )
    assert list(built.offsets) == [offsets[name] for name in layout.ELEMENT_GROUPS]
    expected = torch.tensor(list(layout.CONSTANTS.values()), dtype=torch.float32)
    assert torch.equal(torch.tensor(list(built.constants), dtype=torch.float32), expected)


def _float_literals(source: str) -> set[float]:
    return {float(text.rstrip("fF")) for text in re.findall(r"(?<![\w.])\d+\.\d*(?:[eE][-+]?\d+)?f?|\d+[eE][-+]?\d+f?", source)}


@pytest.mark.parametrize("source", ["cpp_kernels.cpp", "triton_kernels.py"])
def test_kernel_sources_hold_no_copy_of_a_constant(source):
    """Neither kernel source spells out one of the layout's constants (they arrive as defines or
    ``tl.constexpr`` arguments)."""
    code = re.sub(r"//.*|#.*", "", (BACKENDS / source).read_text())  # comments may name them
    copies = _float_literals(code) & set(layout.CONSTANTS.values())
    assert not copies, f"{source} writes {sorted(copies)} as literals"
    assert _float_literals("x = 1e-6; y = 1000.0f") == {1e-6, 1000.0}  # the scan finds them where they are


def test_triton_kernels_take_every_layout_value_as_a_constexpr():
    pytest.importorskip("triton")
    from celo_hf.backends import triton_kernels

    for constants in (layout.CELO_CONSTANTS, celo2_rule.CONSTANTS):  # the rule's, not module constants
        values = triton_kernels._constexprs(3, constants)
        assert values["C"] == layout.kernel_channel_offsets(3)["channels"] and values["K"] == 3
        assert {k: values[k] for k in ("GRAD_CLIP", "FEATURE_GRAD_CLIP", "RMS_EPS")} == {
            k: constants.by_name()[k] for k in ("GRAD_CLIP", "FEATURE_GRAD_CLIP", "RMS_EPS")
        }
        for kernel in (triton_kernels._accumulate_kernel, triton_kernels._step_kernel):
            assert set(values) <= set(kernel.arg_names), kernel


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The ``modules`` that ``path`` imports anywhere (functions included), except under
    ``if TYPE_CHECKING:``; ``from package import module`` counts as importing the module only."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
               for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("celo_hf")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = {f"{module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {module}
    return found & modules


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a package's ``__init__`` counts as a module), or ``None``."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_package_has_no_import_cycle():
    graph = _graph()
    assert "celo_hf.layout" in graph and graph["celo_hf.driver"] >= {"celo_hf.backends", "celo_hf.layout"}
    assert "celo_hf.hub" not in graph["celo_hf.network"]  # the reading of weights is below the network
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one


def test_backends_import_only_the_layout():
    graph = _graph()
    allowed = {"celo_hf.layout", *(n for n in graph if n.startswith("celo_hf.backends"))}
    for name, deps in graph.items():
        if name.startswith("celo_hf.backends.") or name == "celo_hf.reference":
            assert deps <= allowed, f"{name} imports {sorted(deps - allowed)}"
