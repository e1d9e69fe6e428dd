"""The collectives of a compiled step, read from its optimized HLO text.

`parse(text)` lists every collective op with its bytes on one device, its
replica-group size and how many times it runs per step; `summary` turns that
into ops and bytes sent per device per step, per kind. jaxft reads the text
from the compiler's own dump (`inspect.hlo_text`): `compiled.as_text()`
cannot print some TPU steps when libtpu is newer than jaxlib.

Why not XLA's own cost analysis: it counts a while-loop body once, and jaxft
scans over the transformer layers, so a per-layer all-gather inside the scan
runs num_layers times per step. Here each computation gets a multiplier from
the call graph rooted at ENTRY: a while body runs its loop's trip count times
its caller's multiplier, a computation reached along several paths runs the
sum of them.

What the TPU compiler's text looks like (libtpu 0.0.52, jax 0.10):

- while loops carry no `known_trip_count` (the CPU and GPU compilers write
  `backend_config={..."known_trip_count":{"n":"32"}...}`), so the trip count
  is read off the loop itself: the condition compares a counter in the loop
  tuple with a bound, the caller's tuple sets the counter's start and the
  body adds a constant step to it.
- replica groups are printed as a mesh and the axes grouped over,
  `replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}` (a sub-axis reads
  `'axis_1':(1)2`), besides the explicit `{{0,1,2,3},{4,5,6,7}}` and iota
  `[2,4]<=[8]` forms.
- collective-permute is async (`collective-permute-start` returns the tuple
  (operand, result, contexts...), `-done` the result). On v5e, all-gathers are
  overlapped with compute as fusions of kind kCustom: one whose root is a
  custom-call to `AsyncCollectiveStart`, fusions of compute in between and one
  rooted in `AsyncCollectiveDone`, each holding a copy of the same all-gather
  (same channel_id). The op is counted once.
- there is no reduce-scatter op: a reduce-scatter is a kCustom fusion (emitter
  SingleInputAllReduceScatterFusion) of an all-reduce and a dynamic slice of
  its result, counted here as a reduce-scatter. Sometimes (v5p, a group of
  all 8 chips) the compiler instead runs a full all-reduce and slices its
  result in a later fusion; that is an all-reduce on the wire and counted as one.

Pure text processing, no JAX: it works on any HLO text, from any backend.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op of a compiled module.

  Attributes:
    kind: one of KINDS.
    result_bytes: bytes of its result on one device (for an async *-start op,
      the real result, not the tuple that also holds the operand).
    operand_bytes: bytes of its operand(s) on one device.
    group_size: devices in one replica group (1 when it cannot be determined).
    executions: times it runs per step: the product of the trip counts of
      the while loops around it (a scan over 32 layers: 32); a loop whose
      count cannot be read counts once, a computation ENTRY never calls 0.
    computation: the name of the HLO computation holding it.
  """
  kind: str
  result_bytes: int
  operand_bytes: int
  group_size: int
  executions: int
  computation: str


# Bits per element; sub-byte types are packed, so sizes are rounded up once
# per array. token[] and opaque[] carry no data.
_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8,
    "bf16": 16, "f16": 16, "s16": 16, "u16": 16,
    "f32": 32, "s32": 32, "u32": 32, "tf32": 32,
    "f64": 64, "s64": 64, "u64": 64, "c64": 64, "c128": 128,
    "token": 0, "opaque": 0,
}

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9_\-]*)\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_CALLED_ONE = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation|select|scatter|"
    r"comparator)=%?([\w.\-]+)")
