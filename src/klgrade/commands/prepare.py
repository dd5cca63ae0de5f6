"""`klgrade prepare SOURCE ...`: ingest a data source into a dataset dir (manifest.csv + rejects.csv).

Each source lives in its own module ``klgrade.commands._prepare_<source>`` exposing
``register(subparsers)``, so adding a source touches no other file.
"""
from __future__ import annotations

import argparse
import importlib

SOURCES = ("folders", "csv", "oai")


def add_split_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every source that may need a patient-level split."""
    p.add_argument("--split", default="0.7,0.1,0.2",
                   help="train,val,test fractions for a patient-level split made when the source has none "
                        "(default 0.7,0.1,0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--resplit", action="store_true", help="ignore the source's split and make a new one")


def register(sub) -> None:
    p = sub.add_parser("prepare", help="ingest a data source into a dataset dir (manifest.csv)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    srcs = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for name in SOURCES:
        try:
            mod = importlib.import_module(f"klgrade.commands._prepare_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"klgrade.commands._prepare_{name}":
                raise
            continue
        mod.register(srcs)
