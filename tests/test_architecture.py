"""The package's shape: config.py imports no JAX, no import cycles, a small top
level, and only jaxft/tasks/ tells the tasks apart by name.

Read from the source with `ast`; nothing here imports jaxft's modules (or JAX)
in this process.
"""

import ast
import pathlib
import subprocess
import sys

from tests.helpers import ROOT

PACKAGE = ROOT / "jaxft"
TASK_NAMES = frozenset({"classify", "causal_lm", "image_classify"})
# Every task name at once: `x in TASKS` validates a name, it tells no task from another.
VOCABULARIES = frozenset({"TASKS", "REGISTRY"})


def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
  """`jaxft.tasks.base` -> jaxft/tasks/base.py; a package's __init__ is the package."""
  out = {}
  for path in sorted(package.rglob("*.py")):
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _imported(node: ast.AST, importer: str, modules: dict[str, pathlib.Path]) -> list[str]:
  """The jaxft modules an import statement names (a name imported from a
  package counts as its submodule when it is one, else as the package)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in modules]
  if not isinstance(node, ast.ImportFrom):
    return []
  base = node.module or ""
  if node.level:  # Relative: from the importer's package.
    package = importer.split(".")
    if modules[importer].name != "__init__.py":
      package = package[:-1]
    package = package[:len(package) - node.level + 1]
    base = ".".join(package + ([base] if base else []))
  if base not in modules:
    return []
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _with_parents(target: str, importer: str) -> list[str]:
  """`target` and the packages above it whose __init__ importing it runs first.

  A package the importer is itself in is already being imported (its
  __init__ started first), so importing a sibling does not run it again.
  """
  parts = target.split(".")
  out = [target]
  for i in range(1, len(parts)):
    package = ".".join(parts[:i])
    if importer != package and not importer.startswith(package + "."):
      out.append(package)
  return out


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  """Module -> the package's modules it imports, at module level or in a function."""
  modules = _modules(package)
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      for target in _imported(node, name, modules):
        edges.update(_with_parents(target, name))
    edges.discard(name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state = {}  # 1: on the DFS stack; 2: done.
  stack = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_importing_the_config_does_not_start_jax():
  # `jaxft` validates flags and configs before anything imports JAX (seconds).
  proc = subprocess.run(
      [sys.executable, "-c", "import sys, jaxft.config; assert 'jax' not in sys.modules, "
       "sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr


def test_the_import_graph_sees_function_level_imports_and_package_inits(tmp_path):
  # The walker itself, on a package made for it: what the cycle test relies on.
  files = {
      "pkg/__init__.py": "from pkg.sub import a\nimport pkg.sub.b\n",
      "pkg/sub/__init__.py": "from pkg.sub.a import X\n",
      "pkg/sub/a.py": "from pkg.sub import b\nX = 1\ndef f():\n  from pkg import c\n",
      "pkg/sub/b.py": "",
      "pkg/c.py": "from .sub import b\nimport os\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  graph = import_graph(tmp_path / "pkg")
  assert graph == {
      "pkg": {"pkg.sub", "pkg.sub.a", "pkg.sub.b"},  # pkg.sub's __init__ runs first.
      "pkg.sub": {"pkg.sub.a"},  # X is not a module: the import is of pkg.sub.a.
      "pkg.sub.a": {"pkg.sub.b", "pkg.c"},  # Its own package is already importing.
      "pkg.sub.b": set(),
      "pkg.c": {"pkg.sub", "pkg.sub.b"},
  }
  # c's import of pkg.sub.b runs pkg/sub/__init__, which imports a, which imports c.
  assert find_cycle(graph) == ["pkg.sub", "pkg.sub.a", "pkg.c", "pkg.sub"]


def test_jaxft_modules_import_each_other_without_a_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_top_level_package_has_at_most_15_modules():
  # New code goes into the subpackages by concern (tasks, tuning, formats, runtime...).
  top = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert len(top) <= 15, top


def _is_task_name(node: ast.AST) -> bool:
  """`config.task`, `config.get("task")`, `task.name` / `run.task.name`, or a task string."""
  if isinstance(node, ast.Constant):
    return node.value in TASK_NAMES
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
    return any(_is_task_name(e) for e in node.elts)
  if isinstance(node, ast.Attribute):
    if node.attr == "task":
      return True
    if node.attr == "name":
      owner = node.value
      owner = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
      return "task" in owner.lower()
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
    return (node.func.attr == "get" and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and node.args[0].value == "task")
  if isinstance(node, ast.Subscript):
    return isinstance(node.slice, ast.Constant) and node.slice.value == "task"
  return False


def _is_vocabulary_check(node: ast.Compare) -> bool:
  """`name in TASKS` (or `tasks.REGISTRY`): membership of the whole vocabulary."""
  last = node.comparators[-1]
  last = last.attr if isinstance(last, ast.Attribute) else getattr(last, "id", "")
  return (len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn))
          and last in VOCABULARIES)


def task_name_comparisons(paths) -> list[str]:
  """`file:line: source` of each comparison or match on a task's name."""
  found = []
  for path in paths:
    text = path.read_text()
    for node in ast.walk(ast.parse(text, str(path))):
      if isinstance(node, ast.Compare):
        if _is_vocabulary_check(node):
          continue
        operands = [node.left, *node.comparators]
      elif isinstance(node, ast.Match):
        operands = [node.subject]
      elif isinstance(node, ast.MatchValue):
        operands = [node.value]
      else:
        continue
      if any(_is_task_name(o) for o in operands):
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        found.append(f"{where}:{node.lineno}: {ast.get_source_segment(text, node)}")
  return found


def test_task_name_comparisons_are_flagged(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text("\n".join([
      "a = run.task.name == 'x'", "b = config.task != y", "c = kind in ('causal_lm', 'z')",
      "d = config.get('task') == k", "e = k.name != 'value'", "f = config.task",
      "g = {'classify': 1}[kind]", "h = config.get('task', 'classify') in TASKS", "match kind:\n  case 'image_classify':\n    pass", ""]))
  lines = [int(f.split(":")[1]) for f in task_name_comparisons([sample])]
  assert lines == [1, 2, 3, 4, 10]


def test_only_the_tasks_package_tells_tasks_apart_by_name():
  # Everything else asks the Task object (its attributes and methods), so a new
  # task is a new module in jaxft/tasks/, not a new branch in the loop or export.
  # config.py's vocabulary (TASKS, the defaults per task) is assignments, not comparisons.
  paths = [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] != "tasks"]
  paths += sorted((ROOT / "bench").rglob("*.py"))
  assert task_name_comparisons(paths) == []
