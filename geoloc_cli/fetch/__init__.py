"""Fetching images into tar shards, along img2dataset's seams: `reader` (URL lists, metadata, archive
members), `remote` (registry files: Hub, mirrors, resumable HTTP), `downloader` (HTTP and per-item
checks: a failure is a row with a status), `writer` (shard planning, tar + manifest part, the merged
manifest) and `supervisor` (worker processes, progress, errors). `stages/fetch.py` drives them.
Imports: config, errors, data, and console (progress bars and warnings, rank 0 only); no typer."""
