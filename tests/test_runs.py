"""distill.runs: variants x seeds resolved into plain distill sections, typos caught with their full key."""

from __future__ import annotations

import pytest

from pipeline.config import from_dict
from pipeline.distill.config import DistillConfig
from pipeline.errors import ConfigError
from pipeline.runs import (
    AblationConfig,
    ablation_section,
    ablation_stage_section,
    run_name,
    split_runs,
    variant_section,
)

SECTION = {
    "lr": 0.001,
    "loss": {"queue_size": 0, "cross_modal": True},
    "seed": 0,
    "runs": {
        "seeds": [0, 1, 2],
        "variants": {
            "student_a": {"overrides": {"loss": {"queue_size": 16}, "epochs": 3}},
            "student_b": {},
            "baseline": {"baseline": True},
        },
    },
}


def test_a_variant_merges_its_overrides_into_the_shared_section():
    section, baseline = variant_section(SECTION, "student_a", 2)
    assert not baseline and "runs" not in section
    assert section == {"lr": 0.001, "loss": {"queue_size": 16, "cross_modal": True}, "seed": 2, "epochs": 3}
    cfg = from_dict(DistillConfig, section, "distill")
    assert (cfg.seed, cfg.epochs, cfg.loss.queue_size, cfg.loss.cross_modal) == (2, 3, 16, True)
    assert SECTION["loss"]["queue_size"] == 0  # the shared section is not modified
    assert variant_section(SECTION, "baseline", 0)[1] is True
    assert variant_section(SECTION, "student_b", 1)[0] == {**split_runs(SECTION)[1], "seed": 1}


def test_compare_to_is_one_variant_or_several_in_order():
    assert split_runs(SECTION)[0].compare_to == ("baseline",)
    several = {**SECTION["runs"], "compare_to": ["baseline", "student_a"]}
    assert split_runs({"runs": several})[0].compare_to == ("baseline", "student_a")


def test_run_names_follow_the_matrix():
    runs, rest = split_runs(SECTION)
    assert "runs" not in rest and split_runs({"lr": 1.0})[0] is None
    assert runs.run_names()["student_a"] == ["student_a-s0", "student_a-s1", "student_a-s2"]
    assert run_name("baseline", 1) == "baseline-s1"


@pytest.mark.parametrize(
    "runs, message",
    [
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        ({"variants": {"teacher": {}}, "compare_to": "teacher"}, "'teacher' is not a usable name"),
        ({"variants": {"a-b": {}}}, "'a-b' is not a usable name"),
        ({"variants": {"a": {}}}, "compare_to 'baseline' is not one of the variants"),
        ({"variants": {"a": {}, "b": {}}, "compare_to": ["a", "c"]}, "compare_to 'c' is not one of the variants"),
        ({"variants": {"a": {}}, "compare_to": ["a", "a"]}, "compare_to names a model twice"),
        ({"variants": {"a": {}}, "compare_to": []}, "compare_to None is not one of the variants"),
        ({"variants": {"baseline": {"baselne": True}}}, "distill.runs.variants.baseline.baselne: unknown key"),
        ({"variant": {}}, "distill.runs.variant: unknown key"),
    ],
)
def test_bad_runs_are_one_clear_config_error(runs, message):
    with pytest.raises(ConfigError, match=message):
        split_runs({"runs": runs})


def test_unknown_variants_seeds_and_override_keys_are_refused():
    with pytest.raises(
        ConfigError, match="no variant 'student_c'; defined: \\['student_a', 'student_b', 'baseline'\\]"
    ):
        variant_section(SECTION, "student_c", 0)
    with pytest.raises(ConfigError, match="distill.runs.seeds: 5 is not one of \\[0, 1, 2\\]"):
        variant_section(SECTION, "student_a", 5)
    typo = {**SECTION, "runs": {"seeds": [0], "variants": {"baseline": {"overrides": {"loss": {"queue_sise": 1}}}}}}
    with pytest.raises(ConfigError, match="distill.loss.queue_sise: unknown key"):
        from_dict(DistillConfig, variant_section(typo, "baseline", 0)[0], "distill")


# -- ablations (ablation/params.yaml): base variant + overrides ----------------------------------------------
ABLATION = {
    "workdir": "artifacts/ablation",
    "base": "student_a",
    "seeds": [0, 2],
    "variants": {
        "more": {"overrides": {"loss": {"relation": 1.0}, "lr": 0.002}},
        "same": {},
    },
}


def ablation(**changes) -> AblationConfig:
    return from_dict(AblationConfig, {**ABLATION, **changes}, "ablation")


