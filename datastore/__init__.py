"""Sharded FAISS datastore: token and passage stores, attribution, opt-out."""
