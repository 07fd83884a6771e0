"""Exports: loss-masked training shards, served as files and pulled into folders."""
