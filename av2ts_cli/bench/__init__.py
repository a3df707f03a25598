"""Benchmarks behind ``av2ts bench <topic>``: one module per topic, speed as ratios against a baseline."""
