"""collectives.py: each rule pinned on hand-written HLO, then a real TPU compile.

The snippets copy the shapes of what the TPU compiler prints (libtpu 0.0.52):
loops without `known_trip_count`, mesh-form replica groups, async
collective-permutes, v5e's async collective fusions and the
all-reduce-scatter fusion that stands for a reduce-scatter.
"""


import pytest

from jaxft.aot import collectives
from jaxft.aot import topology


ADD = """
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}
"""


def _one(hlo: str, kind: str | None = None) -> collectives.Collective:
  found = [c for c in collectives.parse(hlo) if kind is None or c.kind == kind]
  assert len(found) == 1, found
  return found[0]


# -- Shapes ---------------------------------------------------------------------

@pytest.mark.parametrize("shape, size", [
    ("f32[]", 4),
    ("bf16[4,1024]{1,0:T(8,128)(2,1)}", 8192),  # Tiling is layout, not size.
    ("(f32[8], bf16[2,3])", 44),
    ("(s32[]{:T(128)}, bf16[8,256]{1,0:T(8,128)(2,1)S(1)}, /*index=2*/pred[3])", 4 + 4096 + 3),
    ("((f32[8,128]{1,0}), f32[64,128]{1,0})", 4096 + 32768),
    ("f8e4m3fn[10]", 10), ("u8[10]", 10), ("s16[3]", 6), ("u32[2]", 8), ("f64[2]", 16),
    ("c64[2]", 16), ("c128[2]", 32), ("s4[3]", 2), ("token[]", 0),
    ("s32[<=8,2]", 64),  # A bounded dynamic dimension counts at its bound.
    ("f32[?,2]", 8),  # An unbounded one cannot be sized.
])
def test_shape_bytes(shape, size):
  assert collectives.shape_bytes(shape) == size


# -- Trip counts ----------------------------------------------------------------

NESTED = ADD + """
%shared (x: bf16[4,256]) -> bf16[32,256] {
  %x = bf16[4,256]{1,0} parameter(0)
  ROOT %ag.shared = bf16[32,256]{1,0} all-gather(%x), channel_id=9, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
}

%inner_cond (p: (s32[], bf16[4,256])) -> pred[] {
  %p = (s32[], bf16[4,256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner_body (p: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[4,256]{1,0} get-tuple-element(%p), index=1
  %ag.inner = bf16[32,256]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(step)/while/body=%shared"}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[4,256]{1,0}) tuple(%next, %x)
}

%outer_cond (p: (s32[], bf16[4,256])) -> pred[] {
  %p = (s32[], bf16[4,256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (p: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[4,256]{1,0} get-tuple-element(%p), index=1
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,256]{1,0}) tuple(%zero, %x)
  %loop = (s32[], bf16[4,256]{1,0}) while(%init), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"4"}}
  %call = bf16[32,256]{1,0} call(%x), to_apply=%shared
  %f = f32[] constant(0)
  %ar.outer = f32[] all-reduce(%f), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[4,256]{1,0}) tuple(%next, %x)
}

ENTRY %main (x: bf16[4,256]) -> bf16[32,256] {
  %x = bf16[4,256]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,256]{1,0}) tuple(%zero, %x)
  %loop = (s32[], bf16[4,256]{1,0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %call = bf16[32,256]{1,0} call(%x), to_apply=%shared
}
"""


def test_trip_counts_multiply_through_nested_loops_and_paths_add():
  by_name = {c.computation: c for c in collectives.parse(NESTED)}
  assert by_name["inner_body"].executions == 3 * 4
  assert by_name["outer_body"].executions == 3
  # %shared is called from ENTRY once and from the outer body 3 times (and
  # not from the inner body, whose metadata string only mentions it).
  assert by_name["shared"].executions == 1 + 3
  assert len(collectives.parse(NESTED)) == 3
  s = collectives.summary(collectives.parse(NESTED))
  assert s["all-gather"]["count"] == 12 + 4


