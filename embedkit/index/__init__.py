"""FAISS indexes over a store: key choice, in-RAM and on-disk indexes, recall, lifecycle,
search, duplicates. The index knows vectors and ids, not images."""
