"""The TPU path, compiled on this CPU: a tiny Llama (config.json only) for
v5litepod-8 and v5p-16 slices, through inspect, plan and the CLI, so it cannot rot."""

import json

import pytest
import transformers

from jaxft import defaults
from jaxft import inspect
from jaxft.aot import plan
from jaxft.aot import topology
from jaxft.errors import UserError
from tests.helpers import jaxft

pytest.importorskip("libtpu")

LAYERS = 4


@pytest.fixture(scope="module")
def config_only_llama(tmp_path_factory):
  """A folder holding a tiny Llama's config.json and nothing else: no weights, no tokenizer."""
  root = tmp_path_factory.mktemp("config_only")
  transformers.LlamaConfig(
      vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
      tie_word_embeddings=False).save_pretrained(root)
  assert sorted(p.name for p in root.iterdir()) == ["config.json"]
  return root


def _config(model_dir, **train):
  c = defaults.recipe("sft")
  c.model.path = str(model_dir)
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.data.max_length = 256
  c.train.update(batch_size=8, eval_batch_size=8)
  c.train.update(train)
  return c


def test_inspect_compiles_for_v5litepod_8_per_chip(config_only_llama):
  c = _config(config_only_llama)
  out = inspect.inspect(c, topology=topology.parse("v5litepod-8"))
  assert out["devices"] == 8 and out["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert out["topology"] == "v5litepod-8"
  assert out["hbm_bytes_per_device"] == 16 * topology.GiB
  assert out["fits"] is True and 0 < out["peak_memory_bytes"] < out["hbm_usable_bytes_per_device"]
  # fsdp over every chip: each holds an eighth of the parameters (within 5%).
  assert out["param_bytes_per_device"] == pytest.approx(out["param_bytes"] / 8, rel=0.05)
  assert out["optimizer_state_bytes_per_device"] == pytest.approx(
      out["optimizer_state_bytes"] / 8, rel=0.05)
  # The fsdp step gathers weights and reduce-scatters gradients.
  assert out["collectives"]["all-gather"]["count"] > 0
  assert out["collectives"]["reduce-scatter"]["count"] + \
      out["collectives"]["all-reduce"]["count"] > 0
  assert 0 < out["estimated_mfu"] <= 1


def test_lora_adapters_shard_over_fsdp_like_their_base(config_only_llama):
  """A rank-16 adapter cannot split its rank over 8 chips: its other dimension
  takes fsdp even where the base layer's name for it maps to tensor (MLP
  columns, heads), so no chip holds whole adapters."""
  c = _config(config_only_llama)
  c.lora.rank = 16
  c.lora.targets = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
  mesh = inspect.sharding.make_mesh(c, topology.parse("v5litepod-8").devices())
  state = inspect.abstract_state(c, inspect.Model.of(c).split, mesh)[0]
  adapters = state["params"]
  assert inspect.sharding.bytes_per_device(adapters) == pytest.approx(
      inspect.tree_bytes(adapters) / 8, rel=0.05)


def test_fsdp_gathers_one_layer_at_a_time_inside_the_scan(config_only_llama, tmp_path):
  """No all-gather outside the layer it serves: the biggest gather is one
  layer's weight (or the embedding), never a whole stacked [layers, ...] one."""
  from jaxft.aot import collectives  # pylint: disable=g-import-not-at-top
  c = _config(config_only_llama)
  model = inspect.Model.of(c)
  mesh = inspect.sharding.make_mesh(c, topology.parse("v5p-16").devices())
  compiled, state, _ = inspect.compile_step(c, model.split,
                                            model.task.abstract_batch(model.model_path),
                                            model.task, mesh, str(tmp_path))
  del compiled
  hlo = inspect.hlo_text(str(tmp_path))
  gathers = [g for g in collectives.parse(hlo) if g.kind == "all-gather"]
  assert gathers
  leaves = inspect.jax.tree_util.tree_leaves_with_path(state["params"])
  stacked = [x.size * 4 for path, x in leaves if x.ndim == 3]          # [layers, in, out]
  single = max(stacked) // LAYERS
  embed = max(x.size * 4 for path, x in leaves if x.ndim == 2)
  assert max(g.result_bytes for g in gathers) <= max(single, embed)
  assert max(stacked) > max(single, embed)  # so the check above would catch the whole stack
  # Gathers inside the scanned layer loop run once per layer.
  assert any(g.executions == LAYERS for g in gathers)


def test_multislice_puts_data_parallelism_across_slices(config_only_llama):
  c = _config(config_only_llama, eval_batch_size=16)
  c.train.batch_size = 16
  c.mesh.data = 2
  out = inspect.measure(c, inspect.Model.of(c), topology.parse("v5p-16", num_slices=2))
  assert out["devices"] == 16 and out["mesh"] == {"data": 2, "fsdp": 8, "tensor": 1}
  c.mesh.data = 1
  with pytest.raises(UserError, match="data must be a multiple of 2"):
    inspect.measure(c, inspect.Model.of(c), topology.parse("v5p-16", num_slices=2))


def test_plan_picks_a_fitting_candidate_and_its_overrides(config_only_llama, capsys):
  c = _config(config_only_llama)
  out = plan.plan(c, topology.parse("v5litepod-8"), max_compiles=2)
  printed = capsys.readouterr().out
  assert "est. MFU" in printed and "chosen: --config.mesh.data=" in printed
  # Full remat fits on the first mesh, then no remat does: the cheaper one wins.
  assert out["fits"] is True and out["compiles"] == 2
  assert "1x8x1 remat=full accum=1" in printed and "1x8x1 remat=none accum=1" in printed
  o = out["overrides"]
  assert o["mesh.data"] * o["mesh.fsdp"] * o["mesh.tensor"] == 8
  assert o["model.remat"] == "none" and o["train.grad_accum"] == 1


def test_plan_search_rules_out_a_mesh_whose_state_cannot_fit(config_only_llama, monkeypatch):
  """A slice too small for the parameters and optimizer state is skipped
  without compiling, and the verdict says by how much the best one is over."""
  monkeypatch.setattr(topology, "HEADROOM", 1 - 1e-6)  # ~17 KB usable of 16 GiB
  search = plan.Search(_config(config_only_llama), topology.parse("v5litepod-8"),
                       max_compiles=2, log=lambda _: None)
  rows = search.run()
  assert search.compiles == 0 and rows and all("state alone" in r.skipped for r in rows)


@pytest.fixture(scope="module")
def one_layer_llama(tmp_path_factory):
  root = tmp_path_factory.mktemp("one_layer")
  transformers.LlamaConfig(
      vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
      tie_word_embeddings=False).save_pretrained(root)
  return root


def test_splash_step_temporaries_grow_linearly_from_4k_to_16k_tokens(one_layer_llama):
  """The whole train step on TPU, one sequence per chip: with `auto` (the
  splash kernel on TPU) temporaries grow at most 4.5x for 4x the tokens;
  XLA's einsum attention (`jaxft`) grows with the square of the length."""
  def temp(attention, length):
    c = _config(one_layer_llama)
    c.data.max_length = length
    c.model.attention = attention
    return inspect.measure(c, inspect.Model.of(c), topology.parse("v5p-16"))[
        "temp_memory_bytes"]

  splash = temp("auto", 16384) / temp("auto", 4096)
  xla = temp("jaxft", 16384) / temp("jaxft", 4096)
  assert splash <= 4.5, splash
  assert xla > 10, xla


def test_compiler_hbm_oom_reads_the_temporaries_the_compiler_refused():
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the "
             "total memory required for HLO temporaries (29.75G) exceeds available HBM "
             "(15.75G). HLO module: jit_wrapped.")
  assert inspect.compiler_hbm_oom(message) == int(29.75 * topology.GiB)
  assert inspect.compiler_hbm_oom("INTERNAL: something else") is None