def _tpu_loop(cond_root: str, init: str, update: str, extra_cond: str = "",
              bound_init: str = "%c9") -> str:
  """A while loop as the TPU compiler prints it: no known_trip_count."""
  return f"""
%cond (p: (s32[], bf16[4,256], s32[])) -> pred[] {{
  %p = (s32[]{{:T(128)}}, bf16[4,256]{{1,0}}, s32[]{{:T(128)}}) parameter(0)
  %i = s32[]{{:T(128)}} get-tuple-element(%p), index=0
  %bound = s32[]{{:T(128)}} get-tuple-element(%p), index=2{extra_cond}
  ROOT %cmp = pred[]{{:T(512)}} {cond_root}
}}

%body (p: (s32[], bf16[4,256], s32[])) -> (s32[], bf16[4,256], s32[]) {{
  %p = (s32[]{{:T(128)}}, bf16[4,256]{{1,0}}, /*index=2*/s32[]{{:T(128)}}) parameter(0)
  %i = s32[]{{:T(128)}} get-tuple-element(%p), index=0
  %x = bf16[4,256]{{1,0}} get-tuple-element(%p), index=1
  %bound = s32[]{{:T(128)}} get-tuple-element(%p), index=2
  %ag = bf16[32,256]{{1,0:T(8,128)(2,1)}} all-gather(%x), channel_id=8, replica_groups=mesh['axis_0'=8] {{'axis_0'}}, dimensions={{0}}, use_global_device_ids=true
  %step = s32[]{{:T(128)}} constant({update.split()[-1]})
  %next = s32[]{{:T(128)}} {update.split()[0]}(%i, %step)
  ROOT %t = (s32[]{{:T(128)}}, bf16[4,256]{{1,0}}, s32[]{{:T(128)}}) tuple(%next, %x, /*index=2*/%bound)
}}

ENTRY %main (x: bf16[4,256]) -> bf16[4,256] {{
  %x = bf16[4,256]{{1,0}} parameter(0)
  %c0 = s32[] constant({init})
  %c9 = s32[] constant(9)
  %copy.1 = s32[]{{:T(128)}} copy(%c0)
  %copy.2 = s32[]{{:T(128)}} copy(%copy.1)
  %tuple = (s32[]{{:T(128)}}, bf16[4,256]{{1,0}}, s32[]{{:T(128)}}) tuple(%copy.2, %x, {bound_init})
  %loop = (s32[]{{:T(128)}}, bf16[4,256]{{1,0}}, s32[]{{:T(128)}}) while(%tuple), condition=%cond, body=%body, metadata={{op_name="jit(step)/while"}}
  ROOT %out = bf16[4,256]{{1,0}} get-tuple-element(%loop), index=1
}}
"""


@pytest.mark.parametrize("cond_root, init, update, extra, trips", [
    # The TPU form: counter from 0 by 1, below a constant.
    ("compare(%i, %n), direction=LT", 0, "add 1", "\n  %n = s32[] constant(32)", 32),
    # The constant on the left, a start and a step other than 0 and 1.
    ("compare(%n, %i), direction=GT", 2, "add 3", "\n  %n = s32[] constant(12)", 4),
    ("compare(%i, %n), direction=LE", 1, "add 1", "\n  %n = s32[] constant(5)", 5),
    # Counting down.
    ("compare(%i, %n), direction=GT", 10, "subtract 2", "\n  %n = s32[] constant(0)", 5),
    # The bound is a loop-invariant element of the loop tuple, set to 9 by the caller.
    ("compare(%i, %bound), direction=LT", 0, "add 1", "", 9),
    # A loop that never runs its body.
    ("compare(%i, %n), direction=LT", 7, "add 1", "\n  %n = s32[] constant(3)", 0),
])
def test_trip_count_read_off_the_loop_without_known_trip_count(cond_root, init, update,
                                                                extra, trips):
  hlo = _tpu_loop(cond_root, init, update, extra)
  gather = _one(hlo)
  assert gather.executions == trips and gather.computation == "body"


