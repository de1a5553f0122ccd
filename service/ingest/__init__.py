"""Ingest: spool layout and atomic writes, header parsing without pixel decoding, instance
recording and the completion rules that turn a received study into a job."""
