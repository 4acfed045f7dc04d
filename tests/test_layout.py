"""The package's layers: ``decode`` (what a serving process needs) imports nothing from the layers above it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medusa_llama"
ABOVE_DECODE = ("train", "eval", "cli", "serve", "pipeline")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_decode_imports_no_layer_above_it():
    offending = {
        f"{path.name}: {module}"
        for path in (PACKAGE / "decode").glob("*.py")
        for module in imported_modules(path)
        if module.startswith(tuple(f"medusa_llama.{layer}" for layer in ABOVE_DECODE))
    }
    assert not offending, offending


def test_every_layer_is_a_package():
    for layer in ("decode", "train", "eval", "cli", "serve"):
        assert (PACKAGE / layer / "__init__.py").is_file()
    assert not [p.name for p in PACKAGE.glob("*.py") if p.name.startswith(("commands_", "train_", "data", "bench"))]


def test_the_test_environment_runs_the_kernel_tests():
    """The test extra installs Triton, so CI runs the GPU kernels' tests in the interpreter instead of skipping."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    test_extra = text.split("\ntest = [", 1)[1].split("\n]", 1)[0]
    assert '"triton==' in test_extra
