"""``recsys``: talk to a running gateway from the shell.

recsys recommend --user 42 -k 10
recsys similar --item 1
recsys profile --user 42
recsys ingest --user 42 --item 1 --type click
recsys upsert-item --item new-1 --title "..." --categories Drama,Comedy
recsys delete-user --user 42
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from core.config import get_settings
from services.api import pb
from services.client import RecommenderClient

EVENT_TYPES = {
    "view": pb.EVENT_TYPE_VIEW,
    "click": pb.EVENT_TYPE_CLICK,
    "rating": pb.EVENT_TYPE_RATING,
    "purchase": pb.EVENT_TYPE_PURCHASE,
}


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


def build_parser() -> argparse.ArgumentParser:
    s = get_settings()
    parser = argparse.ArgumentParser(prog="recsys", description="Recommendation gateway client.")
    parser.add_argument("--target", default=f"{s.grpc_host}:{s.grpc_port}", help="host:port")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recommend", help="top-k items for a user")
    rec.add_argument("--user", required=True)
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
    ing.add_argument("--user", required=True)
    ing.add_argument("--item", required=True)
    ing.add_argument("--type", choices=sorted(EVENT_TYPES), default="click")
    ing.add_argument("--value", type=float, default=0.0, help="rating value for --type rating")
    up = sub.add_parser("upsert-item", help="add or replace a catalogue item")
    up.add_argument("--item", required=True)
    up.add_argument("--title", required=True)
    up.add_argument("--categories", type=_csv, default=[])
    up.add_argument("--description", default="")
    de = sub.add_parser("delete-user", help="forget a user")
    de.add_argument("--user", required=True)
    return parser


def run(args: argparse.Namespace) -> None:
    with RecommenderClient(args.target, timeout=args.timeout) as client:
        if args.command == "recommend":
            reply = client.recommend(
                args.user, args.k, args.categories, args.exclude, args.diversity
            )
            notes = [f"model release {reply.model_version or '-'}"]
            notes += ["cold start"] if reply.cold_start else []
            notes += [f"DEGRADED: {reply.degraded_reason}"] if reply.degraded else []
            print(f"recommendations for user {args.user} ({'; '.join(notes)})")
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
            )
            event.event_time.GetCurrentTime()
            print(f"accepted {client.ingest([event]).accepted_count} event(s)")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        print(f"error: {code.name if code else 'UNKNOWN'}: {details}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
