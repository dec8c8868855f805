"""Beam PTransforms and DoFns: corpus readers, decode, the CLIP ModelHandler, Parquet sinks."""
