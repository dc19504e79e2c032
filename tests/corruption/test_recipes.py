"""Recipe validation, presets, branch naming, and the Haiku-free import."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unidiff
from unidiff import corruption as uc
from unidiff.corruption import recipes


def test_presets_hold_the_papers_values():
    r = recipes.umd()
    assert (r.name, r.r_t0, r.m_t0, r.m_t) == ("umd", 0.5, 0.75, 0.375)
    assert (r.schedule, r.num_steps) == ("cosine", 1000)
    assert (r.noisy_loss, r.clean_loss) == ("eps_x0", "x0_hidden")
    assert (r.norm_pix_loss, r.mdt_two_pass, r.label_dropout) == (False, False, 0.0)
    r = recipes.umd_finetune()
    assert (r.r_t0, r.m_t0, r.m_t, r.label_dropout) == (0.05, 0.75, 0.0, 0.1)
    r = recipes.mae()
    assert (r.r_t0, r.m_t0, r.norm_pix_loss) == (1.0, 0.75, False)
    assert recipes.mae(norm_pix_loss=True).norm_pix_loss
    r = recipes.dit()
    assert (r.r_t0, r.m_t, r.noisy_loss) == (0.0, 0.0, "eps_x0")
    r = recipes.maskdit()
    assert (r.r_t0, r.m_t, r.noisy_loss) == (0.0, 0.5, "eps_x0")
    r = recipes.mdt()
    assert (r.r_t0, r.m_t, r.noisy_loss, r.mdt_two_pass, r.schedule) == (0.0, 0.3, "eps_all", True, "linear")
    # DiT's class dropout (MaskDiT and MDT keep it): trains the null label that
    # classifier-free guidance needs when these recipes train class-conditionally.
    assert [recipes.get(n).label_dropout for n in ("dit", "maskdit", "mdt")] == [0.1] * 3
    r = recipes.usp()
    assert (r.r_t0, r.m_t0, r.norm_pix_loss, r.schedule) == (1.0, 0.75, True, "linear")
    for name in recipes.PRESETS:
        assert recipes.get(name).name == name
        assert recipes.get(name, num_steps=7).num_steps == 7


def test_get_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="valid names.*umd_finetune"):
        recipes.get("diffusion")


def test_unknown_override_is_a_value_error():
    with pytest.raises(ValueError, match="r_t1"):
        recipes.umd(r_t1=0.3)
    with pytest.raises(ValueError, match="mask_ratio"):
        recipes.umd().replace(mask_ratio=0.3)


@pytest.mark.parametrize(
    "field,value",
    [
        ("r_t0", -0.1),
        ("r_t0", 1.5),
        ("r_t0", float("nan")),
        ("r_t0", "0.5"),
        ("m_t0", 1.0),
        ("m_t0", -0.01),
        ("m_t", 1.0),
        ("m_t", 2.0),
        ("label_dropout", 1.0),
        ("num_steps", 0),
        ("num_steps", 10.0),
        ("schedule", "sigmoid"),
        ("noisy_loss", "x0_only"),
        ("clean_loss", "eps"),
        ("norm_pix_loss", 1),
        ("mdt_two_pass", "yes"),
        ("name", ""),
    ],
)
def test_recipe_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        recipes.umd(**{field: value})


def test_cross_field_rules_name_the_field():
    with pytest.raises(ValueError, match="m_t0"):
        recipes.umd(m_t0=0.0)  # clean branch would have no hidden token to train on
    recipes.dit(m_t0=0.0)  # fine: no clean branch
    with pytest.raises(ValueError, match="m_t"):
        recipes.mdt(m_t=0.0)  # the second MDT pass must be masked


def test_keep_count_zero_is_detected_for_the_token_count():
    r = recipes.umd(m_t0=0.9)
    assert r.keep_counts(256) == (25, 160)
    with pytest.raises(ValueError, match="m_t0"):
        r.validate_for(8)  # int(8 * 0.1) = 0
    with pytest.raises(ValueError, match="m_t="):
        recipes.maskdit(m_t=0.9).validate_for(4)
    assert recipes.dit().keep_counts(16) == (None, 16)
    assert recipes.mae().keep_counts(16) == (4, None)
    recipes.dit(m_t0=0.99).validate_for(4)  # unused clean ratio is not checked
    with pytest.raises(ValueError, match="num_tokens"):
        r.keep_counts(0)


def test_recipe_is_frozen_hashable_and_static_for_jit():
    r = recipes.umd()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.r_t0 = 0.2
    assert hash(r) == hash(recipes.umd()) and r == recipes.umd()
    assert r != recipes.umd(m_t=0.5)
    assert r.replace(m_t=0.5) == recipes.umd(m_t=0.5)
    assert recipes.umd(r_t0=1) == recipes.umd(r_t0=1.0)
    assert isinstance(recipes.umd(r_t0=1).r_t0, float)
    f = jax.jit(lambda rec, x: x * rec.r_t0, static_argnums=0)
    assert float(f(r, 2.0)) == 1.0


def test_branch_names():
    assert recipes.umd().branch_names(2, 4) == ("clean", "noisy")
    assert recipes.umd().branch_names(0, 1) == ("noisy",)
    assert recipes.mae().branch_names(4, 4) == ("clean",)
    assert recipes.dit().branch_names(0, 4) == ("noisy",)
    assert recipes.mdt().branch_names(0, 4) == ("full", "masked")
    assert recipes.mdt(r_t0=0.5).branch_names(2, 4) == ("clean", "full", "masked")
    for bad in [(-1, 4), (5, 4), (4, 4)]:
        with pytest.raises(ValueError, match="num_clean"):
            recipes.umd().branch_names(*bad)
    with pytest.raises(ValueError, match="num_clean"):
        recipes.dit().branch_names(1, 4)
    with pytest.raises(ValueError, match="num_clean"):
        recipes.mae().branch_names(3, 4)
    with pytest.raises(ValueError, match="batch_size"):
        recipes.umd().branch_names(0, 0)


@settings(max_examples=25, deadline=None)
@given(
    r_t0=st.sampled_from([0.0, 0.05, 0.3, 0.5, 1.0]),
    two_pass=st.booleans(),
    batch=st.integers(1, 12),
)
def test_branch_names_round_trip_through_the_count(r_t0, two_pass, batch):
    r = recipes.umd(r_t0=r_t0, mdt_two_pass=two_pass)
    n_clean, _ = uc.split_batch(batch, r_t0)
    names = r.branch_names(n_clean, batch)
    assert r.branch_names_for_count(len(names)) == names


def test_import_does_not_pull_in_haiku():
    code = "import unidiff.corruption, sys; assert 'haiku' not in sys.modules, 'haiku imported'"
    root = str(pathlib.Path(unidiff.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, res.stderr
