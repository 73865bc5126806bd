"""Business rules per configuration through a real gateway (tritonserver, Milvus Lite, NATS):
the rules file's surface entry and default change Recommend and RankItems, the request's own
rules win a conflict, a changed file is applied without a restart, a broken change keeps the
last rules and a broken file stops the start."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from recsys_client import RecommenderClient

from ops.processes import StartupError, free_port, gateway_process
from ops.stack import LocalStack, gateway_serving
from services.api import pb
from tests.services.events.helpers import wait_for

pytestmark = pytest.mark.integration


def _write(path: Path, data: object) -> None:
    """Replace the file as a ConfigMap update does (a new file moved over the old one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else json.dumps(data))
    os.replace(tmp, path)


def _ids(reply: pb.RecommendResponse | pb.RankItemsResponse) -> list[str]:
    return [s.item.item_id for s in reply.items]


def _where(surface: str) -> pb.RequestContext:
    return pb.RequestContext(surface=surface, device="web")


def test_configured_rules_per_surface_merge_and_reload(stack: LocalStack, tmp_path: Path) -> None:
    rules_path = tmp_path / "rules.json"
    # "plain" has an empty entry (no rules: it replaces the default); the default leaves out
    # comedies; "home" boosts and buries, filled in once the plain order is known
    rules: dict[str, object] = {
        "default": {"exclude_categories": ["Comedy"]},
        "surfaces": {"plain": {}},
    }
    _write(rules_path, rules)
    port = free_port()
    env = {
        **stack.env(),
        "RECSYS_GRPC_PORT": str(port),
        "RECSYS_METRICS_PORT": "0",
        "RECSYS_RULES_FILE": str(rules_path),
    }
    gateway = gateway_process(env, tmp_path, "gateway-rules.log").start()
    target = f"127.0.0.1:{port}"
    try:
        gateway.wait_ready(lambda: gateway_serving(target), 60)
        with RecommenderClient(target, timeout=20) as client:

            def on(surface: str, own: pb.BusinessRules | None = None) -> list[str]:
                where = _where(surface)
                return _ids(
                    client.recommend("1", k=10, diversity=0.0, context=where, business_rules=own)
                )

            wide = _ids(client.recommend("1", k=40, diversity=0.0, context=_where("plain")))
            base = wide[:10]
            boosted, buried = wide[30], base[0]
            rules["surfaces"] = {
                "plain": {},
                "home": {"boost_item_ids": [boosted], "bury_item_ids": [buried]},
            }
            _write(rules_path, rules)
            # re-read without a restart (looked at once a second)
            assert wait_for(lambda: on("home")[:1] == [boosted], 10), on("home")
            home = on("home")
            assert buried not in home and buried in on("plain")
            # the request's own rules win a conflict: it buries what the file boosts
            mine = pb.BusinessRules(bury_item_ids=[boosted])
            assert boosted not in on("home", mine)
            # every other surface, and no surface at all, gets the default
            for reply in (
                client.recommend("1", k=20, context=_where("cart")),
                client.recommend("1", k=20),
            ):
                assert reply.items and all("Comedy" not in s.item.categories for s in reply.items)
            # RankItems applies the same rules: buried last on home, comedies out elsewhere
            ranked = client.rank_items("1", base, context=_where("home"))
            assert _ids(ranked)[-1] == buried and not ranked.filtered_item_ids
            cart = client.rank_items("1", base, context=_where("cart"))
            rows = {s.item.item_id: s.item for s in ranked.items}
            comedies = [i for i in base if "Comedy" in rows[i].categories]
            assert list(cart.filtered_item_ids) == comedies
            assert sorted(_ids(cart)) == sorted(set(base) - set(comedies))
            # a broken change keeps the rules in force
            _write(rules_path, "{broken")
            time.sleep(2.5)
            assert on("home")[:1] == [boosted]
        assert "keeping the last one" in gateway.log_tail(200)
    finally:
        gateway.stop()


def test_a_broken_rules_file_stops_the_start(stack: LocalStack, tmp_path: Path) -> None:
    rules_path = tmp_path / "rules.json"
    _write(rules_path, {"surfaces": {"home": {"boost": ["1"]}}})
    env = {
        **stack.env(),
        "RECSYS_GRPC_PORT": str(free_port()),
        "RECSYS_METRICS_PORT": "0",
        "RECSYS_RULES_FILE": str(rules_path),
    }
    gateway = gateway_process(env, tmp_path, "gateway-bad-rules.log").start()
    try:
        with pytest.raises(StartupError) as excinfo:
            gateway.wait_ready(lambda: False, 60)
        assert "unknown key 'boost'" in str(excinfo.value)
        assert str(rules_path) in str(excinfo.value)
    finally:
        gateway.stop()
