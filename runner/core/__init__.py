"""Core data and rules: money, requests and outcomes, errors, the codec, the model catalog, the
request contract (schema) and job files. Imports nothing of runner's outside this folder."""