def test_a_loop_whose_count_cannot_be_read_counts_once():
  # The bound is a parameter of the caller, not a constant.
  hlo = _tpu_loop("compare(%i, %bound), direction=LT", 0, "add 1",
                  bound_init="%x0").replace(
                      "%c9 = s32[] constant(9)", "%x0 = s32[] parameter(1)")
  assert _one(hlo).executions == 1


def test_known_trip_count_wins_over_the_condition():
  hlo = _tpu_loop("compare(%i, %n), direction=LT", 0, "add 1", "\n  %n = s32[] constant(32)")
  hlo = hlo.replace('metadata={op_name="jit(step)/while"}',
                    'backend_config={"known_induction_variable":{"tuple_index":"0"},'
                    '"known_trip_count":{"n":"16"}}')
  assert _one(hlo).executions == 16


# -- Async ops ------------------------------------------------------------------

ASYNC = ADD + """
%wrapped_rs (x: f32[64,128]) -> f32[8,128] {
  %x = f32[64,128]{1,0} parameter(0)
  ROOT %rs = f32[8,128]{1,0} reduce-scatter(%x), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
}

ENTRY %main (p0: f32[8,128], big: f32[64,128]) -> f32[8,128] {
  %p0 = f32[8,128]{1,0:T(8,128)} parameter(0)
  %big = f32[64,128]{1,0} parameter(1)
  %collective-permute-start = (f32[8,128]{1,0:T(8,128)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%p0), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
  %collective-permute-done = f32[8,128]{1,0:T(8,128)} collective-permute-done(%collective-permute-start)
  %all-gather-start = ((f32[8,128]{1,0}), f32[64,128]{1,0}) all-gather-start(%p0), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %all-gather-done = f32[64,128]{1,0} all-gather-done(%all-gather-start)
  %all-reduce-start = f32[8,128]{1,0} all-reduce-start(%p0), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %all-reduce-done = f32[8,128]{1,0} all-reduce-done(%all-reduce-start)
  %rs-start = ((f32[64,128]{1,0}), f32[8,128]{1,0}, s32[]) async-start(%big), calls=%wrapped_rs
  %rs-done = f32[8,128]{1,0} async-done(%rs-start), calls=%wrapped_rs
  ROOT %out = f32[8,128]{1,0} add(%collective-permute-done, %all-reduce-done)
}
"""


def test_async_pairs_count_once_with_their_real_result():
  found = {c.kind: c for c in collectives.parse(ASYNC)}
  assert sorted(found) == ["all-gather", "all-reduce", "collective-permute", "reduce-scatter"]
  assert len(collectives.parse(ASYNC)) == 4  # No -done, no second visit through async-done.
  cp = found["collective-permute"]
  assert (cp.result_bytes, cp.operand_bytes, cp.group_size) == (4096, 4096, 2)
  ag = found["all-gather"]
  assert (ag.result_bytes, ag.operand_bytes, ag.group_size) == (32768, 4096, 8)
  ar = found["all-reduce"]
  assert (ar.result_bytes, ar.operand_bytes, ar.group_size) == (4096, 4096, 2)
  rs = found["reduce-scatter"]
  assert (rs.result_bytes, rs.operand_bytes, rs.group_size, rs.computation) == (
      4096, 32768, 8, "wrapped_rs")
  assert all(c.executions == 1 for c in found.values())


def test_start_without_its_done_takes_the_result_from_the_tuple():
  hlo = ASYNC.replace("%collective-permute-done = f32[8,128]{1,0:T(8,128)} "
                      "collective-permute-done(%collective-permute-start)\n", "")
  hlo = hlo.replace("%all-gather-done = f32[64,128]{1,0} all-gather-done(%all-gather-start)\n", "")
  found = {c.kind: c for c in collectives.parse(hlo)}
  assert found["collective-permute"].result_bytes == 4096
  assert found["all-gather"].result_bytes == 32768


