"""Former home of the code-reading decode attention, now `hf_kvcache.caches.code_reading` (it belongs with the
quantized cache). Kept so that `hf_kvcache.code_attention` goes on working: it is the same module object."""

import sys

from hf_kvcache.caches import code_reading

sys.modules[__name__] = code_reading
