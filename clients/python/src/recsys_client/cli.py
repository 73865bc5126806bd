"""``recsys``: talk to a running gateway from the shell (plaintext, TLS or mutual TLS).

recsys recommend --user 42 -k 10
recsys similar --item 1
recsys profile --user 42
recsys ingest --user 42 --item 1 --type click
recsys upsert-item --item new-1 --title "..." --categories Drama,Comedy
recsys delete-user --user 42
recsys get-item --item 1
recsys list-items --page-size 50 [--page-token TOKEN | --all]
recsys delete-item --item new-1
recsys rank --user 42 --items 1,2,3
recsys --tls --ca ca.pem --cert client.pem --key client.key --api-key ... recommend --user 42

Every connection flag has an environment variable: RECSYS_TARGET (else localhost and
RECSYS_GRPC_PORT), RECSYS_TIMEOUT, RECSYS_API_KEY, RECSYS_TLS=1, RECSYS_CA_FILE,
RECSYS_CERT_FILE, RECSYS_KEY_FILE, RECSYS_TLS_SERVER_NAME. A flag wins over its variable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from recsys_client._pb import pb
from recsys_client.client import DEFAULT_TIMEOUT_S, RecommenderClient, Tls
from recsys_client.errors import RecsysError

EVENT_TYPES = {
    "view": pb.EVENT_TYPE_VIEW,
    "click": pb.EVENT_TYPE_CLICK,
    "rating": pb.EVENT_TYPE_RATING,
    "purchase": pb.EVENT_TYPE_PURCHASE,
}
_TRUE = {"1", "true", "yes", "on"}


def _print_items(items: Sequence[pb.ScoredItem]) -> None:
    if not items:
        print("  (no items)")
    for rank, scored in enumerate(items, 1):
        cats = ", ".join(scored.item.categories)
        item = scored.item
        print(f"{rank:3d}. {scored.score:7.3f}  {item.title}  [{cats}]  id={item.item_id}")
        print(f"     {scored.reason} ({scored.source})")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    target = env.get("RECSYS_TARGET") or f"localhost:{env.get('RECSYS_GRPC_PORT', '50051')}"
    parser = argparse.ArgumentParser(prog="recsys", description="Recommendation gateway client.")
    parser.add_argument("--target", default=target, help="host:port (RECSYS_TARGET)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(env.get("RECSYS_TIMEOUT", DEFAULT_TIMEOUT_S)),
        help="deadline in seconds (RECSYS_TIMEOUT)",
    )
    parser.add_argument(
        "--api-key", default=env.get("RECSYS_API_KEY"), help="API key (RECSYS_API_KEY)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=env.get("RECSYS_TLS", "").lower() in _TRUE,
        help="use TLS; implied by --ca/--cert/--key (RECSYS_TLS=1)",
    )
    parser.add_argument(
        "--ca", type=Path, default=env.get("RECSYS_CA_FILE"), help="CA to trust (RECSYS_CA_FILE)"
    )
    parser.add_argument(
        "--cert",
        type=Path,
        default=env.get("RECSYS_CERT_FILE"),
        help="client certificate for mutual TLS (RECSYS_CERT_FILE)",
    )
    parser.add_argument(
        "--key",
        type=Path,
        default=env.get("RECSYS_KEY_FILE"),
        help="client private key for mutual TLS (RECSYS_KEY_FILE)",
    )
    parser.add_argument(
        "--server-name",
        default=env.get("RECSYS_TLS_SERVER_NAME"),
        help="name expected in the server certificate (RECSYS_TLS_SERVER_NAME)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recommend", help="top-k items for a user (or an anonymous session)")
    rec.add_argument("--user", default="", help="the user (or --session)")
    rec.add_argument("--session", default="", help="an anonymous session id, without --user")
    rec.add_argument("--current-item", default="", help='the item on a "more like this" page')
    rec.add_argument("--surface", default="", help="the page showing the items (home, ...)")
    rec.add_argument("--device", default="", help="the device class (web, ios, ...)")
    rec.add_argument("--allow-seen", action="store_true", help="items seen before may return")
    rec.add_argument("--boost", type=_csv, default=[], help="item ids to lift to the top")
    rec.add_argument("--bury", type=_csv, default=[], help="item ids to push to the bottom")
    rec.add_argument("--pin", type=_csv, default=[], help="item ids to show first, in order")
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--categories", type=_csv, default=[])
    rec.add_argument("--exclude", type=_csv, default=[])
    rec.add_argument("--diversity", type=float)
    sim = sub.add_parser("similar", help="items similar to an item")
    sim.add_argument("--item", required=True)
    sim.add_argument("-k", type=int, default=10)
    prof = sub.add_parser("profile", help="what the platform knows of a user")
    prof.add_argument("--user", required=True)
    ing = sub.add_parser("ingest", help="record one event")
    ing.add_argument("--user", default="", help="the user (or --session)")
    ing.add_argument("--session", default="", help="an anonymous session id, without --user")
    ing.add_argument("--item", required=True)
    ing.add_argument("--recommendation-id", default="", help="the recommendation shown")
    ing.add_argument("--type", choices=sorted(EVENT_TYPES), default="click")
    ing.add_argument("--value", type=float, default=0.0, help="rating value for --type rating")
    ing.add_argument("--idempotency-key", default="", help="default: a fresh random key")
    up = sub.add_parser("upsert-item", help="add or replace a catalogue item")
    up.add_argument("--item", required=True)
    up.add_argument("--title", required=True)
    up.add_argument("--categories", type=_csv, default=[])
    up.add_argument("--description", default="")
    de = sub.add_parser("delete-user", help="forget a user")
    de.add_argument("--user", required=True)
    gi = sub.add_parser("get-item", help="one catalogue item")
    gi.add_argument("--item", required=True)
    li = sub.add_parser("list-items", help="a page of the catalogue (or all of it)")
    li.add_argument("--page-size", type=int, default=0, help="0: the server default (100)")
    li.add_argument("--page-token", default="", help="the next page token printed before")
    li.add_argument("--all", action="store_true", help="every page")
    di = sub.add_parser("delete-item", help="remove an item from the catalogue")
    di.add_argument("--item", required=True)
    rk = sub.add_parser("rank", help="order your candidate items for a user")
    rk.add_argument("--user", required=True)
    rk.add_argument("--items", type=_csv, required=True, help="comma-separated item ids")
    rk.add_argument("--surface", default="", help="the page showing the items (home, ...)")
    rk.add_argument("--device", default="", help="the device class (web, ios, ...)")
    return parser


def _print_item(item: pb.Item) -> None:
    print(f"{item.item_id}  {item.title}  [{', '.join(item.categories)}]")


def client_from_args(args: argparse.Namespace) -> RecommenderClient:
    """The client the connection flags describe."""
    tls: Tls | None = None
    if args.tls or args.ca or args.cert or args.key:
        tls = Tls(args.ca, args.cert, args.key, args.server_name)
    return RecommenderClient(args.target, args.timeout, api_key=args.api_key, tls=tls)


def run(args: argparse.Namespace) -> None:
    with client_from_args(args) as client:
        if args.command == "recommend":
            context = pb.RequestContext(
                surface=args.surface,
                device=args.device,
                current_item_id=args.current_item,
                session_id=args.session,
            )
            rules = pb.BusinessRules(
                boost_item_ids=args.boost, bury_item_ids=args.bury, pin_item_ids=args.pin
            )
            reply = client.recommend(
                args.user,
                args.k,
                args.categories,
                args.exclude,
                args.diversity,
                context=context,
                repeat_policy=pb.RepeatPolicy(allow_seen=args.allow_seen),
                business_rules=rules,
            )
            notes = [f"model release {reply.model_version or '-'}"]
            notes += ["cold start"] if reply.cold_start else []
            notes += [f"DEGRADED: {reply.degraded_reason}"] if reply.degraded else []
            who = f"user {args.user}" if args.user else f"session {args.session}"
            print(f"recommendations for {who} ({'; '.join(notes)})")
            print(f"recommendation id {reply.recommendation_id}")
            _print_items(reply.items)
        elif args.command == "similar":
            _print_items(client.similar(args.item, args.k).items)
        elif args.command == "profile":
            p = client.profile(args.user)
            interests = ", ".join(f"{i.category} {i.weight:.2f}" for i in p.top_interests[:5])
            print(f"user {p.user_id}: {p.history_size} events, segment {p.segment or '-'}")
            print(f"  interests: {interests or '-'}")
            print(f"  recent items: {', '.join(p.recent_item_ids[:10]) or '-'}")
            print(f"  updated: {p.update_time.ToDatetime().isoformat()}Z")
        elif args.command == "ingest":
            event = pb.Event(
                user_id=args.user,
                item_id=args.item,
                event_type=EVENT_TYPES[args.type],
                value=args.value,
                idempotency_key=args.idempotency_key,
                session_id=args.session,
                recommendation_id=args.recommendation_id,
            )
            event.event_time.GetCurrentTime()
            reply = client.ingest([event])
            print(
                f"accepted {reply.accepted_count} event(s), {reply.duplicate_count} duplicate(s)"
                f" (idempotency key {event.idempotency_key})"
            )
        elif args.command == "upsert-item":
            item = pb.Item(
                item_id=args.item,
                title=args.title,
                categories=args.categories,
                description=args.description,
            )
            print(f"upserted {client.upsert_items([item]).upserted_count} item(s)")
        elif args.command == "delete-user":
            existed = client.delete_user(args.user).existed
            print(f"user {args.user} {'deleted' if existed else 'had no data'}")
        elif args.command == "get-item":
            _print_item(client.get_item(args.item))
        elif args.command == "list-items":
            if args.all:
                for item in client.iter_items(args.page_size):
                    _print_item(item)
            else:
                page = client.list_items(args.page_size, args.page_token)
                for item in page.items:
                    _print_item(item)
                if page.next_page_token:
                    print(f"next page: --page-token {page.next_page_token}")
        elif args.command == "delete-item":
            existed = client.delete_item(args.item).existed
            print(f"item {args.item} {'deleted' if existed else 'was not in the catalogue'}")
        elif args.command == "rank":
            where = pb.RequestContext(surface=args.surface, device=args.device)
            ranked = client.rank_items(args.user, args.items, context=where)
            print(f"ranked for user {args.user} (recommendation id {ranked.recommendation_id})")
            _print_items(ranked.items)
            if ranked.unknown_item_ids:
                print(f"not in the catalogue: {', '.join(ranked.unknown_item_ids)}")
            if ranked.filtered_item_ids:
                print(f"left out by the rules: {', '.join(ranked.filtered_item_ids)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except RecsysError as err:
        reason = f" [{err.reason}]" if err.reason else ""
        print(f"error: {err.code().name}{reason}: {err.message}", file=sys.stderr)
        for field, why in err.field_violations:
            print(f"  {field}: {why}", file=sys.stderr)
        if err.retry_delay is not None:
            print(f"  retry after {err.retry_delay:.3f} s", file=sys.stderr)
        return 1
    except ValueError as err:  # unreadable certificate files and the like
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