# v5e: an all-gather overlapped with compute is three fusions holding copies
# of one op (channel_id 7): start, the compute it overlaps, done.
V5E_ASYNC_FUSION = """
%fused_computation.469 (param_0.1584: bf16[2,64,32]) -> (bf16[2,64,32], bf16[2,64,256], s32[2], u32[]) {
  %param_0.1584 = bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-gather.128 = bf16[2,64,256]{1,2,0:T(8,128)(2,1)} all-gather(%param_0.1584), channel_id=7, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={2}, use_global_device_ids=true, backend_config={"async_collective_fusion_config":{"flag_start":"-1","flag_end":"-1"}}
  ROOT %custom-call.46 = (bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)}, bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)}, s32[2]{0:S(4)}, u32[]{:S(2)}) custom-call(%all-gather.128), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.512 (param_0.1588: bf16[2,64,32], param_1.1739: bf16[2,64,256], param_2.1358: s32[2], param_3.1029: u32[]) -> (bf16[2,64,32], bf16[2,64,256], s32[2], u32[]) {
  %param_0.1588 = bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)} parameter(0)
  %param_1.1739 = bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)} parameter(1)
  %param_2.1358 = s32[2]{0:S(4)} parameter(2)
  %param_3.1029 = u32[]{:S(2)} parameter(3)
  %all-gather.130 = bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)} all-gather(%param_0.1588), channel_id=7, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={2}, use_global_device_ids=true
  ROOT %tuple.253 = (bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)}, bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)}, s32[2]{0:S(4)}, u32[]{:S(2)}) tuple(%param_0.1588, %all-gather.130, %param_2.1358, %param_3.1029)
}

%fused_computation.471 (param_0.1590: bf16[2,64,32], param_1.1741: bf16[2,64,256], param_2.1360: s32[2], param_3.1031: u32[]) -> bf16[2,64,256] {
  %param_0.1590 = bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)} parameter(0)
  %param_1.1741 = bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)} parameter(1)
  %all-gather.132 = bf16[2,64,256]{1,2,0:T(8,128)(2,1)} all-gather(%param_0.1590), channel_id=7, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={2}, use_global_device_ids=true
  %param_2.1360 = s32[2]{0:S(4)} parameter(2)
  %param_3.1031 = u32[]{:S(2)} parameter(3)
  ROOT %custom-call.48 = bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)} custom-call(%param_0.1590, %param_1.1741, %all-gather.132, %param_2.1360, %param_3.1031), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (p: bf16[2,64,32]) -> bf16[2,64,256] {
  %p = bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)} parameter(0)
  %async-collective-start = (bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)}, bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)}, s32[2]{0:S(4)}, u32[]{:S(2)}) fusion(%p), kind=kCustom, calls=%fused_computation.469
  %g0 = bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)} get-tuple-element(%async-collective-start), index=0
  %g1 = bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)} get-tuple-element(%async-collective-start), index=1
  %g2 = s32[2]{0:S(4)} get-tuple-element(%async-collective-start), index=2
  %g3 = u32[]{:S(2)} get-tuple-element(%async-collective-start), index=3
  %fusion.512 = (bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)}, bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)}, s32[2]{0:S(4)}, u32[]{:S(2)}) fusion(%g0, %g1, %g2, %g3), kind=kOutput, calls=%async_collective_fusion.512
  %h0 = bf16[2,64,32]{1,2,0:T(8,128)(2,1)S(1)} get-tuple-element(%fusion.512), index=0
  %h1 = bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)} get-tuple-element(%fusion.512), index=1
  %h2 = s32[2]{0:S(4)} get-tuple-element(%fusion.512), index=2
  %h3 = u32[]{:S(2)} get-tuple-element(%fusion.512), index=3
  ROOT %async-collective-done = bf16[2,64,256]{1,2,0:T(8,128)(2,1)S(1)} fusion(%h0, %h1, %h2, %h3), kind=kCustom, calls=%fused_computation.471
}
"""


