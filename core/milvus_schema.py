"""The Milvus schema of the platform: one place for collections, fields and indexes.

``items``: one row per catalogue item, its item-tower vector, the scalar fields that filters,
ranking and explanations need, and its co-occurrence neighbours (the collaborative signal).
``users``: one row per known user, the user-tower vector and the profile the gateway
keeps (segment, interests, recent history). ``segments``: one row per user segment, its
k-means centroid (online assignment is a nearest-centroid search) and its popular items.
All use inner product on L2-normalised vectors (= cosine). The collections' consistency level
is Strong, which the offline jobs' scans use; the gateway chooses a level per kind of read
(``RECSYS_MILVUS_ITEM_CONSISTENCY``, ``RECSYS_MILVUS_USER_CONSISTENCY``; see
``services/vectors/store.py``), since a Strong read waits for a time tick on a Milvus server.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymilvus import CollectionSchema, DataType, MilvusClient

from core.config import Settings

ID_MAX_LENGTH = 128
TITLE_MAX_LENGTH = 512
CATEGORY_MAX_LENGTH = 64
MAX_CATEGORIES = 32
RECENT_ITEMS = 100  # positive history kept on the user row, most recent first
# Every item the user interacted with (any event, newest first), never recommended again:
# heavy users have rated most of the popular catalogue long before their last 100 positives.
# 4096 is Milvus's largest ARRAY capacity; beyond it the oldest interactions drop out.
SEEN_ITEMS = 4096
CO_ITEMS = 50  # co-occurrence neighbours kept per item
SEGMENT_POPULAR = 100  # popular items kept per segment
TEXT_MAX_LENGTH = 2048
CONSISTENCY = "Strong"
METRIC = "IP"

ITEM_FIELDS = ["item_id", "title", "categories", "text", "popularity", "created_at"]
SEGMENT_FIELDS = ["segment_id", "popular_items", "size"]
USER_FIELDS = [
    "user_id",
    "segment",
    "interests",
    "recent_items",
    "seen_items",
    "history_size",
    "updated_at",
    "version",
    "events",
]
USER_JSON_FIELDS = ("interests", "events")  # the users collection's JSON fields


@dataclass(frozen=True)
class CollectionSpec:
    """A collection's name, schema and vector index."""

    name: str
    schema: CollectionSchema
    primary_key: str


def _add_string_list(
    schema: CollectionSchema, name: str, capacity: int, max_length: int = ID_MAX_LENGTH
) -> None:
    """An ARRAY<VARCHAR> field (ids by default): categories, neighbours, histories."""
    schema.add_field(
        name,
        DataType.ARRAY,
        element_type=DataType.VARCHAR,
        max_capacity=capacity,
        max_length=max_length,
    )


def items_schema(dim: int) -> CollectionSchema:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("item_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("title", DataType.VARCHAR, max_length=TITLE_MAX_LENGTH)
    _add_string_list(schema, "categories", MAX_CATEGORIES, CATEGORY_MAX_LENGTH)
    schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX_LENGTH)  # free text, tags
    schema.add_field("popularity", DataType.FLOAT)  # time-decayed positive users
    schema.add_field("created_at", DataType.INT64)  # epoch seconds; 0 when unknown
    _add_string_list(schema, "co_items", CO_ITEMS)
    return schema


def users_schema(dim: int) -> CollectionSchema:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("user_id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("segment", DataType.VARCHAR, max_length=64)
    schema.add_field("interests", DataType.JSON)  # {category: time-decayed weight}
    _add_string_list(schema, "recent_items", RECENT_ITEMS)
    _add_string_list(schema, "seen_items", SEEN_ITEMS)
    schema.add_field("history_size", DataType.INT64)
    schema.add_field("updated_at", DataType.INT64)  # epoch milliseconds
    schema.add_field("version", DataType.INT64)  # event-log sequence applied (profile worker)
    # the newest events in time order, the sequence model's input (core.sequence_inputs)
    schema.add_field("events", DataType.JSON)
    return schema


def segments_schema(dim: int) -> CollectionSchema:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("segment_id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)  # unit-norm centroid
    _add_string_list(schema, "popular_items", SEGMENT_POPULAR)
    schema.add_field("size", DataType.INT64)  # users in the segment when it was fitted
    return schema


def collections(settings: Settings) -> tuple[CollectionSpec, CollectionSpec, CollectionSpec]:
    """The (items, users, segments) collections this deployment uses."""
    dim = settings.embedding_dim
    return (
        CollectionSpec(settings.items_collection, items_schema(dim), "item_id"),
        CollectionSpec(settings.users_collection, users_schema(dim), "user_id"),
        CollectionSpec(settings.segments_collection, segments_schema(dim), "segment_id"),
    )


def index_params(client: MilvusClient, settings: Settings):  # type: ignore[no-untyped-def]
    """The vector index from settings (HNSW by default), inner-product metric."""
    params = client.prepare_index_params()
    params.add_index(
        field_name="vector",
        index_type=settings.index_type,
        metric_type=METRIC,
        params=dict(settings.index_params),
    )
    return params
