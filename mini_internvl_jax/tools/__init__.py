"""Tooling beside the library: HLO reading and demo data; the training runtime calls it only for AOT sizing."""
