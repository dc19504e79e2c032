"""sample.py and probe.py rebuild a workdir's model with
``workdir.load_workdir``: from the flags in its config.json, but where the run recorded
what those flags resolved to (``"resolved"``) and this code resolves them to something
else (a default changed since), the recorded model and recipe win, with a warning."""

from __future__ import annotations

import json
import logging

import pytest

from unidiff import data as ud
from unidiff.train import loop, workdir
from unidiff.train.config import ConfigError, TrainConfig

BASE = dict(dataset="synthetic", image_size=8, model="N/2", batch_size=8, train_steps=2)


def _write(tmp_path, edit=None) -> TrainConfig:
    cfg = TrainConfig(workdir=str(tmp_path), **BASE)
    record = cfg.to_json()
    record["resolved"] = loop.resolved_record(
        *loop.resolve(cfg, ud.validate_data(cfg.dataset, cfg.data_dir, "train")))
    if edit:
        edit(record["resolved"])
    (tmp_path / "config.json").write_text(json.dumps(record))
    return cfg


def test_the_flags_build_what_the_run_recorded(tmp_path):
    _write(tmp_path)
    trained = workdir.load_workdir(str(tmp_path))
    assert loop.resolved_record(trained.model.config, trained.recipe) == \
        json.loads((tmp_path / "config.json").read_text())["resolved"]


def test_the_recorded_model_and_recipe_win_over_changed_defaults(tmp_path, caplog):
    def older_defaults(rec):
        rec["model"]["norm_eps"] = 1e-5
        rec["model"]["max_period"] = 1000.0
        rec["recipe"]["schedule"] = "linear"

    _write(tmp_path, older_defaults)
    with caplog.at_level(logging.WARNING, logger="unidiff"):
        trained = workdir.load_workdir(str(tmp_path))
    assert (trained.model.config.norm_eps, trained.model.config.max_period) == (1e-5, 1000.0)
    assert trained.recipe.schedule == "linear"
    # The sampler's schedule is the recorded one: linear betas start at 1e-4 (index 0 is t = 0).
    assert float(trained.schedule.betas[1]) == pytest.approx(1e-4, rel=1e-3)
    msg = caplog.text
    assert "flags now build another model" in msg and "max_period 10000.0 instead of 1000.0" in msg
    assert "flags now build another recipe" in msg and "schedule 'cosine' instead of 'linear'" in msg


def test_a_record_this_version_cannot_rebuild_is_named(tmp_path):
    _write(tmp_path, lambda rec: rec["recipe"].update(m_t=1.5))
    with pytest.raises(ConfigError, match=r"config.json: records a recipe that this version cannot rebuild"):
        workdir.load_workdir(str(tmp_path))


@pytest.mark.parametrize("resolved", [[], {"model": None, "recipe": None}, {"model": {}, "recipe": {}}])
def test_a_malformed_record_is_named(tmp_path, resolved):
    """Was a TypeError traceback, or the flags' model taken as the recorded one."""
    _write(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())
    record["resolved"] = resolved
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r'config.json: its "resolved" record '):
        workdir.load_workdir(str(tmp_path))
