"""Arm assignment: deterministic, sticky, balanced; configuration validation."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from core.config import Settings
from services.experiments.assignment import (
    BUCKETS,
    ExperimentConfigError,
    Variant,
    assign,
    assign_all,
    bucket,
    load_experiments,
    merged_variant,
    parse_experiments,
)

MMR = json.dumps(
    [
        {
            "name": "mmr",
            "salt": "s1",
            "arms": [
                {"name": "control", "weight": 50, "variant": {"mmr_lambda": 0.0}},
                {"name": "treatment", "weight": 50, "variant": {"mmr_lambda": 0.3}},
            ],
        }
    ]
)


def test_parse_example_setting() -> None:
    (exp,) = parse_experiments(MMR)
    assert exp.name == "mmr" and exp.salt == "s1" and exp.control == "control"
    assert [a.name for a in exp.arms] == ["control", "treatment"]
    assert exp.arm("treatment").variant.mmr_lambda == 0.3
    assert exp.bounds == (5000, BUCKETS)


def test_assignment_is_deterministic_and_sticky() -> None:
    (exp,) = parse_experiments(MMR)
    first = {f"user-{i}": assign(exp, f"user-{i}").name for i in range(2000)}
    # re-parsed config, other order of calls: same arms
    (again,) = parse_experiments(MMR)
    for uid in reversed(list(first)):
        assert assign(again, uid).name == first[uid]
    # the documented hash, recomputed by hand
    import hashlib

    h = int(hashlib.sha256(b"s1:user-7").hexdigest()[:16], 16) % 10_000
    assert bucket("s1", "user-7") == h
    assert first["user-7"] == ("control" if h < 5000 else "treatment")


def test_assignment_is_balanced_within_tolerance() -> None:
    (exp,) = parse_experiments(MMR)
    n = 20_000
    counts = Counter(assign(exp, str(i)).name for i in range(n))
    # binomial sd = sqrt(n/4) ~ 71; allow 4 sd
    assert abs(counts["control"] - n / 2) < 4 * (n / 4) ** 0.5


def test_unequal_weights_and_three_arms() -> None:
    cfg = [
        {
            "name": "mix",
            "salt": "x",
            "arms": [
                {"name": "a", "weight": 1},
                {"name": "b", "weight": 1},
                {
                    "name": "c",
                    "weight": 2,
                    "variant": {"retrieval_mix": {"ann": 1, "co_occurrence": 0.5}},
                },
            ],
        }
    ]
    (exp,) = parse_experiments(cfg)
    assert exp.control == "a"  # no arm named control: the first one
    n = 40_000
    counts = Counter(assign(exp, f"u{i}").name for i in range(n))
    for arm, share in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(counts[arm] - n * share) < 4 * sd
    assert exp.arm("c").variant.retrieval_mix == {"ann": 1.0, "co_occurrence": 0.5}


def test_salt_changes_the_split() -> None:
    a, b = parse_experiments(MMR)[0], parse_experiments(MMR.replace('"s1"', '"s2"'))[0]
    same = sum(assign(a, str(i)).name == assign(b, str(i)).name for i in range(4000))
    assert 1700 < same < 2300  # independent: about half agree


def test_assign_all_and_merged_variant() -> None:
    model = {
        "name": "model",
        "salt": "m",
        "arms": [
            {"name": "control", "weight": 1, "variant": {}},
            {"name": "v2", "weight": 1, "variant": {"model_version": "2"}},
        ],
    }
    off = {"name": "off", "salt": "o", "enabled": False, "arms": [{"name": "x"}, {"name": "y"}]}
    cfg = [*json.loads(MMR), model, off]
    exps = parse_experiments(cfg)
    assigned = assign_all(exps, "user-1")
    assert [a.experiment for a in assigned] == ["mmr", "model"]  # disabled one skipped
    merged = merged_variant(assigned)
    assert isinstance(merged, Variant)  # the type the pipeline takes, no dict in between
    assert "mmr_lambda" in merged.set_fields()
    assert merged.mmr_lambda == assigned[0].variant.mmr_lambda
    assert merged.model_version == assigned[1].variant.model_version
    assert assigned[0].label().startswith("mmr=")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("not json", "invalid JSON"),
        ('[{"salt": "s", "arms": []}]', "name"),
        ('[{"name": "e", "arms": [{"name": "a"}, {"name": "b"}]}]', "salt"),
        ('[{"name": "e", "salt": "s", "arms": [{"name": "a"}]}]', "at least two"),
        ('[{"name": "e", "salt": "s", "arms": [{"name": "a"}, {"name": "a"}]}]', "duplicate"),
        (
            '[{"name": "e", "salt": "s", "arms": [{"name": "a", "weight": -1}, {"name": "b"}]}]',
            "weight",
        ),
        (
            '[{"name": "e", "salt": "s", "arms": [{"name": "a", "weight": 0}, '
            '{"name": "b", "weight": 0}]}]',
            "sum to 0",
        ),
        (
            '[{"name": "e", "salt": "s", "arms": [{"name": "a", "variant": {"mmr": 1}}, '
            '{"name": "b"}]}]',
            "unknown variant",
        ),
        (
            '[{"name": "e", "salt": "s", "arms": [{"name": "a", "variant": {"mmr_lambda": 2}}, '
            '{"name": "b"}]}]',
            "mmr_lambda",
        ),
        (
            '[{"name": "e", "salt": "s", "control": "zz", "arms": [{"name": "a"}, {"name": "b"}]}]',
            "not an arm",
        ),
        (  # the offline systems' names are not the gateway's sources
            '[{"name": "e", "salt": "s", "arms": [{"name": "a", "variant": '
            '{"retrieval_mix": {"ann": 1, "itemknn": 1}}}, {"name": "b"}]}]',
            r"arms\[0\]\.variant\.retrieval_mix: unknown retrieval source\(s\) \['itemknn'\]",
        ),
    ],
)
def test_invalid_configs_are_rejected(bad: str, message: str) -> None:
    with pytest.raises(ExperimentConfigError, match=message):
        parse_experiments(bad)


def test_overlapping_variant_fields_are_rejected() -> None:
    two = [*json.loads(MMR), dict(json.loads(MMR)[0], name="mmr2", salt="other")]
    with pytest.raises(ExperimentConfigError, match="already varied"):
        parse_experiments(two)


def test_load_from_settings_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_experiments("") == []

    class FakeSettings:
        experiments = MMR

    assert [e.name for e in load_experiments(FakeSettings())] == ["mmr"]
    # the environment reaches experiments the way it reaches every setting: through Settings
    monkeypatch.setenv("RECSYS_EXPERIMENTS", MMR)
    assert [e.name for e in load_experiments(Settings())] == ["mmr"]
    monkeypatch.delenv("RECSYS_EXPERIMENTS")
    assert load_experiments(Settings()) == []
