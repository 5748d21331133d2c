"""Helpers with no knowledge of SAP or of passes: option checks (`checks`), atomic writes (`io`), sample identities (`identity`)."""
