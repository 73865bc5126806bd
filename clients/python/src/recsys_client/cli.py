"""``recsys``: talk to a running gateway from the shell (plaintext, TLS or mutual TLS).

recsys recommend --user 42 -k 10
recsys similar --item 1
recsys profile --user 42
recsys ingest --user 42 --item 1 --type click
recsys upsert-item --item new-1 --title "..." --categories Drama,Comedy
recsys delete-user --user 42
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
    ing.add_argument("--idempotency-key", default="", help="default: a fresh random key")
    up = sub.add_parser("upsert-item", help="add or replace a catalogue item")
    up.add_argument("--item", required=True)
    up.add_argument("--title", required=True)
    up.add_argument("--categories", type=_csv, default=[])
    up.add_argument("--description", default="")
    de = sub.add_parser("delete-user", help="forget a user")
    de.add_argument("--user", required=True)
    return parser


def client_from_args(args: argparse.Namespace) -> RecommenderClient:
    """The client the connection flags describe."""
    tls: Tls | None = None
    if args.tls or args.ca or args.cert or args.key:
        tls = Tls(args.ca, args.cert, args.key, args.server_name)
    return RecommenderClient(args.target, args.timeout, api_key=args.api_key, tls=tls)


def run(args: argparse.Namespace) -> None:
    with client_from_args(args) as client:
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
                idempotency_key=args.idempotency_key,
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except RecsysError as err:
        print(f"error: {err.code().name}: {err.message}", file=sys.stderr)
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
