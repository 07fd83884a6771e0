"""One writer per export format, over a common sharding scheme (`shards.py`)."""