def test_async_collective_fusions_count_their_all_gather_once():
  gather = _one(V5E_ASYNC_FUSION)
  assert gather.kind == "all-gather" and gather.executions == 1
  assert (gather.result_bytes, gather.operand_bytes, gather.group_size) == (
      2 * 64 * 256 * 2, 2 * 64 * 32 * 2, 8)


# The TPU's reduce-scatter: a kCustom fusion of an all-reduce and a dynamic
# slice of its result (here combined: two arrays, a tuple of two slices).
ALL_REDUCE_SCATTER = ADD + """
%all-reduce-scatter.8.clone.1 (input_0.2: bf16[512,256], input_1.2: bf16[256,512]) -> (bf16[512,32], bf16[32,512]) {
  %input_0.2 = bf16[512,256]{0,1:T(8,128)(2,1)S(1)} parameter(0)
  %input_1.2 = bf16[256,512]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  %all-reduce.82 = (bf16[512,256]{0,1:T(8,128)(2,1)}, bf16[256,512]{1,0:T(8,128)(2,1)}) all-reduce(%input_0.2, %input_1.2), channel_id=27, replica_groups=mesh['axis_0'=8] {'axis_0'}, use_global_device_ids=true, to_apply=%add
  %get-tuple-element.3399 = bf16[512,256]{0,1:T(8,128)(2,1)} get-tuple-element(%all-reduce.82), index=0
  %constant.2034 = u32[] constant(0)
  %partition-id.37 = u32[] partition-id()
  %constant.2035 = u32[] constant(32)
  %multiply.215 = u32[]{:T(128)} multiply(%partition-id.37, %constant.2035)
  %dynamic-slice.511 = bf16[512,32]{0,1:T(8,128)(2,1)S(1)} dynamic-slice(%get-tuple-element.3399, %constant.2034, %multiply.215), dynamic_slice_sizes={512,32}
  %get-tuple-element.3400 = bf16[256,512]{1,0:T(8,128)(2,1)} get-tuple-element(%all-reduce.82), index=1
  %dynamic-slice.512 = bf16[32,512]{1,0:T(8,128)(2,1)S(1)} dynamic-slice(%get-tuple-element.3400, %multiply.215, %constant.2034), dynamic_slice_sizes={32,512}
  ROOT %tuple.236 = (bf16[512,32]{0,1:T(8,128)(2,1)S(1)}, bf16[32,512]{1,0:T(8,128)(2,1)S(1)}) tuple(%dynamic-slice.511, %dynamic-slice.512)
}

ENTRY %main (a: bf16[512,256], b: bf16[256,512]) -> (bf16[512,32], bf16[32,512]) {
  %a = bf16[512,256]{0,1:T(8,128)(2,1)S(1)} parameter(0)
  %b = bf16[256,512]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  ROOT %fusion.9 = (bf16[512,32]{0,1:T(8,128)(2,1)S(1)}, bf16[32,512]{1,0:T(8,128)(2,1)S(1)}) fusion(%a, %b), kind=kCustom, calls=%all-reduce-scatter.8.clone.1, backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion"}}
}
"""


def test_an_all_reduce_fused_with_a_slice_of_its_result_is_a_reduce_scatter():
  rs = _one(ALL_REDUCE_SCATTER)
  assert rs.kind == "reduce-scatter"
  assert (rs.operand_bytes, rs.result_bytes, rs.group_size) == (2 * 131072 * 2, 2 * 16384 * 2, 8)


