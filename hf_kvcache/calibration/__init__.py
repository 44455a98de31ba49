"""Calibration: measurements on a model and a text that later runs reuse, saved as files keyed to the model.

- `bit_profiles`: per-layer key and value widths for `QuantizedCache` (`calibrate_bit_profile`, saved as a
  `quant.profile.BitProfile`); `hf-kvcache calibrate` on the command line (`command`).
- `query_statistics`: TriAttention's per-head query statistics (`calibrate_query_statistics`).
- `transform_codec`: the prefix store's transform codec, principal components of every layer's keys and values
  (`calibrate_transform_codec`, saved as a `prefix.transform_codec.CodecCalibration`).

This package sits above the caches (it runs models through them); the formats it writes (`quant.profile`)
sit below them, so that a cache can read a file without importing what made it.
"""
