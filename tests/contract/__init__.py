"""Contract tests: banger against the published interfaces of the tools it drives."""
