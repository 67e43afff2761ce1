"""Building blocks of the models: linears that know how to load their checkpoint slices, norms, rotary, attention,
the sampler."""
