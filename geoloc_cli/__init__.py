"""geoloc: photo geolocation as classification over adaptive S2 geo-cells."""

__version__ = "0.1.0"