def test_an_all_reduce_sliced_outside_its_fusion_stays_an_all_reduce():
  hlo = ADD + """
ENTRY %main (x: f32[1024,128]) -> f32[128,128] {
  %x = f32[1024,128]{1,0:T(8,128)} parameter(0)
  %all-reduce = f32[1024,128]{1,0:T(8,128)} all-reduce(%x), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %c = u32[] constant(0)
  ROOT %slice = f32[128,128]{1,0:T(8,128)} dynamic-slice(%all-reduce, %c, %c), dynamic_slice_sizes={128,128}
}
"""
  assert _one(hlo).kind == "all-reduce"


# -- Replica groups ---------------------------------------------------------------

@pytest.mark.parametrize("groups, size", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", 4),
    ("replica_groups={{0,4},{1,5},{2,6},{3,7}}", 2),
    ("replica_groups=[2,4]<=[8]", 4),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", 2),
    ("replica_groups=[1,8]<=[8]", 8),
    ("replica_groups=mesh['axis_0'=8] {'axis_0'}", 8),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 4),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}", 4),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
     "{'axis_0'}", 4),
    ("replica_groups=mesh['axis_0'=8] {'axis_0':(1)2}", 2),  # A sub-axis: 2 of the 8.
    ("replica_groups={}", 8),  # Every device of the module (num_partitions=8).
    ("replica_groups={{0}}", 1),
])
def test_group_size(groups, size):
  hlo = f"""HloModule jit_f, is_scheduled=true, num_partitions=8
{ADD}
ENTRY %main (x: f32[8,128]) -> f32[8,128] {{
  %x = f32[8,128]{{1,0}} parameter(0)
  ROOT %ar = f32[8,128]{{1,0}} all-reduce(%x), channel_id=1, {groups}, use_global_device_ids=true, to_apply=%add, metadata={{op_name="jit(f)/psum"}}
}}
"""
  assert _one(hlo).group_size == size


def test_tuple_all_reduce_and_inline_operand_shapes():
  hlo = ADD + """
ENTRY %main (a: bf16[256], b: f32[256,512]) -> (bf16[256], f32[256,512]) {
  %a = bf16[256]{0:T(256)(128)(2,1)} parameter(0)
  %b = f32[256,512]{1,0:T(8,128)} parameter(1)
  %ar = (bf16[256]{0:T(256)(128)(2,1)}, f32[256,512]{1,0:T(8,128)}) all-reduce(%a, %b), channel_id=80, replica_groups=mesh['axis_0'=8] {'axis_0'}, use_global_device_ids=true, to_apply=%add
  %ag = f32[1024,512]{1,0} all-gather(f32[256,512]{1,0} %b), channel_id=81, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t = (bf16[256], f32[256,512]) tuple(%ar, %b)
}
"""
  ar = _one(hlo, "all-reduce")
  assert ar.result_bytes == ar.operand_bytes == 512 + 256 * 512 * 4
  ag = _one(hlo, "all-gather")
  assert (ag.operand_bytes, ag.result_bytes, ag.group_size) == (256 * 512 * 4, 1024 * 512 * 4, 4)


def test_all_to_all_is_found_by_opcode_not_name():
  hlo = """
ENTRY %main (x: f32[8,8,128]) -> f32[8,8,128] {
  %x = f32[8,8,128]{2,1,0:T(8,128)} parameter(0)
  ROOT %all_to_all.9 = f32[8,8,128]{2,1,0:T(8,128)} all-to-all(%x), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}
"""
  a2a = _one(hlo)
  assert (a2a.kind, a2a.operand_bytes, a2a.group_size) == ("all-to-all", 32768, 8)


# -- Summary ------------------------------------------------------------------------

