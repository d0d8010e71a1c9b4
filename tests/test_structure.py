"""The repository's shape, as the README and METHOD.md promise it: imports flow one way, the toy world stays out of the
method's modules, every METHOD.md citation resolves, and the README's file table names every module."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
# The entry points and the wiring layer may build the embedded default; nothing else may import it.
TOY = {"toy_world", "toy_model", "toy_judge"}
WIRING = {"train", "evaluate", "run_setup"}


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The repository modules `path` imports (at module level only, or anywhere, lazy imports included), leaving
    out what runs only as a script (`if __name__ == "__main__":`)."""
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    nodes = body if top_level_only else [x for n in body for x in ast.walk(n)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return (found & set(MODULES)) - {path.stem}


def test_imports_form_no_cycle_lazy_imports_included():
    graph = {name: imports(path, top_level_only=False) for name, path in MODULES.items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen
    assert [name for name in sorted(graph) if name in reaches(name)] == []
    assert graph["atomic_thought"] == set()                  # the grammar is the bottom of the graph


def test_no_module_of_the_method_imports_the_toy_world():
    importers = {name for name, path in MODULES.items() if imports(path, top_level_only=False) & TOY}
    assert importers <= WIRING | TOY, importers - WIRING - TOY
    # not even the entry points load it on import: only the code paths that build the toy run do
    loaded_on_import = {name for name in WIRING if imports(MODULES[name], top_level_only=True) & TOY}
    assert loaded_on_import == {"train"}, loaded_on_import


def test_every_method_citation_resolves_to_a_section():
    method = (ROOT / "METHOD.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[ .]", method, re.M))
    files = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), ROOT / "README.md"]
    cited = {(f.name, n) for f in files for n in re.findall(r"METHOD\.md §(\d+(?:\.\d+)?)", f.read_text())}
    assert len(cited) > 30
    assert sorted((f, n) for f, n in cited if n not in sections) == []
    stale = [f.name for f in files if f.name != "test_structure.py"
             and re.search(r"PAPER\.md|DESIGN\.md|training_design", f.read_text())]
    assert stale == [], f"citations of files that are not in the repository: {stale}"


def test_the_readme_file_table_names_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## What works today"):readme.index("## Status of train.py")]
    listed = set(re.findall(r"`(\w+)\.py`", table))
    assert listed == set(MODULES), (set(MODULES) - listed, listed - set(MODULES))
