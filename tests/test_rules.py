"""Optimizer rules: first match wins, typos fail loudly, layer decay and LoRA as rules."""

import pytest

from jaxft import config as config_lib
from jaxft.tuning import rules
from jaxft.errors import UserError

PATHS = [
    "embeddings/word_embeddings/embedding",
    "embeddings/LayerNorm/scale",
    "encoder/layer/0/attention/self/query/kernel",
    "encoder/layer/0/output/dense/bias",
    "encoder/layer/1/attention/self/query/kernel",
    "encoder/layer/1/attention/self/query/lora_a",
    "encoder/layer/1/attention/self/query/lora_b",
    "encoder/layer/1/output/dense/bias",
    "pooler/dense/kernel",
    "classifier/kernel",
    "classifier/bias",
]
HEAD = ("classifier",)


def _assign(rule_list, paths=PATHS, **optim):
  c = config_lib.base()
  c.optim.rules = tuple(rule_list)
  c.optim.update(optim)
  return rules.assign(rules.all_rules(c, paths, HEAD), paths)


def test_first_matching_rule_wins_when_rules_overlap():
  a = _assign([("encoder/layer/1/.*", 0.5), ("encoder/.*", None), (".*", 2.0)])
  assert a.rule("encoder/layer/1/output/dense/bias").lr_mult == 0.5
  assert not a.rule("encoder/layer/0/output/dense/bias").trainable
  assert a.rule("classifier/kernel").lr_mult == 2.0
  assert a.trainable() == {p for p in PATHS if not p.startswith("encoder/layer/0/")}


def test_dict_values_set_lr_weight_decay_schedule_and_start():
  a = _assign([("classifier/.*", dict(lr_mult=10.0, weight_decay=0.0, schedule="constant",
                                       start_step=5)), (".*", 1.0)])
  r = a.rule("classifier/bias")
  assert (r.lr_mult, r.weight_decay, r.schedule, r.start_step) == (10.0, 0.0, "constant", 5)


def test_a_rule_that_matches_nothing_is_an_error_naming_it():
  with pytest.raises(UserError, match=r"optim.rules\[0\]='embedings/\.\*' matches no parameter"):
    _assign([("embedings/.*", None), (".*", 1.0)])


def test_a_rule_shadowed_by_an_earlier_one_is_reported_as_such():
  with pytest.raises(UserError, match=r"already taken by optim.rules\[0\]"):
    _assign([(".*", 1.0), ("classifier/.*", 5.0)])


def test_a_parameter_no_rule_matches_is_an_error_naming_it():
  with pytest.raises(UserError, match="'pooler/dense/kernel' matches no rule"):
    _assign([("embeddings/.*", None), ("encoder/.*", 1.0), ("classifier/.*", 1.0)])


def test_rules_match_the_whole_path_not_a_substring():
  with pytest.raises(UserError, match="matches no parameter"):
    _assign([("classifier", 1.0), (".*", 1.0)])


@pytest.mark.parametrize("entry, message", [
    (("x", "fast"), "must be None"),
    (("x", {"lr": 1.0}), "unknown key 'lr'"),
    (("x", {"schedule": "triangle"}), "schedule must be one of"),
    (("x", -1.0), "lr_mult must be >= 0"),
    (("x", {"lr_mult": "fast"}), "lr_mult must be a number"),
    (("x", {"start_step": 1.5}), "start_step must be an integer"),
    (("(unclosed", 1.0), "is not a regex"),
    ("classifier", "must be a \\(regex, value\\) pair"),
])
def test_malformed_rules_fail_before_anything_loads(entry, message):
  c = config_lib.base()
  c.model.path, c.data.train = "m", "d.jsonl"
  c.optim.rules = (entry,)
  with pytest.raises(UserError, match=message):
    config_lib.validate(c)


def test_no_rules_train_everything_at_the_base_rate():
  a = _assign([])
  assert a.trainable() == set(PATHS)
  assert {a.rule(p).lr_mult for p in PATHS} == {1.0}


def test_layer_decay_gives_layer_i_decay_to_the_depth_minus_i():
  a = _assign([], layer_decay=0.5)
  mult = lambda p: a.rule(p).lr_mult
  # Two layers: layer 1 gets 0.5^1, layer 0 0.5^2, embeddings 0.5^3, the head 1.
  assert mult("encoder/layer/1/output/dense/bias") == 0.5
  assert mult("encoder/layer/0/attention/self/query/kernel") == 0.25
  assert mult("embeddings/word_embeddings/embedding") == 0.125
  assert mult("embeddings/LayerNorm/scale") == 0.125
  assert mult("classifier/kernel") == mult("pooler/dense/kernel") == 1.0
  assert {a.rule(p).origin for p in PATHS} == {"optim.layer_decay"}


def test_user_rules_take_precedence_over_layer_decay():
  a = _assign([("embeddings/.*", None)], layer_decay=0.5)
  assert not a.rule("embeddings/word_embeddings/embedding").trainable
  assert a.rule("encoder/layer/0/output/dense/bias").lr_mult == 0.25


def test_layer_decay_shadowed_by_a_catch_all_rule_is_an_error():
  with pytest.raises(UserError, match="layer_decay has no effect"):
    _assign([(".*", 1.0)], layer_decay=0.5)


def test_lora_trains_adapters_and_head_and_freezes_the_rest_by_default():
  c = config_lib.base()
  c.lora.rank = 4
  a = rules.assign(rules.all_rules(c, PATHS, HEAD), PATHS)
  assert a.trainable() == {"encoder/layer/1/attention/self/query/lora_a",
                           "encoder/layer/1/attention/self/query/lora_b",
                           "classifier/kernel", "classifier/bias"}


def test_lora_composes_with_user_rules():
  c = config_lib.base()
  c.lora.rank = 4
  c.optim.rules = (("pooler/.*", 0.1), ("classifier/.*", 1.0), (".*", None))
  a = rules.assign(rules.all_rules(c, PATHS, HEAD), PATHS)
  assert a.trainable() == {"encoder/layer/1/attention/self/query/lora_a",
                           "encoder/layer/1/attention/self/query/lora_b",
                           "pooler/dense/kernel", "classifier/kernel", "classifier/bias"}
  assert a.rule("pooler/dense/kernel").lr_mult == 0.1


def test_table_counts_params_and_trainable_params_per_rule():
  a = _assign([("embeddings/.*", None), (".*", 0.5)])
  sizes = dict.fromkeys(PATHS, 10)
  lines = rules.table(a, sizes, default_decay=0.01).splitlines()
  assert lines[1].split() == ["optim.rules[0]", "embeddings/.*", "20", "0", "frozen", "-"]
  assert lines[2].split() == ["optim.rules[1]", ".*", "90", "90", "0.5", "0.01"]
  assert lines[3].split() == ["total", "110", "90"]
