"""Opening a store of any kind: the manifest says which class reads it."""

from __future__ import annotations

import os

from silo.datastore.errors import StoreError
from silo.datastore.infgram import InfgramStore
from silo.datastore.manifest import Manifest
from silo.datastore.passages import PassageStore
from silo.datastore.store import Datastore

STORE_CLASSES: dict[str, type[Datastore]] = {"token": Datastore, "passage": PassageStore, "infgram": InfgramStore}


def open_store(path: str | os.PathLike, **options) -> Datastore:
    """`Datastore.open` of the right class for the store's kind (options as `Datastore.open`)."""
    kind = Manifest.load(path).kind
    cls = STORE_CLASSES.get(kind)
    if cls is None:
        raise StoreError(f"{path}: a {kind} store, which this version of SILO cannot open")
    return cls.open(path, **options)


def store_stats(path: str | os.PathLike) -> dict:
    """`silo datastore stats`: entries and documents (all and live), shards, tiers, sources."""
    store = open_store(path, load_index=False, with_text=False)
    try:
        return store.stats()
    finally:
        store.close()
