"""Deprecated: moved to `hf_kvcache.calibration.bit_profiles` (calibration runs models through the caches, so it sits
above them; `hf_kvcache.quant` holds the low-bit primitives below them). Names are still found here."""

import warnings


def __getattr__(name: str) -> object:
    from hf_kvcache.calibration import bit_profiles  # only for the deprecated path: calibration builds on quant

    warnings.warn(
        f"hf_kvcache.quant.calibration is deprecated; import {name} from hf_kvcache.calibration.bit_profiles",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(bit_profiles, name)
