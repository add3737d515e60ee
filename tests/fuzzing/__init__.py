"""The fuzz cases of tests/fuzz_cases.py, one module per area (see there)."""