def test_plan_turns_a_refused_step_into_gradient_accumulation(one_layer_llama, capsys):
  """Full remat at 4 rows of 16k tokens per v5e chip (XLA attention: quadratic
  scores) is refused by the compiler for HBM; its count of temporaries
  predicts how many micro-batches fit, and that one compiles and fits."""
  c = _config(one_layer_llama)
  c.data.max_length = 16384
  c.model.attention = "jaxft"
  c.train.update(batch_size=32, eval_batch_size=32)
  out = plan.plan(c, topology.parse("v5litepod-8"), max_compiles=2)
  printed = capsys.readouterr().out
  assert "1x8x1 remat=full accum=1" in printed and "DOES NOT FIT" not in printed
  assert out["fits"] is True and out["compiles"] == 2
  assert out["overrides"]["train.grad_accum"] > 1


def test_verdict_says_by_how_much_a_step_does_not_fit():
  gib = topology.GiB
  line = inspect.verdict({"topology": "v5litepod-8", "peak_memory_bytes": 20 * gib,
                          "hbm_bytes_per_device": 16 * gib,
                          "hbm_usable_bytes_per_device": int(14.4 * gib), "headroom": 0.1,
                          "fits": False})
  assert line.startswith("DOES NOT FIT") and "5.6 GiB over" in line


def test_a_batch_that_cannot_split_over_the_slice_says_what_would(config_only_llama):
  c = _config(config_only_llama)  # 8 rows over v5p-128's 64 chips
  with pytest.raises(UserError, match="multiple of 64"):
    inspect.measure(c, inspect.Model.of(c), topology.parse("v5p-128"))


def test_cli_inspect_topology_prints_the_acceptance_keys(config_only_llama):
  out = jaxft("inspect", "--config=configs/sft.py", f"--config.model.path={config_only_llama}",
              "--topology=v5p-16", "--config.model.scan_layers=true",
              "--config.data.max_length=128", "--config.train.batch_size=8",
              "--config.train.eval_batch_size=4")  # The eval batch plays no part.
  assert out.returncode == 0, out.stderr
  figures = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ("devices", "mesh", "param_bytes", "param_bytes_per_device",
              "optimizer_state_bytes_per_device", "peak_memory_bytes", "topology",
              "hbm_bytes_per_device", "fits"):
    assert key in figures
  assert figures["devices"] == 8 and figures["hbm_bytes_per_device"] == 95 * topology.GiB
  assert "FITS  v5p-16" in out.stdout
