"""Data on disk and its formats: the data root's layout, atomic writes, locks and tar shards (store), the
published metadata format (places365), the dataset registry (sources: add a preset here), photos and
EXIF (photo), the synthetic demo world (demo), training samples read from shards (dataset) and cached
embeddings (embeddings). Imports: errors, geo (positions), inference.geolocate (the test-time views dataset
shares with predict)."""