def test_an_ablation_run_is_the_base_variant_plus_its_own_overrides():
    section = ablation_section(SECTION, ablation(), "more", 2)
    # by hand: the shared section, student_a's overrides, then the ablation variant's, and the seed
    assert section == {
        "lr": 0.002,
        "loss": {"queue_size": 16, "cross_modal": True, "relation": 1.0},
        "seed": 2,
        "epochs": 3,
    }
    cfg = from_dict(DistillConfig, section, "distill")
    assert (cfg.seed, cfg.lr, cfg.epochs, cfg.loss.queue_size, cfg.loss.relation) == (2, 0.002, 3, 16, 1.0)
    assert ablation_section(SECTION, ablation(), "same", 0) == variant_section(SECTION, "student_a", 0)[0]
    assert SECTION["runs"]["variants"]["student_a"]["overrides"] == {"loss": {"queue_size": 16}, "epochs": 3}
    a = ablation()
    assert a.compare_to == ("student_a",)  # by default every row is paired with the base
    assert a.run_names() == {m: [f"{m}-s0", f"{m}-s2"] for m in ("student_a", "more", "same")}
    assert ablation(compare_to=["more", "student_a"]).compare_to == ("more", "student_a")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"variants": {}}, "an ablation needs at least one variant"),
        ({"variants": {"a-b": {}}}, "'a-b' is not a usable name"),
        ({"variants": {"student_a": {}}}, "'student_a' is the base; name the variants after what they add"),
        ({"variants": {"b": {"baseline": True}}}, "variants.b: baseline is not for an ablation"),
        ({"variants": {"b": {"overides": {}}}}, "ablation.variants.b.overides: unknown key"),
        ({"seeds": [1, 1]}, "seeds must be distinct"),
        ({"compare_to": "other"}, "compare_to 'other' is not one of the models"),
        ({"compare_to": ["more", "more"]}, "compare_to names a model twice"),
        ({"workdr": "x"}, "ablation.workdr: unknown key"),
    ],
)
def test_bad_ablations_are_one_clear_config_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        ablation(**changes)


@pytest.mark.parametrize(
    "changes, variant, seed, message",
    [
        ({"base": "student_c"}, "more", 0, "ablation: base 'student_c' is not a variant of distill.runs"),
        ({"base": "baseline"}, "more", 0, "ablation: base 'baseline' is a baseline"),
        ({"seeds": [0, 5]}, "more", 0, "ablation: seeds: 5 is not a seed of distill.runs \\[0, 1, 2\\]"),
        ({}, "less", 0, "ablation.variants: no variant 'less'; defined: \\['more', 'same'\\]"),
        ({}, "more", 1, "ablation.seeds: 1 is not one of \\[0, 2\\]"),
    ],
)
def test_an_ablation_must_fit_the_main_runs(changes, variant, seed, message):
    with pytest.raises(ConfigError, match=message):
        ablation_section(SECTION, ablation(**changes), variant, seed)
    with pytest.raises(ConfigError, match="ablation: base 'student_a' is not a variant of distill.runs \\[\\]"):
        ablation_section({"lr": 1.0}, ablation(), "more", 0)  # no distill.runs at all


def test_a_runs_curve_copy_replaces_only_an_earlier_copy(tmp_path):
    """The copies in <workdir>/curves/ (DVC outputs): an earlier copy, with or without the timing column
    train_log.csv had until it moved to checkpoints/<run>/speed.csv, is replaced; a file of the user's is not."""
    from pipeline.distill.logs import VAL_COLUMNS, train_columns
    from pipeline.errors import InputError
    from pipeline.store.ownership import claim
    from stages.distill import training_curve

    now, before = tmp_path / "now.csv", tmp_path / "before.csv"
    now.write_text(",".join(train_columns(["pair_contrastive_loss"])) + "\n10,1,0.1,4.2,4.2,1\n")
    before.write_text("step,epoch,lr,pairs_per_s,loss,pair_contrastive_loss\n10,1,0.1,1649.1,4.2,4.2\n")
    for path in (now, before):
        claim(path, training_curve("train"))
    (tmp_path / "val.csv").write_text(",".join(VAL_COLUMNS) + "\n")
    claim(tmp_path / "val.csv", training_curve("val"))
    (tmp_path / "mine.csv").write_text("step,epoch,my,own,numbers\n")
    for log in ("train", "val"):
        with pytest.raises(InputError, match=f"mine.csv: exists and is not a copy of a {log}_log.csv"):
            claim(tmp_path / "mine.csv", training_curve(log))
    with pytest.raises(InputError, match="is not a copy of a val_log.csv"):
        claim(now, training_curve("val"))


def test_an_ablations_own_stages_merge_its_keys_into_the_sections_of_params_yaml():
    abl = from_dict(
        AblationConfig,
        {
            "workdir": "w",
            "base": "a",
            "seeds": [0],
            "variants": {"b": {"overrides": {}}},
            "fit_teacher": {"backbone": "lite0", "seed": 1},
            "extract": {"extra_teachers": {"second": {"kind": "lit"}}},
        },
        "ablation",
    )
    section = {"backbone": "lite2", "seed": 0, "epochs": 10}
    assert ablation_stage_section("fit_teacher", section, abl) == {"backbone": "lite0", "seed": 1, "epochs": 10}
    assert section == {"backbone": "lite2", "seed": 0, "epochs": 10}  # params.yaml's own section untouched
    merged = ablation_stage_section("extract", {"teacher": {"kind": "lit"}, "extra_teachers": {}}, abl)
    assert merged == {"teacher": {"kind": "lit"}, "extra_teachers": {"second": {"kind": "lit"}}}
    with pytest.raises(
        ConfigError, match="ablation.mine is empty: this ablation's runs read the main pipeline's mined"
    ):
        ablation_stage_section("mine", {"k": 3}, abl)