def test_summary_is_ring_traffic_times_executions():
  c = collectives.Collective
  found = [
      c("all-gather", result_bytes=800, operand_bytes=100, group_size=8, executions=2,
        computation="body"),
      c("reduce-scatter", result_bytes=200, operand_bytes=800, group_size=4, executions=1,
        computation="main"),
      c("all-reduce", result_bytes=100, operand_bytes=100, group_size=4, executions=3,
        computation="body"),
      c("all-reduce", result_bytes=100, operand_bytes=100, group_size=1, executions=1,
        computation="main"),  # A group of one moves nothing.
      c("all-to-all", result_bytes=64, operand_bytes=64, group_size=2, executions=1,
        computation="main"),
      c("collective-permute", result_bytes=10, operand_bytes=10, group_size=2, executions=5,
        computation="body"),
  ]
  assert collectives.summary(found) == {
      "all-gather": {"count": 2, "bytes": 800 * 7 // 8 * 2},
      "reduce-scatter": {"count": 1, "bytes": 800 * 3 // 4},
      "all-reduce": {"count": 4, "bytes": 2 * 100 * 3 // 4 * 3},
      "all-to-all": {"count": 1, "bytes": 32},
      "collective-permute": {"count": 5, "bytes": 50},
  }
  assert collectives.summary([]) == {k: {"count": 0, "bytes": 0} for k in collectives.KINDS}


def test_summary_of_the_async_module():
  s = collectives.summary(collectives.parse(ASYNC))
  assert s == {
      "all-gather": {"count": 1, "bytes": 32768 * 7 // 8},
      "reduce-scatter": {"count": 1, "bytes": 32768 * 7 // 8},
      "all-reduce": {"count": 1, "bytes": 2 * 4096 // 2},
      "all-to-all": {"count": 0, "bytes": 0},
      "collective-permute": {"count": 1, "bytes": 4096},
  }


# -- A real TPU compile ---------------------------------------------------------------

def test_scanned_fsdp_step_for_v5p_gathers_each_layer_once_per_layer():
  """The TPU compiler's own text: an fsdp step scanning `layers` layers over 8
  v5p chips all-gathers one layer's weight per iteration (in the forward
  loop, and again in the backward one), and reduces its gradient there."""
  pytest.importorskip("libtpu")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  layers, d, batch, n = 5, 256, 16, 8
  mesh = jax.sharding.Mesh(np.array(topology.parse("v5p-16").devices()).reshape(n), ("fsdp",))

  def loss(w, x):
    h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
    return jnp.mean(h.astype(jnp.float32) ** 2)

  def step(w, x):
    value, grad = jax.value_and_grad(loss)(w, x)
    return value, w - 0.1 * grad

  w_spec = NamedSharding(mesh, P(None, "fsdp", None))  # Each chip holds d/8 rows of every layer.
  x_spec = NamedSharding(mesh, P("fsdp", None))
  lowered = jax.jit(step, in_shardings=(w_spec, x_spec),
                    out_shardings=(NamedSharding(mesh, P()), w_spec)).lower(
                        jax.ShapeDtypeStruct((layers, d, d), jnp.bfloat16),
                        jax.ShapeDtypeStruct((batch, d), jnp.bfloat16))
  # Kept out of the session's persistent cache: an executable compiled for
  # devices this machine lacks cannot be read back (a warning on every rerun).
  with topology.persistent_cache_off():
    compiled = lowered.compile()
  found = collectives.parse(compiled.as_text())

  gathers = [c for c in found if c.kind == "all-gather"]
  layer_bytes = d * d * 2
  assert 1 <= len(gathers) <= 2  # The forward loop's and (unless kept) the backward loop's.
  for g in gathers:  # One layer's whole weight, gathered from its 8 shards, in the loop.
    assert (g.executions, g.group_size) == (layers, n)
    assert (g.result_bytes, g.operand_bytes) == (layer_bytes, layer_bytes // n)
  s = collectives.summary(found)
  assert s["all-gather"]["count"] == layers * len(gathers)
  assert s["all-gather"]["bytes"] == len(gathers) * layers * layer_bytes * (n - 1) // n
  # The weight gradient of every layer is reduced across the chips inside the backward loop.
  assert any(c.kind in ("reduce-scatter", "all-reduce") and c.executions == layers and
             c.operand_bytes == layer_bytes for c in found)
