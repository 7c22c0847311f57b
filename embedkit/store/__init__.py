"""The Parquet store: schema, reading the live view, the one writer, summaries."""