_CALLED_MANY = re.compile(r"\b(branch_computations|called_computations|calls)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_DIRECTION = re.compile(r"\bdirection=([A-Z]+)")
_INDEX = re.compile(r"\bindex=(\d+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_GROUPS_LIST = re.compile(r"\breplica_groups=\{((?:\{[^{}]*\},?\s*)*)\}")
_GROUPS_IOTA = re.compile(r"\breplica_groups=\[([\d,\s]+)\]<=\[")
_GROUPS_MESH = re.compile(
    r"\breplica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(.*?\))?\s*\{([^{}]*)\}")
_SOURCE_TARGET = re.compile(r"\bsource_target_pairs=")
_MODULE_INT = re.compile(r"\b(num_partitions|replica_count)=(\d+)")

# Ops that pass a value through unchanged, for following a loop counter.
_PASS_THROUGH = ("copy", "bitcast", "convert", "reshape")
# Parts of async chains that point at a computation already counted at the start.
_ASYNC_TAIL = ("async-update", "async-done")


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool


@dataclasses.dataclass
class _Computation:
  name: str
  entry: bool
  instructions: dict[str, _Instruction] = dataclasses.field(default_factory=dict)
  root: str | None = None


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape on one device: an array, or a tuple summed.

  `bf16[4,1024]{1,0:T(8,128)(2,1)}` is 8192: layouts and tiling are ignored
  (the logical size, not the padded one, is what a collective moves).
  """
  total = 0
  for dtype, dims in _ARRAY.findall(_COMMENT.sub("", shape)):
    bits = _DTYPE_BITS.get(dtype, 8 if dtype.startswith("f8") else None)
    if bits is None:
      if dtype.startswith(("f4", "f6")):
        bits = int(dtype[1])
      else:
        continue
    count = 1
    for d in dims.split(","):
      d = d.strip().lstrip("<=")  # Bounded dynamic dims, `<=8`, are counted at their bound.
      if d.isdigit():  # An unbounded one, `?`, cannot be sized: counted as 1.
        count *= int(d)
    total += (count * bits + 7) // 8
  return total


def _split_top(text: str) -> list[str]:
  """Splits at commas outside brackets: a tuple's elements or an operand list."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i
  return len(text) - 1


def _parse_instruction(line: str) -> _Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  root, name, rest = bool(m.group(1)), m.group(2), _COMMENT.sub("", m.group(3))
  if rest.startswith("("):  # A tuple shape: up to its matching parenthesis.
    end = _closing(rest, 0) + 1
  else:  # An array shape: up to the first space outside its layout braces.
    end, depth = len(rest), 0
    for i, ch in enumerate(rest):
      if ch in "([{":
        depth += 1
      elif ch in ")]}":
        depth -= 1
      elif ch == " " and depth == 0:
        end = i
        break
  shape, rest = rest[:end], rest[end:]
  op = _OPCODE.match(rest)
  if not op:
    return None
  open_at = op.end() - 1
  close_at = _closing(rest, open_at)
  operands = _split_top(rest[open_at + 1:close_at])
  return _Instruction(name, shape, op.group(1), operands, rest[close_at + 1:], root)


def _parse_module(text: str) -> tuple[dict[str, _Computation], dict[str, int]]:
  """(computations by name, the module header's integer settings)."""
  comps: dict[str, _Computation] = {}
  header: dict[str, int] = {}
  current: _Computation | None = None
  for line in text.splitlines():
    if line.startswith("HloModule"):
      header = {k: int(v) for k, v in _MODULE_INT.findall(_QUOTED.sub("", line))}
      continue
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = _Computation(m.group(2), bool(m.group(1)))
        comps[current.name] = current
        # Parameters also live in the header; instruction lines (when
        # printed) override these with their layouts.
        inner = line[line.index("(") + 1:_closing(line, line.index("("))]
        for p in _split_top(inner):
          if ":" in p:
            pname, pshape = p.split(":", 1)
            current.instructions[pname.strip().lstrip("%")] = _Instruction(
                pname.strip().lstrip("%"), pshape.strip(), "parameter", [], "", False)
      continue
    if line.strip() == "}":
      current = None
      continue
    inst = _parse_instruction(line)
    if inst:
      current.instructions[inst.name] = inst
      if inst.root:
        current.root = inst.name
  return comps, header


def _operand_name(operand: str) -> str:
  """`%x`, or `f32[8]{0} %x` as older printers write it, to `x`."""
  return operand.split()[-1].lstrip("%")


def _operand_bytes(comp: _Computation, operand: str) -> int:
  if " " in operand.strip():  # The printer wrote the operand's shape inline.
    return shape_bytes(operand.rsplit(" ", 1)[0])
  inst = comp.instructions.get(_operand_name(operand))
  return shape_bytes(inst.shape) if inst else 0


def _callees(inst: _Instruction, names: Iterable[str]) -> list[tuple[str, str]]:
  """(attribute, computation) pairs `inst` calls."""
  if inst.opcode in _ASYNC_TAIL:
    return []
  attrs = _QUOTED.sub('""', inst.attrs)  # Metadata strings may hold anything.
  found = [(k, v) for k, v in _CALLED_ONE.findall(attrs)]
  for k, many in _CALLED_MANY.findall(attrs):
    found += [(k, v.strip().lstrip("%")) for v in many.split(",") if v.strip()]
  return [(k, v) for k, v in found if v in names]


# -- Loop trip counts ---------------------------------------------------------

def _through(comp: _Computation, name: str) -> _Instruction | None:
  """The instruction `name` is, past copies and bitcasts."""
  inst = comp.instructions.get(name)
  for _ in range(64):
    if inst is None or inst.opcode not in _PASS_THROUGH or not inst.operands:
      return inst
    inst = comp.instructions.get(_operand_name(inst.operands[0]))
  return inst


def _int_constant(comp: _Computation, name: str) -> int | None:
  inst = _through(comp, name)
  if inst is None or inst.opcode != "constant" or not inst.operands:
    return None
  try:
    return int(inst.operands[0])
  except ValueError:
    return None


def _tuple_index(comp: _Computation, name: str) -> int | None:
  """k when `name` is element k of the computation's (loop-tuple) parameter."""
  inst = _through(comp, name)
  if inst is None or inst.opcode != "get-tuple-element" or not inst.operands:
    return None
  src = _through(comp, _operand_name(inst.operands[0]))
  m = _INDEX.search(inst.attrs)
  return int(m.group(1)) if m and src is not None and src.opcode == "parameter" else None


def _init_value(caller: _Computation, loop: _Instruction, k: int) -> int | None:
  """Element k of the tuple the loop starts from, when a constant."""
  if not loop.operands:
    return None
  init = _through(caller, _operand_name(loop.operands[0]))
  if init is None or init.opcode != "tuple" or k >= len(init.operands):
    return None
  return _int_constant(caller, _operand_name(init.operands[k]))


def _step(body: _Computation, k: int) -> int | None:
  """What the body adds to element k of the loop tuple each iteration (0: unchanged)."""
  root = body.instructions.get(body.root or "")
  if root is None or root.opcode != "tuple" or k >= len(root.operands):
    return None
  new = _operand_name(root.operands[k])
  if _tuple_index(body, new) == k:
    return 0
  inst = _through(body, new)
  if inst is None or inst.opcode not in ("add", "subtract") or len(inst.operands) != 2:
    return None
  a, b = (_operand_name(o) for o in inst.operands)
  if _tuple_index(body, a) == k and (c := _int_constant(body, b)) is not None:
    return c if inst.opcode == "add" else -c
  if inst.opcode == "add" and _tuple_index(body, b) == k and (
      c := _int_constant(body, a)) is not None:
    return c
  return None


_FLIPPED = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def _iterations(init: int, step: int, bound: int, direction: str) -> int | None:
  """Iterations of `for (i = init; i <direction> bound; i += step)`."""
  if step > 0 and direction in ("LT", "LE", "NE"):
    end = bound + (1 if direction == "LE" else 0)
    if direction == "NE" and (bound - init) % step:
      return None
    return max(0, -(-(end - init) // step))
  if step < 0 and direction in ("GT", "GE", "NE"):
    end = bound - (1 if direction == "GE" else 0)
    if direction == "NE" and (init - bound) % -step:
      return None
    return max(0, -(-(init - end) // -step))
  return None


def _trip_count(comps: dict[str, _Computation], caller: _Computation,
               loop: _Instruction) -> int | None:
  """How many times the while loop `loop` (in `caller`) runs its body, if known.

  The compiler's `known_trip_count` when it wrote one; else read off the
  loop: a condition `counter <dir> bound`, the counter's start in the
  caller's initial tuple and its constant step in the body. None otherwise.
  """
  m = _TRIP_COUNT.search(loop.attrs)
  if m:
    return int(m.group(1))
  called = dict(_callees(loop, comps))
  cond, body = comps.get(called.get("condition", "")), comps.get(called.get("body", ""))
  if cond is None or body is None:
    return None
  cmp = _through(cond, cond.root or "")
  direction = _DIRECTION.search(cmp.attrs) if cmp is not None else None
  if cmp is None or cmp.opcode != "compare" or len(cmp.operands) != 2 or not direction:
    return None

  def side(operand: str) -> tuple[int | None, int | None]:
    """(start value, step) of one side of the comparison."""
    name = _operand_name(operand)
    c = _int_constant(cond, name)
    if c is not None:
      return c, 0
    k = _tuple_index(cond, name)
    if k is None:
      return None, None
    return _init_value(caller, loop, k), _step(body, k)

  (a0, a_step), (b0, b_step) = side(cmp.operands[0]), side(cmp.operands[1])
  d = direction.group(1)
  if b_step == 0 and a_step:
    counter, step, bound = a0, a_step, b0
  elif a_step == 0 and b_step:
    counter, step, bound, d = b0, b_step, a0, _FLIPPED[d]
  else:
    return None
  if bound is None or counter is None:
    return None
  return _iterations(counter, step, bound, d)


# -- Call graph ---------------------------------------------------------------

def _multipliers(comps: dict[str, _Computation]) -> dict[str, int]:
  """Times each computation runs per execution of ENTRY."""
  edges: dict[str, list[tuple[str, int]]] = {name: [] for name in comps}  # callee -> (caller, factor)
  for comp in comps.values():
    for inst in comp.instructions.values():
      called = _callees(inst, comps)
      if not called:
        continue
      trips = None
      if inst.opcode == "while":
        trips = _trip_count(comps, comp, inst)
        trips = 1 if trips is None else trips  # Unknown: counted once, as XLA would.
      for attr, callee in called:
        factor = 1
        if inst.opcode == "while":
          factor = trips if attr == "body" else trips + 1
        edges[callee].append((comp.name, factor))
  roots = [n for n, c in comps.items() if c.entry] or [n for n, e in edges.items() if not e]
  memo: dict[str, int] = {}

  def runs(name: str, seen: frozenset[str]) -> int:
    if name in memo:
      return memo[name]
    if name in roots:
      total = 1
    else:
      total = sum(runs(caller, seen | {name}) * factor
                  for caller, factor in edges[name] if caller not in seen)
    memo[name] = total
    return total

  return {name: runs(name, frozenset()) for name in comps}


# -- Collectives --------------------------------------------------------------

def _kind(opcode: str) -> str | None:
  if opcode in KINDS:
    return opcode
  if opcode.endswith("-start") and opcode[:-len("-start")] in KINDS:
    return opcode[:-len("-start")]
  return None


def _group_size(inst: _Instruction, kind: str, devices: int) -> int:
  """Devices in one replica group of `inst`."""
  if kind == "collective-permute" or _SOURCE_TARGET.search(inst.attrs):
    return 2  # Pairs: each device sends its operand to one other.
  attrs = _QUOTED.sub('""', inst.attrs)
  m = _GROUPS_MESH.search(attrs)
  if m:
    sizes = {}
    for axis in _split_top(m.group(1)):
      if "=" in axis:
        axis_name, size = axis.rsplit("=", 1)
        sizes[axis_name.strip().strip("'\"")] = int(size)
    n = 1
    for ref in _split_top(m.group(2)):
      sub = re.match(r"(.*?):\((\d+)\)(\d+)$", ref)  # `'x':(pre_size)size`: part of an axis.
      if sub:
        n *= int(sub.group(3))
      else:
        n *= sizes.get(ref.strip().strip("'\""), 1)
    return n
  m = _GROUPS_IOTA.search(attrs)
  if m:
    return int(m.group(1).split(",")[-1])
  m = _GROUPS_LIST.search(attrs)
  if m:
    groups = re.findall(r"\{([^{}]*)\}", m.group(1))
    if groups and groups[0].strip():
      return len(groups[0].split(","))
    return devices  # `replica_groups={}`: one group of every device.
  if "replica_groups=" not in attrs:
    return devices  # No groups printed: every device, as with `{}`.
  return 1


def _start_result(inst: _Instruction, done: _Instruction | None) -> int:
  """Bytes of an async *-start's real result (`done`: its -done, if found)."""
  if done is not None:  # The -done returns exactly the result.
    return shape_bytes(done.shape)
  if not inst.shape.startswith("("):  # all-reduce-start returns its result alone.
    return shape_bytes(inst.shape)
  elements = _split_top(inst.shape[1:_closing(inst.shape, 0)])
  # (operand(s), result(s), u32[] contexts...): drop the scalar contexts, keep the second half.
  arrays = [e for e in elements if shape_bytes(e) and not re.fullmatch(r"[us]32\[\]\S*", e)]
  half = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
  return sum(shape_bytes(e) for e in half)


def _async_tail(comp: _Computation) -> bool:
  """Whether `comp` is a fusion ending an async collective begun elsewhere."""
  root = comp.instructions.get(comp.root or "")
  if root is None or root.opcode != "custom-call":
    return False
  m = _TARGET.search(root.attrs)
  return bool(m and m.group(1).startswith("AsyncCollective") and
              m.group(1) != "AsyncCollectiveStart")


def _scattered(comp: _Computation, inst: _Instruction) -> int | None:
  """Result bytes of the reduce-scatter that the all-reduce `inst` is part of, if any.

  The TPU compiler writes a reduce-scatter as a fusion (emitter
  SingleInputAllReduceScatterFusion) computing an all-reduce, then a dynamic
  slice of its result (of each result, for a combined all-reduce: the root
  is a tuple of slices); it runs as one reduce-scatter, so counts as one.
  """
  root = _through(comp, comp.root or "")
  if root is None:
    return None
  parts = ([_through(comp, _operand_name(o)) for o in root.operands]
           if root.opcode == "tuple" else [root])
  total = 0
  for part in parts:
    if part is None or part.opcode != "dynamic-slice" or not part.operands:
      return None
    src = _through(comp, _operand_name(part.operands[0]))
    if src is not None and src.opcode == "get-tuple-element" and src.operands:
      src = _through(comp, _operand_name(src.operands[0]))
    if src is not inst:
      return None
    total += shape_bytes(part.shape)
  return total if parts else None


def parse(hlo_text: str) -> list[Collective]:
  """Every collective op in `hlo_text` (an optimized HLO module, as
  `compiled.as_text()` prints it), in the order of the text.

  Async pairs count once, at the -start; the copies of one op that the TPU
  compiler's async collective fusions hold (same channel_id, fusions called
  from one computation) count once; an all-reduce fused with the dynamic
  slice of its result counts as the reduce-scatter it is.
  """
  comps, header = _parse_module(hlo_text)
  devices = header.get("num_partitions", 1) * header.get("replica_count", 1)
  runs = _multipliers(comps)
  fusion_caller = {}  # Fused computation -> the computation whose fusion calls it.
  for comp in comps.values():
    for inst in comp.instructions.values():
      if inst.opcode == "fusion":
        for _, callee in _callees(inst, comps):
          fusion_caller[callee] = comp.name
  found, seen_channels = [], set()
  for comp in comps.values():
    if _async_tail(comp):
      continue
    dones = {_operand_name(i.operands[0]): i for i in comp.instructions.values()
             if i.opcode.endswith("-done") and i.operands}
    for inst in comp.instructions.values():
      kind = _kind(inst.opcode)
      if kind is None:
        continue
      result = (_start_result(inst, dones.get(inst.name)) if inst.opcode.endswith("-start")
                else shape_bytes(inst.shape))
      if kind == "all-reduce" and comp.name in fusion_caller:
        sliced = _scattered(comp, inst)
        if sliced is not None:
          kind, result = "reduce-scatter", sliced
      channel = _CHANNEL.search(inst.attrs)
      if channel and comp.name in fusion_caller:
        key = (kind, channel.group(1), fusion_caller[comp.name])
        if key in seen_channels:
          continue
        seen_channels.add(key)
      operands = inst.operands
      if kind == "collective-permute" and "slice_sizes=" in inst.attrs:
        operands = operands[:1]  # In-place form: (input, output buffer, offsets...).
      found.append(Collective(
          kind=kind, result_bytes=result,
          operand_bytes=sum(_operand_bytes(comp, o) for o in operands),
          group_size=max(1, _group_size(inst, kind, devices)),
          executions=runs.get(comp.name, 0), computation=comp.name))
  return found


def bytes_sent(c: Collective) -> int:
  """Bytes one device sends for `c` per step, as a ring algorithm moves them."""
  n = c.group_size
  if c.kind == "collective-permute":
    return c.operand_bytes * c.executions
  if n <= 1:
    return 0
  size = {"all-gather": c.result_bytes, "reduce-scatter": c.operand_bytes,
          "all-reduce": 2 * c.result_bytes, "all-to-all": c.operand_bytes}[c.kind]
  return size * (n - 1) * c.executions // n


def summary(collectives: list[Collective]) -> dict[str, dict[str, int]]:
  """{kind: {"count": ops executed per step (executions summed), "bytes": bytes
  each device sends per step}} for every kind in KINDS (zeros included).

  Bytes are ring-algorithm traffic over a group of n devices: all-gather
  result (n-1)/n, reduce-scatter operand (n-1)/n, all-reduce 2 size (n-1)/n,
  all-to-all size (n-1)/n, collective-permute its operand; each times its
  executions.
  """
  out = {k: {"count": 0, "bytes": 0} for k in KINDS}
  for c in collectives:
    out[c.kind]["count"] += c.executions
    out[c.kind]["bytes"] += bytes_sent(c)
  return out
