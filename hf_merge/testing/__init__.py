"""What tests, benchmarks and the offline quick start share: a local Hub server and tiny CLIP models."""
