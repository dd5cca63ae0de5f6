"""Ingest: archives, folders and tables of radiographs -> manifest.csv + crops."""
