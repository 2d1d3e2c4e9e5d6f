"""Every wire format of the system: HTTP models, broker envelopes, registry events, names."""
