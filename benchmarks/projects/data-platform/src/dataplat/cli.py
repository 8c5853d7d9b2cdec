"""Report which of the platform's clients import, and the versions a run would use."""

import boto3
import celery
import fastapi
import pandas
import pyarrow
import sqlalchemy
from google.cloud import storage


def main() -> None:
    modules = (boto3, celery, fastapi, pandas, pyarrow, sqlalchemy, storage)
    print(" ".join(f"{m.__name__}={getattr(m, '__version__', '?')}" for m in modules))
