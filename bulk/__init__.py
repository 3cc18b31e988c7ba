"""Bulk classification: a folder or a list of images through a bundle into CSV, JSON lines or Parquet, on one
machine or on a Ray cluster; torch-free, with the server's sessions and decoding."""
