"""The research harness around the library: evaluation on a real model
(:mod:`.eval`: NIAH, perplexity, recall), the pass-key demo (:mod:`.demo`),
SmolLM2 loaded offline (:mod:`.models`), pictures (:mod:`.viz`, matplotlib)
and peak-memory readings (:mod:`.memory`).

Nothing here is imported by ``import dhsa``; these modules need torch,
transformers or matplotlib where they use them. ``dhsa.models`` is an alias
of :mod:`dhsa.harness.models`.
"""

