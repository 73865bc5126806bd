"""Business rules per configuration: the rules file, its reload, and the merge with a
request's own rules."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from services.recommend.context import Filters, Rules
from services.recommend.rules import (
    NO_RULES,
    RuleBook,
    RulesConfigError,
    RulesFile,
    SurfaceRules,
    merge,
)

HOME: dict[str, Any] = {
    "boost_item_ids": ["b1", "b2"],
    "bury_item_ids": ["x1"],
    "pin_item_ids": ["p1", "p2"],
    "exclude_item_ids": ["gone"],
    "exclude_categories": ["Horror"],
    "min_create_time": "2001-01-01T00:00:00Z",
    "repeat_policy": {"allow_seen_categories": ["Drama"]},
}
RULES = {"default": {"exclude_categories": ["Documentary"]}, "surfaces": {"home": HOME}}


def _write(path: Path, data: object) -> None:
    """Write ``data`` as JSON and move the file's stamp on (a reload must see a change even
    when two writes fall within the file system's time resolution)."""
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_a_surface_gets_its_entry_and_every_other_one_the_default() -> None:
    book = RuleBook.parse(json.dumps(RULES), "rules")
    home = book.for_surface("home")
    assert home.rules == Rules(
        False, frozenset({"Drama"}), frozenset({"b1", "b2"}), frozenset({"x1"}), ("p1", "p2")
    )
    assert home.filters == Filters((), frozenset({"gone"}), frozenset({"Horror"}), 978307200)
    # an entry replaces the default: home does not also leave out documentaries
    assert book.for_surface("cart") == book.for_surface("") == book.default
    assert book.default.filters.exclude_categories == {"Documentary"}
    assert RuleBook.parse("  \n", "rules") == RuleBook()


def test_merge_keeps_both_filters_and_the_request_wins_conflicts() -> None:
    configured = RuleBook.parse(json.dumps(RULES), "rules").for_surface("home")
    request_filters = Filters(("Drama",), frozenset({"mine"}), frozenset({"Comedy"}), 2**31)
    request_rules = Rules(boost=frozenset({"x1"}), bury=frozenset({"b2"}), pin=("p2", "r1"))
    filters, rules = merge(configured, request_filters, request_rules)
    assert filters == Filters(
        ("Drama",), frozenset({"mine", "gone"}), frozenset({"Comedy", "Horror"}), 2**31
    )
    assert rules.boost == {"x1", "b1"} and rules.bury == {"b2"}  # the request's word holds
    assert rules.pin == ("p2", "r1", "p1")  # the request's pins first
    assert rules.allow_seen_categories == {"Drama"}  # the request set no repeat policy
    own = Rules(allow_seen=True)
    assert merge(configured, Filters(), own)[1].allow_seen_categories == frozenset()
    assert merge(configured, Filters(), own)[1].allow_seen
    # no configured rules: the request's, unchanged
    assert merge(NO_RULES, request_filters, request_rules) == (request_filters, request_rules)
    assert merge(SurfaceRules(), Filters(), Rules()) == (Filters(), Rules())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected an object"),
        (json.dumps({"surfaces": {"home": {"boost": ["1"]}}}), "unknown key 'boost'"),
        (json.dumps({"default": {"pin_item_ids": ["no way"]}}), "'no way' is not an id"),
        (
            json.dumps({"default": {"boost_item_ids": ["1"], "bury_item_ids": ["1"]}}),
            "'1' is boosted and buried",
        ),
        (json.dumps({"surfaces": {"bad surface": {}}}), "surface 'bad surface' is not an id"),
        (json.dumps({"default": {"min_create_time": "yesterday"}}), "min_create_time"),
        (json.dumps({"default": {"repeat_policy": {"allow_seen": "yes"}}}), "allow_seen"),
        (json.dumps({"default": {"exclude_categories": [""]}}), "exclude_categories"),
    ],
)
def test_a_bad_file_at_start_is_an_error_naming_the_file_and_entry(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "rules.json"
    _write(path, text)
    with pytest.raises(RulesConfigError, match=message) as excinfo:
        RulesFile(path)
    assert str(path) in str(excinfo.value)


def test_a_missing_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RulesConfigError, match="cannot be read"):
        RulesFile(tmp_path / "absent.json")
    assert RulesFile(None).for_surface("home") == NO_RULES


def test_a_changed_file_is_reloaded_and_a_bad_change_keeps_the_last_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rules.json"
    _write(path, RULES)
    now = [0.0]
    rules = RulesFile(path, check_s=1.0, clock=lambda: now[0])
    assert rules.for_surface("home").rules.boost == {"b1", "b2"}
    _write(path, {"surfaces": {"home": {"boost_item_ids": ["b3"]}}})
    assert rules.for_surface("home").rules.boost == {"b1", "b2"}  # not looked at yet
    now[0] = 1.5
    assert rules.for_surface("home").rules.boost == {"b3"} and rules.reloads == 1
    _write(path, "{broken")
    now[0] = 3.0
    with caplog.at_level(logging.ERROR, "services.recommend.rules"):
        assert rules.for_surface("home").rules.boost == {"b3"}
    assert rules.failed_reloads == 1 and "keeping the last one" in caplog.text
    path.unlink()  # gone (mid-swap): the rules in force stay
    now[0] = 4.5
    assert rules.for_surface("home").rules.boost == {"b3"}
    _write(path, {})  # fixed: emptied, so no rules at all
    now[0] = 6.0
    assert rules.for_surface("home") == NO_RULES and rules.reloads == 2
