"""``metrics`` (one implementation of each metric), ``evaluate`` (the test-split report), ``plots``."""
