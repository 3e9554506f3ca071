"""Data layer: annotation reader, built-in dataset, Parquet preparation, split readers, text cache."""
