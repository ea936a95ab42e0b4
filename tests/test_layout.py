"""The store's layout has one owner: names in nngp_dist/layout.py only, the README's table
generated from it; and the package's functions stay short enough to read."""

import ast
from pathlib import Path

from nngp_dist import layout

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nngp_dist"
# Names no other string of the package means: never spelled out outside the layout module.
UNIQUE = {
    *layout.KERNEL_ARRAYS,
    layout.T_TRAIN,
    layout.CHOL,
    *layout.CHOL_WORK,
    layout.CG_NYSTROM,
    layout.CG_BLOCKJACOBI,
}
# Names that are also ordinary words or other formats' keys (a Dataset's fields and the npz
# format's keys are x_train ...; leaky ReLU has an alpha): checked where they index something.
COMMON = {
    layout.X_TRAIN,
    layout.X_TEST,
    layout.Y_TRAIN,
    layout.Y_TEST,
    layout.ALPHA,
    layout.MEAN,
    layout.VARIANCE,
}
NAMES = UNIQUE | COMMON


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "data" not in p.parts)


def spelled_out(path):
    """(line, name) of the array names a module spells out: any string constant that is a
    UNIQUE name or starts with ``tiles/``, and COMMON names used as a subscript (``g["mean"]``).
    Docstrings are left out (they may name arrays)."""
    tree = ast.parse(path.read_text())
    subscripts = {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        v = node.value
        if (
            v in UNIQUE
            or v.startswith(f"{layout.RECORDS}/")
            or (v in COMMON and id(node) in subscripts)
        ):
            yield node.lineno, v


def test_array_names_are_literals_only_in_the_layout_module():
    found = [
        f"{p.relative_to(ROOT)}:{line}: {value!r}"
        for p in sources()
        if p.name != "layout.py"
        for line, value in spelled_out(p)
    ]
    assert not found, "array names spelled out instead of nngp_dist.layout's constants:\n" + (
        "\n".join(found)
    )


def test_the_check_finds_a_spelled_out_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""Docstrings may say k_train_train."""\n'
        'x = g["k_train_train"]\ny = g["mean"]\nz = {"mean": 1}\nw = g["tiles/chol"]\n'
    )
    assert [v for _, v in spelled_out(bad)] == ["k_train_train", "mean", "tiles/chol"]


def test_readme_layout_table_is_generated_from_the_layout_module():
    readme = (ROOT / "README.md").read_text()
    assert layout.layout_table() in readme, (
        "README's store table differs from nngp_dist.layout.layout_table(); paste its output"
    )
    documented = " ".join(a.name for a in layout.ARRAYS)
    missing = [n for n in NAMES if f"`{n}`" not in documented]
    assert not missing, f"arrays missing from the layout table: {missing}"


def long_functions(path, limit):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines"


def test_no_function_is_longer_than_80_lines():
    found = [f for p in sources() for f in long_functions(p, 80)]
    assert not found, "functions over 80 lines:\n" + "\n".join(found)
