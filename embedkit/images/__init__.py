"""Image files: finding them (sources) and decoding one safely to RGB (decode)."""
