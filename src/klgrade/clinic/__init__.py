"""The clinic: grade files (predict, serve), explain, export, PACS."""
