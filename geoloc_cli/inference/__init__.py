"""From network outputs to places and scores: cell probabilities to positions and rankings (geolocate),
torch-free inference from an ONNX export (onnx_runtime), the metrics every table reports (metrics:
add a metric here) and retrieval refinement (retrieval). Imports: errors, geo, data, model
(retrieval embeds photos with the network; the network's preprocessing is geolocate's)."""
