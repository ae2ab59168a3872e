"""Geography: vectorised S2 cell ids and great-circle distances (sphere), the adaptive geo-cell partitionings
and their hierarchy (partitioning), offline place names (gazetteer) and every map geoloc draws (maps).
Imports: errors, data (store, places365)."""
